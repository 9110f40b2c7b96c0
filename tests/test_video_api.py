"""Video end to end through the API: every mode of every family on tiny random-weight models, long
clips as segment jobs, post-processing and encoding checked by decoding the file back, bad input,
idempotency, cancellation, and OpenAI's /v1/videos with the official client."""

from __future__ import annotations

import base64
import io
import threading
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from genserve.artifacts.images import ImageStore
from genserve.config import Settings
from genserve.engine.engine import Engine
from genserve.engine.models.registry import scan_models
from genserve.engine.video.encode import probe_video
from genserve.store.jobs import JobStore
from genserve.worker.loop import Worker

FAST = {"steps": 2, "seed": 3, "preview_every": 1}


@pytest.fixture(scope="session")
def video_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from genserve.engine.models.fixtures import write_tiny_pipeline
    from genserve.engine.models.video_fixtures import write_tiny_video_pipeline

    root = tmp_path_factory.mktemp("video-models")
    write_tiny_pipeline("sd15", root / "tiny-sd15")
    for kind in ("wan", "wan_i2v", "ltx", "svd", "animatediff"):
        write_tiny_video_pipeline(kind, root / f"tiny-{kind.replace('_', '-')}")
    write_tiny_video_pipeline("motion_adapter", root / "tiny-motion", base_model="tiny-sd15")
    return root


def make_settings(models_dir: Path, data_dir: Path, store_url: str | None = None) -> Settings:
    return Settings(
        data_dir=data_dir,
        models_dir=models_dir,
        store_url=store_url,
        builtin_models=False,
        default_model="tiny-sd15",
        default_video_model="tiny-ltx",
        workers=0,
        heartbeat_seconds=0.5,
    )


@pytest.fixture
def settings(video_models_dir: Path, tmp_path: Path) -> Settings:
    return make_settings(video_models_dir, tmp_path / "data")


def api(settings: Settings) -> TestClient:
    from genserve.api.app import create_app

    return TestClient(create_app(settings, supervise_workers=False))


def run_queue(settings: Settings, name: str = "worker-test") -> None:
    """A worker runs everything queued (segments, then the stitch they release), then stops."""
    store = JobStore.from_url(settings.resolved_store_url)
    worker = Worker(
        settings,
        store,
        Engine(scan_models(settings.models_dir), device="cpu"),
        ImageStore(settings.images_dir),
        name,
    )
    worker.work(threading.Event(), until_idle=True)
    worker.leases.close()
    store.close()


def picture(color: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def animated_gif(frames: int, size: tuple[int, int] = (32, 32)) -> str:
    """A clip to restyle: a square moving right, as an animated GIF upload."""
    pictures = []
    for index in range(frames):
        picture = Image.new("RGB", size, (10, 10, 10))
        picture.paste((230, 40, 40), (2 + index, 10, 12 + index, 20))
        pictures.append(picture)
    buffer = io.BytesIO()
    pictures[0].save(buffer, format="GIF", save_all=True, append_images=pictures[1:], duration=100, loop=0)
    return base64.b64encode(buffer.getvalue()).decode()


def events_of(client: TestClient, job_id: str) -> list[tuple[str, dict]]:
    import json

    with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        lines = list(response.iter_lines())
    events, kind = [], None
    for line in lines:
        if line.startswith("event:"):
            kind = line.split(":", 1)[1].strip()
        elif line.startswith("data:") and kind:
            events.append((kind, json.loads(line.split(":", 1)[1])))
    return events


def finished(client: TestClient, job_id: str) -> dict:
    job = client.get(f"/v1/video/jobs/{job_id}").json()
    assert job["state"] == "succeeded", job["error"]
    return job


def download(client: TestClient, job: dict) -> tuple[bytes, object]:
    response = client.get(job["outputs"]["video"]["url"])
    assert response.status_code == 200
    return response.content, probe_video(response.content)


MODES = [
    ("tiny-wan", {"mode": "t2v", "prompt": "a cat", "num_frames": 9, "width": 16, "height": 16}),
    ("tiny-wan-i2v", {"mode": "i2v", "prompt": "a cat", "num_frames": 9, "width": 16, "height": 16,
                      "keyframes": [{"image": picture((200, 20, 20)), "frame_index": 0}]}),
    ("tiny-wan-i2v", {"mode": "flf2v", "prompt": "a cat", "num_frames": 9, "width": 16, "height": 16,
                      "keyframes": [{"image": picture((200, 20, 20)), "frame_index": 0},
                                    {"image": picture((20, 20, 200)), "frame_index": 8}]}),
    ("tiny-ltx", {"mode": "t2v", "prompt": "a dog", "num_frames": 9, "width": 32, "height": 32}),
    ("tiny-ltx", {"mode": "keyframes", "prompt": "a dog", "num_frames": 17, "width": 32, "height": 32,
                  "keyframes": [{"image": picture((200, 20, 20)), "frame_index": 0},
                                {"image": picture((20, 200, 20)), "frame_index": 8},
                                {"image": picture((20, 20, 200)), "frame_index": 16}]}),
    ("tiny-ltx", {"mode": "v2v", "prompt": "a dog", "num_frames": 9, "width": 32, "height": 32,
                  "video": animated_gif(9)}),
    ("tiny-wan", {"mode": "v2v", "prompt": "a cat", "width": 16, "height": 16, "video": animated_gif(9, (16, 16))}),
    ("tiny-animatediff", {"mode": "v2v", "prompt": "a bird", "width": 32, "height": 32, "video": animated_gif(8)}),
    ("tiny-svd", {"mode": "i2v", "num_frames": 4, "width": 64, "height": 64,
                  "keyframes": [{"image": picture((30, 200, 30), (64, 64)), "frame_index": 0}]}),
    ("tiny-animatediff", {"mode": "t2v", "prompt": "a bird", "num_frames": 8, "width": 32, "height": 32}),
    ("tiny-motion", {"mode": "t2v", "prompt": "a bird", "num_frames": 8}),
]  # fmt: skip


@pytest.mark.parametrize(("model", "body"), MODES, ids=[f"{m}-{b['mode']}" for m, b in MODES])
def test_every_mode_of_every_family_makes_a_playable_clip(settings, model, body):
    with api(settings) as client:
        created = client.post("/v1/video/jobs", json={"model": model, **body, **FAST})
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        run_queue(settings)
        job = finished(client, job_id)
        data, info = download(client, job)
        assert data[4:8] == b"ftyp" and info.codec == "h264"
        frames = body.get("num_frames") or job["params"]["num_frames"]
        assert info.frames == frames and info.fps == pytest.approx(job["params"]["fps"])
        assert (info.width, info.height) == (job["params"]["width"], job["params"]["height"])
        events = events_of(client, job_id)
        steps = [data for kind, data in events if kind == "progress" and data.get("stage") == "denoise"]
        runs = steps[-1]["steps"]  # v2v restyles run int(steps × strength) of them
        assert [step["step"] for step in steps] == list(range(1, runs + 1)) and steps[-1]["percent"] == 100
        assert runs == (1 if body["mode"] == "v2v" and model != "tiny-ltx" else 2)
        assert any(kind == "preview" and data["filmstrip"].startswith("data:image/") for kind, data in events)
        stages = [data["stage"] for kind, data in events if kind == "stage"]
        assert stages == ["denoise", "decode", "encode"]
        assert any(kind == "video_ready" for kind, _ in events)
        assert client.get(job["outputs"]["thumbnail"]["url"]).headers["content-type"] == "image/png"
        report = job["report"]
        assert report["frames"] == frames and set(report["metrics"]) >= {
            "warp_error",
            "flicker_index",
        }


@pytest.fixture
def both_stores(video_models_dir: Path, tmp_path: Path, store_url: str) -> Settings:
    return make_settings(video_models_dir, tmp_path / "data", store_url)


def test_keyframe_pairs_run_as_independent_segments_then_stitch(both_stores):
    settings = both_stores
    keys = [
        {"image": picture(c), "frame_index": i}
        for c, i in (((200, 0, 0), 0), ((0, 200, 0), 8), ((0, 0, 200), 16))
    ]
    body = {"model": "tiny-ltx", "mode": "keyframes", "prompt": "x", "num_frames": 17, "width": 32, "height": 32,
            "keyframes": keys, "long": {"segment_frames": 9, "strategy": "keyframe_parallel"}, **FAST}  # fmt: skip
    with api(settings) as client:
        job = client.post("/v1/video/jobs", json=body).json()
        assert job["state"] == "waiting"
        assert [(s["index"], s["state"]) for s in job["segments"]] == [(0, "queued"), (1, "queued")]
        run_queue(settings)
        job = finished(client, job["id"])
        assert [s["state"] for s in job["segments"]] == ["succeeded", "succeeded"]
        assert len(job["outputs"]["segments"]) == 2
        _, info = download(client, job)
        assert info.frames == 17  # 9 + 9, the shared keyframe kept once
        events = events_of(client, job["id"])
        ready = [data for kind, data in events if kind == "segment_ready"]
        assert sorted(data["segment"] for data in ready) == [0, 1]
        for data in ready:
            assert probe_video(client.get(data["url"]).content).frames == 9
        assert [data["segment"] for kind, data in events if kind == "progress" and data["step"] == 2] == [
            0,
            1,
        ]
        assert "stitch" in [data["stage"] for kind, data in events if kind == "stage"]
        assert "seam_score" in job["report"]["metrics"]


def test_extend_chains_segments_and_trims_to_the_asked_length(settings):
    body = {"model": "tiny-ltx", "prompt": "x", "num_frames": 25, "width": 32, "height": 32,
            "long": {"segment_frames": 9, "overlap": 2, "strategy": "extend"}, **FAST}  # fmt: skip
    with api(settings) as client:
        job = client.post("/v1/video/jobs", json=body).json()
        # ceil((25 - 2) / (9 - 2)) = 4 segments; only the first can start
        assert [s["state"] for s in job["segments"]] == ["queued", "waiting", "waiting", "waiting"]
        run_queue(settings)
        job = finished(client, job["id"])
        _, info = download(client, job)
        assert info.frames == 25


def test_interpolation_post_and_webm(settings):
    body = {"model": "tiny-ltx", "prompt": "x", "num_frames": 9, "width": 32, "height": 32, "fps": 8,
            "post": {"interpolate": 2, "deflicker": True, "denoise": True},
            "output": {"container": "webm"}, **FAST}  # fmt: skip
    with api(settings) as client:
        job_id = client.post("/v1/video/jobs", json=body).json()["id"]
        run_queue(settings)
        job = finished(client, job_id)
        _, info = download(client, job)
        assert (info.frames, info.fps, info.codec) == (17, 16, "vp9")
        stages = [data["stage"] for kind, data in events_of(client, job_id) if kind == "stage"]
        assert stages == ["denoise", "decode", "post", "interpolate", "encode"]
        assert set(job["report"]["timings"]) == {"denoise", "post", "interpolate", "encode"}


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"model": "tiny-wan", "prompt": "x", "num_frames": 10}, "num_frames", "nearest valid: 9"),
        ({"model": "tiny-ltx", "prompt": "x", "num_frames": 9, "width": 48}, "width", "multiple of 32"),
        ({"model": "tiny-ltx", "prompt": "x", "mode": "keyframes", "num_frames": 9,
          "keyframes": [{"image": picture((1, 2, 3)), "frame_index": 9}]}, "keyframes[0].frame_index", "outside"),
        ({"model": "tiny-ltx", "prompt": "x", "mode": "i2v", "num_frames": 9,
          "keyframes": [{"image": "sha256:" + "ab" * 32, "frame_index": 0}]}, "keyframes[0].image", "no upload"),
        ({"model": "tiny-ltx", "prompt": "x", "mode": "i2v", "num_frames": 9}, "keyframes", "takes 1"),
        ({"model": "tiny-wan", "prompt": "x", "mode": "flf2v", "num_frames": 9}, "mode", "offers"),
        ({"model": "tiny-sd15", "prompt": "x"}, "model", "not video"),
        ({"model": "tiny-wan", "prompt": "x", "num_frames": 9, "long": {"segment_frames": 5, "strategy": "free_noise"}},
         "long.strategy", "AnimateDiff"),
        ({"model": "tiny-ltx", "prompt": "x", "mode": "keyframes", "num_frames": 17,
          "keyframes": [{"image": picture((1, 2, 3)), "frame_index": 0}, {"image": picture((1, 2, 3)), "frame_index": 10}],
          "long": {"segment_frames": 9}}, "keyframes[1].frame_index", "8N+1"),
        ({"model": "tiny-ltx", "prompt": "x", "num_frames": 9, "output": {"container": "mp4", "crf": 60}}, "output", "crf"),
        ({"model": "tiny-ltx", "prompt": "x", "num_frames": 9999}, "num_frames", "max_video_frames"),
        ({"model": "tiny-wan", "prompt": "x", "mode": "v2v", "num_frames": 13, "video": animated_gif(9, (16, 16))},
         "num_frames", "has 9 frames"),
        ({"model": "tiny-wan", "prompt": "x", "mode": "v2v", "video": picture((1, 2, 3))}, "video", "one frame"),
        ({"model": "tiny-wan", "prompt": "x", "mode": "v2v", "num_frames": 9}, "video", "needs an input video"),
    ],
)  # fmt: skip
def test_bad_video_requests_get_a_422_naming_the_field(settings, body, field, words):
    with api(settings) as client:
        response = client.post("/v1/video/jobs", json=body)
        assert response.status_code == 422, response.text
        detail = response.json()["detail"][0]
        assert detail["loc"][-1] == field and words in detail["msg"], detail
        assert client.get("/v1/video/jobs").json()["total"] == 0


def test_schema_errors_are_422_too(settings):
    with api(settings) as client:
        for body in ({"prompt": "x", "mode": "sideways"}, {"prompt": "x", "num_frames": 9, "seconds": 1},
                     {"prompt": "x", "output": {"container": "gif", "codec": "h264"}},
                     {"prompt": "x", "long": {"segment_frames": 9, "overlap": 9}}):  # fmt: skip
            assert client.post("/v1/video/jobs", json=body).status_code == 422, body


def test_idempotent_submit_and_cancel_of_a_long_video(settings):
    keys = [{"image": picture((9, 9, 9)), "frame_index": i} for i in (0, 8, 16)]
    body = {"model": "tiny-ltx", "mode": "keyframes", "prompt": "x", "num_frames": 17, "width": 32, "height": 32,
            "keyframes": keys, "long": {"segment_frames": 9}, "request_id": "clip-1", **FAST}  # fmt: skip
    with api(settings) as client:
        first = client.post("/v1/video/jobs", json=body)
        again = client.post("/v1/video/jobs", json=body)
        assert (first.status_code, again.status_code) == (202, 200)
        assert first.json()["id"] == again.json()["id"]
        assert client.post("/v1/video/jobs", json={**body, "seed": 4}).status_code == 409
        canceled = client.delete(f"/v1/video/jobs/{first.json()['id']}").json()
        assert canceled["state"] == "canceled"
        assert {s["state"] for s in canceled["segments"]} == {"canceled"}
        run_queue(settings)  # nothing left to run
        assert client.get(f"/v1/video/jobs/{first.json()['id']}").json()["state"] == "canceled"


def test_a_failed_segment_fails_its_video_with_the_reason(settings):
    keys = [{"image": picture((9, 9, 9)), "frame_index": i} for i in (0, 8, 16)]
    body = {"model": "tiny-ltx", "mode": "keyframes", "prompt": "x", "num_frames": 17, "width": 32, "height": 32,
            "keyframes": keys, "long": {"segment_frames": 9}, **FAST}  # fmt: skip
    with api(settings) as client:
        job = client.post("/v1/video/jobs", json=body).json()
        digest = job["params"]["keyframes"][1]["image"].removeprefix("sha256:")
        (settings.inputs_dir / digest[:2] / digest).unlink()  # lost from the artifact store
        run_queue(settings)
        done = client.get(f"/v1/video/jobs/{job['id']}").json()
        assert (
            done["state"] == "failed" and "segment" in done["error"] and "cannot be loaded" in done["error"]
        )


def test_estimate_gives_cost_per_second_of_video(settings):
    with api(settings) as client:
        body = {"model": "tiny-ltx", "prompt": "x", "num_frames": 17, "width": 32, "height": 32, "fps": 8,
                "post": {"interpolate": 2}, "gpu_price_per_hour": 2.0}  # fmt: skip
        estimate = client.post("/v1/video/estimate", json=body).json()
        assert estimate["output_frames"] == 33 and estimate["output_seconds"] == pytest.approx(
            33 / 16, abs=1e-3
        )
        assert estimate["cost_per_video_second"] == pytest.approx(
            estimate["cost"] / estimate["output_seconds"], rel=1e-3
        )
        longer = client.post("/v1/video/estimate", json={**body, "num_frames": 33}).json()
        assert longer["estimated_seconds"] > estimate["estimated_seconds"]


def test_v1_estimate_takes_a_video_body_too(settings):
    """/v1/estimate answers a video request with what /v1/video/estimate gives; image bodies as before."""
    with api(settings) as client:
        body = {"model": "tiny-ltx", "prompt": "x", "num_frames": 17, "width": 32, "height": 32, "fps": 8,
                "post": {"interpolate": 2}, "gpu_price_per_hour": 2.0}  # fmt: skip
        video = client.post("/v1/video/estimate", json=body)
        both = client.post("/v1/estimate", json=body)
        assert both.status_code == video.status_code == 200, both.text
        assert both.json() == video.json() and both.json()["cost_per_video_second"] > 0
        # Naming a video model is enough; the video defaults then apply, as on /v1/video/estimate.
        short = {"model": "tiny-ltx", "prompt": "x", "width": 32, "height": 32}
        assert (
            client.post("/v1/estimate", json=short).json()
            == client.post("/v1/video/estimate", json=short).json()
        )
        # An image body still gets the image estimate.
        image = client.post(
            "/v1/estimate", json={"model": "tiny-sd15", "steps": 4, "width": 64, "height": 64}
        )
        assert image.status_code == 200 and "images_per_hour" in image.json() and "frames" not in image.json()
        # The video rules and the field names of the 422s are the video estimate's.
        for bad, field in (({**body, "num_frames": 10}, "num_frames"), ({**body, "batch": 2}, "batch"),
                           ({**body, "long": {"segment_frames": 9, "overlap": 9}}, "long")):  # fmt: skip
            response = client.post("/v1/estimate", json=bad)
            assert response.status_code == 422, response.text
            assert field in response.json()["detail"][0]["loc"], response.json()


def test_models_list_video_models_with_licence_and_modes(settings):
    with api(settings) as client:
        models = {m["name"]: m for m in client.get("/v1/models").json()["data"]}
    assert models["tiny-wan-i2v"]["kind"] == "video" and models["tiny-wan-i2v"]["license"]
    assert set(models["tiny-wan-i2v"]["video_modes"]) == {"i2v", "flf2v"}
    assert models["tiny-motion"]["base_model"] == "tiny-sd15"
    assert models["tiny-sd15"]["kind"] == "image"


def test_openai_client_videos_resource(settings):
    import openai

    from genserve.api.app import create_app

    app = create_app(settings, supervise_workers=False)
    with TestClient(app) as http:  # the official client, over the app in process
        client = openai.OpenAI(api_key="unused", base_url="http://testserver/v1", http_client=http)
        video = client.videos.create(prompt="a dog", model="tiny-ltx", seconds="1", size="32x32")
        assert video.status == "queued" and video.size == "32x32"
        run_queue(settings)
        done = client.videos.retrieve(video.id)
        assert done.status == "completed" and done.progress == 100
        content = client.videos.download_content(video.id).read()
        info = probe_video(content)
        assert info.frames == 25  # 1 s at LTX's 24 fps: 24 frames, and the nearest 8N+1 count is 25
        listed = client.videos.list()
        assert [v.id for v in listed.data] == [video.id]
        assert client.videos.delete(video.id).deleted
        with pytest.raises(openai.NotFoundError):
            client.videos.retrieve("nope")


def test_frames_decoded_back_match_the_generated_frames(settings):
    """mp4 at crf 0 is close to lossless: what a user downloads is what the model drew."""
    body = {"model": "tiny-ltx", "prompt": "x", "num_frames": 9, "width": 32, "height": 32,
            "output": {"container": "gif"}, **FAST}  # fmt: skip
    with api(settings) as client:
        job_id = client.post("/v1/video/jobs", json=body).json()["id"]
        run_queue(settings)
        job = finished(client, job_id)
        data, info = download(client, job)
        assert info.codec == "gif" and info.frames == 9
        frames = np.stack([np.asarray(frame.convert("RGB")) for frame in _gif_frames(data)])
        assert frames.shape == (9, 32, 32, 3)


def _gif_frames(data: bytes) -> list[Image.Image]:
    from PIL import ImageSequence

    return [frame.copy() for frame in ImageSequence.Iterator(Image.open(io.BytesIO(data)))]


def test_kill_9_of_a_worker_mid_segment_costs_that_segment_only(video_models_dir, tmp_path):
    """Two workers run a long video's segments; one is killed mid-segment. That segment runs
    again, every segment succeeds once, and the video is stitched exactly once."""
    import os
    import signal
    import time

    from tests.helpers import LiveServer, wait_for

    env = {
        "GENSERVE_WORKERS": "2",
        "GENSERVE_DEFAULT_VIDEO_MODEL": "tiny-ltx",
        "GENSERVE_LIMITS__MAX_STEPS": "1000",
    }
    server = LiveServer(video_models_dir, tmp_path / "data", env=env).start()
    keys = [{"image": picture(c, (64, 64)), "frame_index": i}
            for c, i in (((200, 0, 0), 0), ((0, 200, 0), 16), ((0, 0, 200), 32))]  # fmt: skip
    body = {"mode": "keyframes", "prompt": "x", "num_frames": 33, "width": 64, "height": 64, "steps": 80,
            "seed": 1, "keyframes": keys, "long": {"segment_frames": 17}}  # fmt: skip
    try:
        with server.client() as client:
            video = client.post("/v1/video/jobs", json=body)
            assert video.status_code == 202, video.text
            video_id = video.json()["id"]
            segments = [s["id"] for s in video.json()["segments"]]
            store = JobStore.from_url(f"sqlite:///{tmp_path / 'data' / 'genserve.db'}")

            def read_events(_client, job_id):  # a snapshot: the SSE stream waits for the end
                return store.events.read_after(job_id)

            def running_segment() -> tuple[str, int] | None:
                for segment_id in segments:
                    events = read_events(client, segment_id)
                    started = [e for e in events if e.type == "started"]
                    steps = [e for e in events if e.type == "progress" and e.data.get("step", 0) >= 3]
                    if started and steps and not any(e.type == "succeeded" for e in events):
                        workers = client.get("/healthz").json()["workers"]
                        pids = [w["pid"] for w in workers if w["id"] == started[-1].data["worker"]]
                        return (segment_id, pids[0]) if pids else None
                return None

            victim, pid = wait_for(running_segment, timeout=120, interval=0.05, message="a segment under way")
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                job = client.get(f"/v1/video/jobs/{video_id}").json()
                if job["state"] in ("succeeded", "failed", "canceled"):
                    break
                time.sleep(0.2)
            assert job["state"] == "succeeded", job
            attempts = {s["id"]: s["attempts"] for s in job["segments"]}
            assert attempts[victim] == 2 and all(a == 1 for s, a in attempts.items() if s != victim), attempts
            for segment_id in segments:
                types = [e.type for e in read_events(client, segment_id)]
                assert types.count("succeeded") == 1, (segment_id, types)
            video_events = read_events(client, video_id)
            assert [e.data.get("stage") for e in video_events if e.type == "queued"].count("stitch") == 1
            assert [e.type for e in video_events].count("succeeded") == 1
            assert probe_video(client.get(job["outputs"]["video"]["url"]).content).frames == 33
            store.close()
    finally:
        server.stop()


def test_the_image_job_routes_point_a_video_job_to_its_own(settings):
    with api(settings) as client:
        video = client.post(
            "/v1/video/jobs", json={"prompt": "x", "num_frames": 9, "width": 32, "height": 32}
        ).json()
        response = client.get(f"/v1/jobs/{video['id']}")
        assert response.status_code == 404 and f"/v1/video/jobs/{video['id']}" in response.json()["detail"]
        assert client.delete(f"/v1/jobs/{video['id']}").status_code == 404
        assert client.get("/v1/jobs").json()["total"] == 0  # image jobs only
        assert client.get("/v1/video/jobs").json()["total"] == 1


def test_the_default_video_model_makes_a_clip_of_the_shape_asked_for(tmp_path):
    """genserve-shapes-motion, shipped in the package, through the API with no model named: a green
    star on black in every frame (its own UNet and text conditioning load through the engine)."""
    from genserve.engine.models.registry import BUILTIN_MODELS_DIR
    from genserve.toymodel import pixels
    from genserve.toymodel.shapes_classifier import CLASSIFIER_FILE, classify_shapes, load_classifier

    settings = Settings(data_dir=tmp_path / "data", models_dir=tmp_path / "none", workers=0)
    with api(settings) as client:
        job_id = client.post(
            "/v1/video/jobs", json={"prompt": "a green star moving left on a black background", "seed": 2}
        ).json()["id"]
        run_queue(settings)
        job = finished(client, job_id)
        assert job["params"]["model"] == "genserve-shapes-motion" and job["params"]["num_frames"] == 16
        data, info = download(client, job)
    frames = _decode(data)
    assert (info.frames, info.width, info.height) == (16, 64, 64)
    classifier = load_classifier(BUILTIN_MODELS_DIR / "genserve-shapes" / "eval" / CLASSIFIER_FILE)
    shapes = classify_shapes(classifier, list(frames))
    assert shapes.count("star") >= 14, shapes
    measured = [pixels.measure(frame) for frame in frames]
    assert all((m.bg, m.fg) == ("black", "green") for m in measured), measured


def _decode(data: bytes) -> np.ndarray:
    import av

    with av.open(io.BytesIO(data)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_post_upscale_runs_the_upscaler_on_every_frame(video_models_dir, tmp_path):
    """post.upscale with the shipped genserve-shapes-2x: every frame doubled before encoding."""
    settings = make_settings(video_models_dir, tmp_path / "data").model_copy(update={"builtin_models": True})
    body = {"model": "tiny-ltx", "prompt": "x", "num_frames": 9, "width": 32, "height": 32,
            "post": {"upscale": "genserve-shapes-2x", "interpolate": 2}, **FAST}  # fmt: skip
    with api(settings) as client:
        missing = client.post("/v1/video/jobs", json={**body, "post": {"upscale": "nope"}})
        assert missing.status_code == 422 and missing.json()["detail"][0]["loc"][-1] == "post.upscale"
        job_id = client.post("/v1/video/jobs", json=body).json()["id"]
        run_queue(settings)
        job = finished(client, job_id)
        _, info = download(client, job)
        assert (info.frames, info.width, info.height) == (17, 64, 64)
        stages = [data["stage"] for kind, data in events_of(client, job_id) if kind == "stage"]
        assert stages == ["denoise", "decode", "upscale", "interpolate", "encode"]

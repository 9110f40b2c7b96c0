"""The HTTP API against a live `genserve serve` on a loopback port, with a supervised worker."""

from __future__ import annotations

import io
import json
import threading
import time

import httpx
import pytest
from PIL import Image

from tests.helpers import LiveServer, read_events, wait_job

FAST = {"steps": 4, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def server(tiny_models_dir, tmp_path_factory):
    live = LiveServer(
        models_dir=tiny_models_dir,
        data_dir=tmp_path_factory.mktemp("data"),
        env={
            "GENSERVE_LIMITS__MAX_WIDTH": "512",
            "GENSERVE_LIMITS__MAX_HEIGHT": "512",
            "GENSERVE_LIMITS__MAX_PIXELS": str(256 * 512),
            "GENSERVE_LIMITS__MAX_STEPS": "60",
            "GENSERVE_LIMITS__MAX_NUM_IMAGES": "3",
            "GENSERVE_LIMITS__MAX_PROMPT_CHARS": "100",
            "GENSERVE_LIMITS__ALLOWED_MODELS": json.dumps(["tiny-sd15", "tiny-sdxl"]),
        },
    ).start()
    yield live
    live.stop()


@pytest.fixture
def client(server):
    with server.client() as client:
        yield client


def submit(client, **body):
    response = client.post("/v1/jobs", json={"prompt": "a red circle", **FAST, **body})
    assert response.status_code in (200, 202), response.text
    return response.json()


def test_job_succeeds_and_png_carries_parameters(client):
    job = submit(client, seed=7, num_images=2, sampler="dpmpp_2m")
    assert job["state"] in ("queued", "running")
    assert job["params"]["model"] == "tiny-sd15" and job["params"]["seed"] == 7
    done = wait_job(client, job["id"])
    assert done["state"] == "succeeded", done
    assert done["attempts"] == 1
    assert len(done["images"]) == 2
    for index, ref in enumerate(done["images"]):
        response = client.get(ref["url"])
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(response.content))
        assert image.size == (64, 64)
        assert f"Seed: {7 + index}" in image.text["parameters"]
        assert "Sampler: DPM++ 2M" in image.text["parameters"]
        assert json.loads(image.text["genserve"])["seed"] == 7 + index


def test_same_seed_same_pixels_over_http(client):
    first = wait_job(client, submit(client, seed=11)["id"])
    second = wait_job(client, submit(client, seed=11)["id"])
    other = wait_job(client, submit(client, seed=12)["id"])
    pixels = [client.get(job["images"][0]["url"]).content for job in (first, second, other)]
    decoded = [Image.open(io.BytesIO(data)).tobytes() for data in pixels]
    assert decoded[0] == decoded[1]
    assert decoded[0] != decoded[2]


def test_events_arrive_in_order_and_last_event_id_resumes(client):
    job = submit(client, steps=6, seed=3)
    events = read_events(client, job["id"])
    types = [event.type for event in events]
    assert types[0] == "queued" and "queue_position" in events[0].data
    assert types[1] == "started"
    assert types[-1] == "succeeded"
    progress = [event.data for event in events if event.type == "progress"]
    assert [p["step"] for p in progress] == list(range(1, 7))
    assert progress[-1]["percent"] == 100.0 and all("eta_s" in p for p in progress)
    assert [event.id for event in events] == list(range(1, len(events) + 1))
    previews = [event.data for event in events if event.type == "preview"]
    assert [p["step"] for p in previews] == [2, 4]  # the server default: every 2 steps, not the last
    assert previews[0]["images"][0].startswith("data:image/jpeg;base64,")
    assert events[-1].data["images"][0]["url"].startswith("/v1/images/")

    resumed = read_events(client, job["id"], last_event_id=3)
    assert [(e.id, e.type, e.data) for e in resumed] == [(e.id, e.type, e.data) for e in events[3:]]


def test_generate_stream_submits_and_streams(client):
    from tests.helpers import parse_sse

    with client.stream("POST", "/v1/generate_stream", json={"prompt": "x", **FAST}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        job_id = response.headers["x-job-id"]
        events = list(parse_sse(response.iter_lines()))
    assert events[0].type == "queued" and events[-1].type == "succeeded"
    assert client.get(f"/v1/jobs/{job_id}").json()["state"] == "succeeded"


def test_idempotent_resubmit_and_conflict(client):
    body = {"prompt": "idempotent", **FAST, "seed": 5}
    first = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "key-1"})
    again = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "key-1"})
    via_body = client.post("/v1/jobs", json={**body, "request_id": "key-1"})
    assert first.status_code == 202 and again.status_code == 200 and via_body.status_code == 200
    assert first.json()["id"] == again.json()["id"] == via_body.json()["id"]
    conflict = client.post("/v1/jobs", json={**body, "seed": 6}, headers={"Idempotency-Key": "key-1"})
    assert conflict.status_code == 409
    assert conflict.json()["job_id"] == first.json()["id"]


def test_list_jobs_newest_first_paginated(client):
    ids = [submit(client, prompt=f"list {i}")["id"] for i in range(3)]
    page = client.get("/v1/jobs", params={"limit": 2}).json()
    assert [item["id"] for item in page["items"]] == ids[::-1][:2]
    assert page["total"] >= 3 and page["limit"] == 2
    second = client.get("/v1/jobs", params={"limit": 2, "offset": 1}).json()
    assert second["items"][0]["id"] == ids[1]


def _limit_cases():
    return [
        ({"width": 520}, "width", "512"),
        ({"height": 520}, "height", "512"),
        ({"width": 512, "height": 512}, "width", "max_pixels"),
        ({"width": 100}, "width", "multiple of 8"),
        ({"steps": 0}, "steps", "greater than or equal to 1"),
        ({"steps": 61}, "steps", "60"),
        ({"cfg_scale": 31}, "cfg_scale", "30"),
        ({"cfg_scale": -1}, "cfg_scale", "0"),
        ({"num_images": 4}, "num_images", "3"),
        ({"prompt": "x" * 101}, "prompt", "100"),
        ({"negative_prompt": "x" * 101}, "negative_prompt", "100"),
        ({"model": "no-such-model"}, "model", "not registered"),
        ({"model": "tiny-sd3"}, "model", "allowed"),
        ({"sampler": "plms"}, "sampler", "euler"),
        ({"surprise": 1}, "surprise", "Extra inputs are not permitted"),
        ({"seed": -1}, "seed", "greater than or equal to 0"),
        ({"prompt": ""}, "prompt", "at least 1"),
    ]


@pytest.mark.parametrize(("override", "field", "limit_text"), _limit_cases())
def test_every_limit_returns_422_naming_field_and_limit(client, override, field, limit_text):
    response = client.post("/v1/jobs", json={"prompt": "ok", **FAST, **override})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert any(item["loc"][-1] == field and limit_text in item["msg"] for item in detail), detail


def test_cancel_queued_job_is_immediate(client, server):
    # A long job occupies the single worker, so the next one waits in the queue.
    blocker = submit(client, steps=60, width=128, height=128)
    queued = submit(client, prompt="to cancel")
    canceled = client.delete(f"/v1/jobs/{queued['id']}").json()
    assert canceled["state"] == "canceled"
    client.delete(f"/v1/jobs/{blocker['id']}")
    wait_job(client, blocker["id"])
    assert client.get(f"/v1/jobs/{queued['id']}").json()["state"] == "canceled"
    assert [e.type for e in read_events(client, queued["id"])] == ["queued", "canceled"]


def test_cancel_running_job_stops_within_one_step(client, server):
    job = submit(client, steps=60, width=128, height=128)
    seen: list = []
    # Its own connection: the stream stays open while the main thread cancels.
    reader = threading.Thread(
        target=lambda: read_events(httpx.Client(base_url=server.url), job["id"], into=seen)
    )
    reader.start()
    deadline = time.monotonic() + 60
    while not any(e.type == "progress" and e.data["step"] >= 3 for e in seen):
        assert time.monotonic() < deadline, "job never progressed"
        time.sleep(0.01)
    response = client.delete(f"/v1/jobs/{job['id']}")
    canceled_at = time.time()
    assert response.status_code == 200
    reader.join(timeout=60)
    assert seen[-1].type == "canceled", (response.json(), [(e.type, e.data.get("step")) for e in seen])
    progress = [e.data for e in seen if e.type == "progress"]
    assert progress[-1]["step"] < 60
    # The step in flight when the cancel landed may finish; no further step does.
    after_cancel = [p["step"] for p in progress if p["ts"] > canceled_at]
    assert len(after_cancel) <= 1, after_cancel
    assert client.get(f"/v1/jobs/{job['id']}").json()["state"] == "canceled"


def test_models_health_ready_metrics_docs(client):
    models = {m["name"]: m for m in client.get("/v1/models").json()["data"]}
    assert {"tiny-sd15", "tiny-sdxl", "tiny-sd3"} <= set(models)
    assert models["tiny-sd15"]["family"] == "sd15" and models["tiny-sd15"]["loaded"] is True
    assert models["tiny-sd15"]["default"] is True
    assert models["tiny-sdxl"]["family"] == "sdxl" and models["tiny-sd3"]["family"] == "sd3"
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/readyz").json()["ready"] is True
    metrics = client.get("/metrics").text
    assert "genserve_queue_depth" in metrics
    assert 'genserve_jobs{state="succeeded"}' in metrics
    assert "genserve_step_seconds_bucket" in metrics
    assert client.get("/docs").status_code == 200
    assert "/v1/jobs" in client.get("/openapi.json").json()["paths"]


def test_unknown_job_and_image_are_404(client):
    assert client.get("/v1/jobs/nope").status_code == 404
    assert client.delete("/v1/jobs/nope").status_code == 404
    assert client.get("/v1/images/nope-0").status_code == 404
    assert client.get("/v1/images/..%2Fsecret").status_code == 404


def test_other_family_runs_per_request(client):
    job = wait_job(client, submit(client, model="tiny-sdxl")["id"])
    assert job["state"] == "succeeded", job
    assert job["params"]["model"] == "tiny-sdxl"


def _histogram_buckets(metrics_text: str, name: str) -> dict[float, float]:
    buckets = {}
    for line in metrics_text.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float(bound)] = float(line.rsplit(" ", 1)[1])
    return buckets


def test_requests_queued_behind_a_busy_worker_run_as_one_batch(client):
    before = _histogram_buckets(client.get("/metrics").text, "genserve_batch_images")
    blocker = submit(client, steps=40, width=96, height=96)
    wait_for_running = time.monotonic() + 60
    while client.get(f"/v1/jobs/{blocker['id']}").json()["state"] != "running":
        assert time.monotonic() < wait_for_running
        time.sleep(0.02)
    # Four compatible requests from different clients, each with its own prompt, seed and CFG.
    followers = [
        client.post(
            "/v1/jobs",
            json={"prompt": f"batch {i}", **FAST, "seed": 100 + i, "cfg_scale": 2.0 + i},
            headers={"X-Client-Id": f"client-{i}"},
        ).json()
        for i in range(4)
    ]
    done = [wait_job(client, job["id"]) for job in [blocker, *followers]]
    assert all(job["state"] == "succeeded" for job in done)
    started = {job["started_at"] for job in done[1:]}
    assert len(started) == 1  # claimed together, in one transaction
    after = _histogram_buckets(client.get("/metrics").text, "genserve_batch_images")
    # Exactly one new batch of 4 images: it lands in the le=4 bucket and not in le=3.
    grew = {bound: after[bound] - before.get(bound, 0) for bound in after}
    assert grew[4.0] - grew[3.0] == 1


def test_jobs_carry_queue_estimate_and_standing(client):
    blocker = submit(client, steps=30, width=96, height=96)
    waiting = [submit(client, prompt=f"standing {i}") for i in range(2)]
    second = client.get(f"/v1/jobs/{waiting[1]['id']}").json()
    assert second["queue"] == "short" and second["estimated_seconds"] > 0
    if second["state"] == "queued":  # the worker may have reached it already on a fast machine
        assert second["queue_position"] >= 1 and second["estimated_start_at"] is not None
    for job in [blocker, *waiting]:
        wait_job(client, job["id"])
    estimate = client.post("/v1/estimate", json={"steps": 20, "gpu_price_per_hour": 2.5}).json()
    assert estimate["model"] == "tiny-sd15" and estimate["seconds_per_image"] > 0
    assert estimate["cost_per_1000"] == pytest.approx(2.5 / (estimate["images_per_hour"] / 1000), rel=1e-6)


def test_long_jobs_go_to_the_long_queue(tiny_models_dir, tmp_path):
    server = LiveServer(
        tiny_models_dir,
        tmp_path,
        env={"GENSERVE_WORKERS": "0", "GENSERVE_LONG_QUEUE_THRESHOLD_SECONDS": "0.001"},
    ).start(wait_ready=False)
    try:
        with server.client() as client:
            job = client.post("/v1/jobs", json={"prompt": "x", "steps": 50}).json()
            assert job["queue"] == "long"
            metrics = client.get("/metrics").text
            assert 'genserve_queue_depth{queue="long"} 1.0' in metrics
    finally:
        server.stop()


def test_trace_id_follows_the_request(client):
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    response = client.post(
        "/v1/jobs",
        json={"prompt": "traced", **FAST},
        headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"},
    )
    assert response.headers["x-trace-id"] == trace
    fresh = client.post("/v1/jobs", json={"prompt": "untraced", **FAST})
    assert len(fresh.headers["x-trace-id"]) == 32 and fresh.headers["x-trace-id"] != trace

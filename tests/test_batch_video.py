"""Batch specs of video items (`kind: video`): expansion checked as the video API checks a request,
located errors, keys that de-duplicate across specs, clips written with the container's extension,
and the same spec sent to /v1/batches. Tiny LTX model; image batches are tests/test_batch.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from genserve.batch.expand import expand_video, store_spec_pictures
from genserve.batch.spec import SpecError, load_spec
from genserve.config import Settings
from genserve.engine.models.registry import scan_models
from genserve.engine.video.encode import probe_video

VIDEO = {"num_frames": 9, "fps": 8, "output": {"container": "webm"}}
VARIANTS = {"seed": [1, 2], "size": ["32x32"], "steps": [2]}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from genserve.engine.models.video_fixtures import write_tiny_video_pipeline

    root = tmp_path_factory.mktemp("batch-video-models")
    write_tiny_video_pipeline("ltx", root / "tiny-ltx")
    return root


@pytest.fixture
def settings(models_dir: Path, tmp_path: Path) -> Settings:
    return Settings(
        models_dir=models_dir,
        data_dir=tmp_path / "data",
        builtin_models=False,
        default_model="tiny-ltx",
        default_video_model="tiny-ltx",
        device="cpu",
        torch_threads=1,
        workers=0,
        heartbeat_seconds=0.5,
        retry_backoff_seconds=0.05,
    )


def video_spec(**extra) -> dict:
    return {
        "kind": "video",
        "prompts": ["a red ball", "a blue star"],
        "video": VIDEO,
        "variants": VARIANTS,
        **extra,
    }


def test_video_spec_expands_to_resolved_clips_with_stable_keys(settings, tmp_path):
    models = scan_models(settings.models_dir)
    spec, base = load_spec(video_spec())
    items = expand_video(spec, base, models, settings)
    assert len(items) == 4 and len({item.key for item in items}) == 4
    first = items[0].params
    assert (first.model, first.num_frames, first.fps, first.width, first.steps, first.seed) == (
        "tiny-ltx", 9, 8, 32, 2, 1,
    )  # fmt: skip
    assert first.output.container == "webm" and first.preview_every == 0
    again = expand_video(load_spec(video_spec())[0], base, models, settings)
    assert [item.key for item in again] == [item.key for item in items]
    # Steps left out: the model's default; a long clip is planned into segments.
    plain = expand_video(
        load_spec(video_spec(variants={"size": ["32x32"]}, video={"num_frames": 17, "long": {
            "segment_frames": 9, "overlap": 2, "strategy": "extend"}}))[0], base, models, settings,
    )  # fmt: skip
    assert plain[0].params.steps == models["tiny-ltx"].default_steps or plain[0].params.steps > 2
    assert plain[0].segments == 3


@pytest.mark.parametrize(
    ("spec", "located"),
    [
        (video_spec(video={"num_frames": 10}), "prompts[0] × variants[0] (n=0).num_frames"),
        (video_spec(variants={"size": ["33x32"]}), "prompts[0] × variants[0] (n=0).width"),
        (video_spec(video={"mode": "i2v"}), "prompts[0] × variants[0] (n=0).keyframes"),
        (video_spec(video={"output": {"container": "mkv"}}), "video.output.container"),
        ({"prompts": ["x"], "video": VIDEO}, "spec: video options need kind: video"),
        (video_spec(variants={"model": ["nope"]}), "(n=0).model"),
    ],
)
def test_bad_video_specs_are_located(settings, spec, located):
    with pytest.raises(SpecError) as caught:
        parsed, base = load_spec(spec)
        expand_video(parsed, base, scan_models(settings.models_dir), settings)
    assert any(located in line for line in caught.value.errors), caught.value.errors


def test_local_video_batch_writes_clips_and_shares_items_across_specs(settings, tmp_path):
    from genserve.artifacts.inputs import InputStore
    from genserve.batch.cli import run_local

    models = scan_models(settings.models_dir)
    Image.new("RGB", (32, 32), (220, 20, 20)).save(tmp_path / "red.png")
    spec, base = load_spec(
        video_spec(prompts=["a red ball"], variants={**VARIANTS, "seed": [1]}), base_dir=tmp_path
    )
    items = expand_video(spec, base, models, settings)
    summary = run_local(spec, items, models, settings, tmp_path / "a")
    assert summary["succeeded"] == 1 and summary["failed"] == 0
    [row] = [json.loads(line) for line in (tmp_path / "a" / "manifest.jsonl").open()]
    assert row["file"].endswith(".webm") and row["num_frames"] == 9 and row["sha256"]
    info = probe_video((tmp_path / "a" / row["file"]).read_bytes())
    assert (info.frames, info.codec, info.width) == (9, "vp9", 32)
    assert (
        (tmp_path / "a" / "manifest.csv")
        .read_text()
        .startswith("index,key,state,prompt,negative_prompt,model,mode")
    )

    # A second spec with the same clip and an i2v one: the shared clip keeps its job.
    i2v = {"kind": "video", "prompts": [{"prompt": "from red", "init_image": "red.png"}],
           "video": {**VIDEO, "mode": "i2v", "output": {"container": "gif"}}, "variants": VARIANTS}  # fmt: skip
    second, base = load_spec(i2v, base_dir=tmp_path)
    second = store_spec_pictures(
        second, base, InputStore(settings.inputs_dir), settings.limits, local_files=True
    )
    both = [*items, *expand_video(second, base, models, settings)]
    assert both[1].params.keyframes[0].image.startswith("sha256:")
    merged = spec.model_copy(update={"name": "b"})
    summary = run_local(merged, items, models, settings, tmp_path / "b")
    assert summary["succeeded"] == 1
    again = [json.loads(line) for line in (tmp_path / "b" / "manifest.jsonl").open()]
    assert again[0]["job_id"] == row["job_id"]  # rendered once
    summary = run_local(second, both[1:], models, settings, tmp_path / "c")
    assert summary["succeeded"] == 2
    gifs = [json.loads(line) for line in (tmp_path / "c" / "manifest.jsonl").open()]
    assert all(r["file"].endswith(".gif") and r["init_image"].startswith("sha256:") for r in gifs)
    assert probe_video((tmp_path / "c" / gifs[0]["file"]).read_bytes()).frames == 9


def test_server_video_batch_queues_video_jobs_and_lists_their_files(settings):
    from genserve.api.app import create_app
    from tests.test_video_api import run_queue

    with TestClient(create_app(settings, supervise_workers=False)) as client:
        batch = client.post("/v1/batches", json=video_spec())
        assert batch.status_code == 202, batch.text
        batch = batch.json()
        assert batch["counts"]["total"] == 4
        jobs = client.get("/v1/video/jobs").json()
        assert jobs["total"] == 4 and {job["request_id"][:5] for job in jobs["items"]} == {"item:"}
        run_queue(settings)
        assert client.get(f"/v1/batches/{batch['id']}").json()["done"] is True
        rows = [json.loads(line) for line in client.get(batch["manifest_url"]).text.splitlines()]
        assert len(rows) == 4 and all(row["state"] == "succeeded" for row in rows)
        assert all(
            row["file"].startswith("/v1/video/files/") and row["file"].endswith(".webm") for row in rows
        )
        clip = client.get(rows[0]["file"])
        assert clip.status_code == 200 and probe_video(clip.content).frames == 9
        assert client.get(batch["manifest_url"], params={"format": "csv"}).text.startswith("index,key,state")
        # The same spec again: every clip is already made.
        assert client.post("/v1/batches", json=video_spec()).json()["counts"]["succeeded"] == 4
        bad = client.post("/v1/batches", json=video_spec(video={"num_frames": 10}))
        assert bad.status_code == 422 and "num_frames" in bad.json()["detail"][0]["msg"]

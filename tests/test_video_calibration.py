"""Video cost model calibrated like images' (issue 17): `genserve calibrate --video` times a tiny
LTX model here and stores measured / published step time in `video_timings`; `plan --video`,
/v1/video/estimate and /v1/estimate multiply by it and say so; a finished video job refines it."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from genserve.cli import app
from genserve.engine.video.plan import predicted_step_seconds, video_seconds
from genserve.scheduler.cost import EMA_ALPHA, MAX_JUMP
from genserve.scheduler.video_cost import VideoTiming
from genserve.store.video_calibration import VideoCalibrationStore

SIZE = {"num_frames": 9, "width": 32, "height": 32}
PUBLISHED = "published H100-class figures"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from genserve.engine.models.fixtures import write_tiny_pipeline
    from genserve.engine.models.video_fixtures import write_tiny_video_pipeline

    root = tmp_path_factory.mktemp("calibration-video-models")
    write_tiny_pipeline("sd15", root / "tiny-sd15")
    write_tiny_video_pipeline("ltx", root / "tiny-ltx")
    return root


def test_store_saves_refines_and_chooses_the_device(store_url):
    store = VideoCalibrationStore.from_url(store_url)
    nothing = store.speed("tiny-ltx", 2.0)
    assert (nothing.scale, nothing.calibrated, nothing.device) == (2.0, False, None)
    assert PUBLISHED in nothing.basis and "video_speed_scale 2" in nothing.basis
    # An observation without a row starts an observed one.
    first = store.observe("gpu-b", "tiny-ltx", 40.0)
    assert (first.scale, first.source, first.samples) == (40.0, "observed", 1)
    # A calibrated row: the EMA moves it, the source stays, a wild observation is clipped.
    store.save(VideoTiming("cpu", "tiny-ltx", 100.0, "calibrated", 3))
    once = store.observe("cpu", "tiny-ltx", 200.0)
    assert once.scale == pytest.approx(100 + EMA_ALPHA * 100) and once.source == "calibrated"
    twice = store.observe("cpu", "tiny-ltx", 1e6)
    clipped = once.scale * MAX_JUMP
    assert twice.scale == pytest.approx(once.scale + EMA_ALPHA * (clipped - once.scale))
    stored = store.get("cpu", "tiny-ltx")
    assert stored is not None and stored.samples == 5 and stored.updated_at is not None
    assert stored.scale == pytest.approx(twice.scale)
    # The default device: of those with a row for the model, the one with the most video rows.
    store.save(VideoTiming("cpu", "other-model", 7.0, "calibrated", 3))
    assert store.default_device("tiny-ltx") == "cpu" and store.default_device("never") == "cpu"
    speed = store.speed("tiny-ltx", 2.0)
    assert speed.calibrated and speed.device == "cpu" and speed.scale == pytest.approx(twice.scale)
    assert speed.basis.startswith("calibrated on cpu for tiny-ltx")
    named = store.speed("tiny-ltx", 2.0, device="gpu-b")
    assert named.scale == 40.0 and named.basis.startswith("calibrated on gpu-b") and "observed" in named.basis
    assert not store.speed("tiny-ltx", 2.0, device="gpu-c").calibrated
    with pytest.raises(ValueError):
        store.save(VideoTiming("cpu", "tiny-ltx", 1.0, "default", 0))
    with pytest.raises(ValueError):
        store.observe("cpu", "tiny-ltx", float("nan"))


def _gpu_seconds(output: str) -> float:
    match = re.search(r"GPU-seconds per clip\s*│\s*([0-9.]+) s", output)
    assert match, output
    return float(match.group(1))


def test_calibrate_video_stores_the_scale_and_plan_uses_it(models_dir, tmp_path):
    env = {
        "GENSERVE_MODELS_DIR": str(models_dir),
        "GENSERVE_DATA_DIR": str(tmp_path / "data"),
        "GENSERVE_BUILTIN_MODELS": "false",
        "GENSERVE_DEFAULT_VIDEO_MODEL": "tiny-ltx",
        "GENSERVE_DEVICE": "cpu",
        "GENSERVE_TORCH_THREADS": "1",
        "COLUMNS": "200",
    }
    runner = CliRunner()
    plan = ["plan", "--video", "--model", "tiny-ltx", "--frames", "9", "--width", "32", "--height", "32",
            "--steps", "20"]  # fmt: skip
    before = runner.invoke(app, plan, env=env)
    assert before.exit_code == 0, before.output
    assert f"basis: step time from latent tokens fitted to {PUBLISHED}" in before.output
    assert _gpu_seconds(before.output) == pytest.approx(video_seconds("ltx", 9, 32, 32, 20), abs=6e-4)

    args = ["calibrate", "--video", "tiny-ltx", "--frames", "9", "--width", "32", "--height", "32",
            "--video-steps", "4"]  # fmt: skip
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    assert "measured s/step" in result.output and "stored the scale" in result.output
    store = VideoCalibrationStore.from_url(f"sqlite:///{tmp_path / 'data' / 'genserve.db'}")
    rows = store.all()
    assert [(t.device, t.model, t.source, t.samples) for t in rows] == [("cpu", "tiny-ltx", "calibrated", 3)]
    scale = rows[0].scale
    # A CPU runs even a tiny model far slower than the published H100 figure's floor.
    assert scale > 1 and f"{scale:.4g}" in result.output
    measured = re.search(r"tiny-ltx\s*│\s*9\s*│\s*32x32\s*│\s*4\s*│\s*([0-9.]+)", result.output)
    assert measured, result.output
    predicted = predicted_step_seconds("ltx", 9, 32, 32)
    assert float(measured.group(1)) / predicted == pytest.approx(scale, rel=1e-2)

    after = runner.invoke(app, plan, env=env)
    assert after.exit_code == 0, after.output
    assert "basis: calibrated on cpu for tiny-ltx (genserve calibrate --video, 3 samples)" in after.output
    assert PUBLISHED in after.output and "video_speed_scale" not in after.output
    assert _gpu_seconds(after.output) == pytest.approx(video_seconds("ltx", 9, 32, 32, 20, scale), abs=6e-4)
    too_few = runner.invoke(app, [*args[:-1], "2"], env=env)
    assert too_few.exit_code == 2  # --video-steps min=3
    image = runner.invoke(app, ["calibrate", "--video", "tiny-sd15"], env=env)
    assert image.exit_code == 1 and "not a video model" in image.output


def test_estimates_use_the_stored_scale_and_a_job_refines_it(models_dir, tmp_path):
    from fastapi.testclient import TestClient

    from genserve.api.app import create_app
    from genserve.artifacts.images import ImageStore
    from genserve.config import Settings
    from genserve.engine.engine import Engine
    from genserve.engine.models.registry import scan_models
    from genserve.store.jobs import JobStore
    from genserve.worker.loop import Worker

    settings = Settings(
        data_dir=tmp_path / "data", models_dir=models_dir, builtin_models=False, default_model="tiny-sd15",
        default_video_model="tiny-ltx", workers=0, heartbeat_seconds=0.5, video_speed_scale=3.0,
    )  # fmt: skip
    body = {"model": "tiny-ltx", "prompt": "a red ball", **SIZE, "steps": 4, "seed": 3}
    client = TestClient(create_app(settings, supervise_workers=False))
    published = client.post("/v1/video/estimate", json=body).json()
    assert published["calibrated"] is False and published["device"] is None
    assert PUBLISHED in published["basis"] and "video_speed_scale 3" in published["basis"]
    assert published["estimated_seconds"] == pytest.approx(round(video_seconds("ltx", 9, 32, 32, 4, 3.0), 3))

    store = VideoCalibrationStore.from_url(settings.resolved_store_url)
    store.save(VideoTiming("cpu", "tiny-ltx", 50.0, "calibrated", 3))
    expected = round(video_seconds("ltx", 9, 32, 32, 4, 50.0), 3)
    for path in ("/v1/video/estimate", "/v1/estimate"):
        data = client.post(path, json=body).json()
        assert data["estimated_seconds"] == pytest.approx(expected), path
        assert data["calibrated"] is True and data["device"] == "cpu", path
        assert data["basis"].startswith("calibrated on cpu for tiny-ltx"), path

    # The queued job was planned with the stored scale, and running it refines the scale.
    job = client.post("/v1/video/jobs", json=body).json()
    assert job["estimated_seconds"] == pytest.approx(video_seconds("ltx", 9, 32, 32, 4, 50.0))
    jobs = JobStore.from_url(settings.resolved_store_url)
    worker = Worker(
        settings, jobs, Engine(scan_models(models_dir), device="cpu"), ImageStore(settings.images_dir), "w"
    )
    worker.work(threading.Event(), until_idle=True)
    worker.leases.close()
    jobs.close()
    assert client.get(f"/v1/video/jobs/{job['id']}").json()["state"] == "succeeded"
    refined = store.get("cpu", "tiny-ltx")
    assert refined is not None and (refined.source, refined.samples) == ("calibrated", 4)
    # One EMA step from 50 towards an observation clipped to [50/3, 150].
    low, high = 50 + EMA_ALPHA * (50 / MAX_JUMP - 50), 50 + EMA_ALPHA * (50 * MAX_JUMP - 50)
    assert low - 1e-9 <= refined.scale <= high + 1e-9 and refined.scale != 50.0
    again = client.post("/v1/video/estimate", json=body).json()
    assert again["estimated_seconds"] == pytest.approx(
        round(video_seconds("ltx", 9, 32, 32, 4, refined.scale), 3)
    )

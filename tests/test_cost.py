"""The cost model: the formula, the reference defaults, lookup precedence, refinement, the stored
timings on both backends, POST /v1/estimate, `genserve plan`, and a real (tiny) calibration."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from genserve.cli import app as cli_app
from genserve.config import Settings
from genserve.scheduler.cost import (
    EMA_ALPHA,
    PNG_S_PER_MEGAPIXEL,
    REFERENCE_DEVICE,
    StepTiming,
    default_device,
    default_timing,
    estimate,
    lookup,
    refine,
    seconds_per_batch,
    steady_step_seconds,
)
from genserve.store.calibration import CalibrationStore

DEVICE = "NVIDIA Test GPU"


def timing(**changes: object) -> StepTiming:
    base = StepTiming(DEVICE, "tiny-sd15", 64, 64, 4, 0.5, 0.1, "calibrated", 3)
    return replace(base, **changes)


# The formula


def test_estimate_is_the_formula_with_hand_computed_numbers():
    # T = 0.5 + 20 × 0.1 = 2.5 s; images/hour = 3600 × 4 / 2.5 = 5760;
    # cost per 1,000 = 2.50 × 2 / 5.76 = 0.868055...; GPU-hours for 10,000 = 10000 / 5760 × 2 = 3.4722...
    result = estimate(timing(), steps=20, batch=4, gpu_price_per_hour=2.50, gpus=2, images=10_000)
    assert result.seconds_per_batch == pytest.approx(2.5)
    assert result.seconds_per_image == pytest.approx(0.625)
    assert result.images_per_hour == pytest.approx(5760.0)
    assert result.cost_per_1000 == pytest.approx(0.8680555556)
    assert result.gpu_hours == pytest.approx(3.4722222222)
    assert result.total_cost == pytest.approx(8.6805555556)
    assert result.total_cost == pytest.approx(result.cost_per_1000 * 10)
    assert (result.overhead_s, result.step_s, result.steps, result.batch) == (0.5, 0.1, 20, 4)
    assert (result.width, result.height, result.gpus) == (64, 64, 2)
    assert result.source == "calibrated" and result.calibrated
    assert result.basis.startswith(f"calibrated on {DEVICE} for tiny-sd15 at 64x64 batch 4")
    assert seconds_per_batch(timing(), 20) == pytest.approx(2.5)


def test_estimate_without_price_or_images():
    result = estimate(timing(), steps=10, batch=4, gpu_price_per_hour=None)
    assert result.images_per_hour == pytest.approx(3600 * 4 / 1.5)
    assert result.cost_per_1000 is None and result.gpu_hours is None and result.total_cost is None
    with_images = estimate(timing(), steps=10, batch=4, gpu_price_per_hour=None, images=960)
    assert with_images.gpu_hours == pytest.approx(0.1) and with_images.total_cost is None


def test_estimate_rejects_a_timing_for_another_batch_and_bad_inputs():
    with pytest.raises(ValueError, match="batch 4, not 2"):
        estimate(timing(), steps=10, batch=2, gpu_price_per_hour=1.0)
    with pytest.raises(ValueError):
        estimate(timing(), steps=0, batch=4, gpu_price_per_hour=1.0)
    with pytest.raises(ValueError):
        estimate(timing(overhead_s=0.0, step_s=0.0), steps=10, batch=4, gpu_price_per_hour=1.0)


# Defaults from the H100 reference grid


def test_default_at_a_grid_point_uses_the_grid():
    result = default_timing("sd15", 512, 512, 8, "cuda")
    assert result.step_s == pytest.approx(0.05244)
    # O = 0.05 s rest + VAE decode (22.8 ms + 7 × (67.0 − 22.8) / 3 ms) + PNG of 8 × 0.262144 MP
    decode = (22.8 + 7 * (67.0 - 22.8) / 3) / 1000
    assert result.overhead_s == pytest.approx(0.05 + decode + PNG_S_PER_MEGAPIXEL * 0.262144 * 8)
    assert (result.source, result.scaled_from, result.device) == ("default", None, REFERENCE_DEVICE)


def test_default_interpolates_between_grid_batches_and_sizes():
    between_batches = default_timing("sd15", 512, 512, 3, "cuda")
    assert between_batches.step_s == pytest.approx((0.02459 + 0.03213) / 2)
    assert between_batches.scaled_from == "H100 grid 512x512 batch 2/4"
    # 896² lies between 768² and 1024² at f = (802816 − 589824) / (1048576 − 589824)
    between_sizes = default_timing("sdxl", 896, 896, 1, "cuda")
    f = (896**2 - 768**2) / (1024**2 - 768**2)
    assert between_sizes.step_s == pytest.approx(0.05618 + (0.05862 - 0.05618) * f)
    assert between_sizes.scaled_from == "H100 grid 768x768+1024x1024 batch 1"
    # Beyond the grid: proportional in batch and pixels.
    beyond = default_timing("sdxl", 1280, 1280, 16, "cuda")
    assert beyond.step_s == pytest.approx(0.48534 * 2)
    bigger = default_timing("sdxl", 2560, 1280, 8, "cuda")
    assert bigger.step_s == pytest.approx(0.48534 * 2)


@pytest.mark.parametrize(
    ("family", "px", "batch", "measured_s"),
    # The plain-diffusers pipeline runs of the baseline file: 30 Euler steps, no PNG encoding.
    [("sd15", 512, 1, 0.863), ("sd15", 512, 8, 1.797), ("sdxl", 1024, 1, 2.716), ("sdxl", 1024, 4, 5.209)],
)
def test_defaults_reproduce_the_reference_pipeline_runs(family, px, batch, measured_s):
    result = default_timing(family, px, px, batch, "cuda")
    png = PNG_S_PER_MEGAPIXEL * px * px / 1e6 * batch
    assert seconds_per_batch(result, 30) - png == pytest.approx(measured_s, rel=0.12)


def test_cpu_and_unknown_families_get_labelled_rough_defaults():
    cpu = default_timing("sd15", 512, 512, 2, "cpu")
    assert cpu.source == "rough default" and cpu.device == "cpu"
    assert cpu.step_s == pytest.approx(2 * default_timing("sd15", 512, 512, 1, "cpu").step_s)
    result = estimate(cpu, steps=20, batch=2, gpu_price_per_hour=None)
    assert not result.calibrated and "rough default" in result.basis and "CPU" in result.basis
    unknown = default_timing("flux", 1024, 1024, 1, "cuda")
    assert (
        unknown.source == "rough default"
        and "unknown family 'flux'" in estimate(unknown, steps=20, batch=1, gpu_price_per_hour=None).basis
    )
    assert unknown.step_s == default_timing("sdxl", 1024, 1024, 1, "cuda").step_s


# Choosing a timing


def test_lookup_prefers_exact_calibration_then_scaled_measurements_then_default():
    calibrated = timing(batch=2, overhead_s=0.2, step_s=0.05)
    observed = timing(batch=1, overhead_s=0.1, step_s=0.03, source="observed", samples=0, observations=5)
    rows = [observed, calibrated]
    where = dict(device=DEVICE, model="tiny-sd15", family="sd15", width=64, height=64)

    assert lookup(rows, **where, batch=2) == calibrated
    assert lookup(rows, **where, batch=1) == observed
    # Batch 4 lies above the largest measured batch: proportional from batch 2.
    scaled = lookup(rows, **where, batch=4)
    assert (scaled.overhead_s, scaled.step_s) == pytest.approx((0.4, 0.1))
    assert scaled.source == "calibrated" and scaled.scaled_from == "calibrated 64x64 batch 2"
    assert estimate(scaled, steps=10, batch=4, gpu_price_per_hour=None).source == (
        "scaled from calibrated 64x64 batch 2"
    )
    # Only an observation for this model: scaled from it.
    only_observed = lookup([observed], **where, batch=3)
    assert only_observed.source == "observed" and only_observed.step_s == pytest.approx(0.09)
    # Twice the pixels: proportional from the largest measured size.
    wider = lookup(rows, **{**where, "width": 128}, batch=2)
    assert wider.step_s == pytest.approx(0.1)
    # Nothing measured for this device or model: the default for the family.
    for other in ({"device": "cpu"}, {"model": "tiny-sd15-other"}):
        fallback = lookup(rows, **{**where, **other}, batch=2)
        assert fallback.source in ("default", "rough default") and not fallback.measured


def test_default_device_is_the_calibrated_one():
    rows = [timing(), timing(batch=1), timing(device="cpu", model="other")]
    assert default_device(rows, "tiny-sd15") == DEVICE
    assert default_device(rows, "other") == "cpu"
    assert default_device(rows, "never-calibrated") == DEVICE
    assert default_device([], "tiny-sd15") == REFERENCE_DEVICE


# Refinement


def test_refine_is_an_exponential_moving_average_that_keeps_calibrated_overhead():
    previous = timing(step_s=1.0, overhead_s=0.5)
    key = dict(device=DEVICE, model="tiny-sd15", width=64, height=64, batch=4)
    once = refine(previous, 2.0, **key, observed_overhead_s=9.0)
    assert EMA_ALPHA == 0.2
    assert once.step_s == pytest.approx(1.0 + 0.2 * (2.0 - 1.0))
    assert once.overhead_s == 0.5 and once.source == "calibrated" and once.observations == 1
    twice = refine(once, 2.0, **key)
    assert twice.step_s == pytest.approx(1.2 + 0.2 * 0.8) and twice.observations == 2
    # An outlier is clipped to 3× before it is averaged in.
    assert refine(previous, 100.0, **key).step_s == pytest.approx(1.0 + 0.2 * (3.0 - 1.0))
    with pytest.raises(ValueError):
        refine(previous, 1.0, **{**key, "batch": 2})
    with pytest.raises(ValueError):
        refine(previous, 0.0, **key)


def test_refine_starts_and_averages_an_observed_row():
    key = dict(device=DEVICE, model="m", width=64, height=64, batch=1)
    first = refine(None, 0.5, **key, observed_overhead_s=1.0)
    assert (first.step_s, first.overhead_s, first.source, first.observations) == (0.5, 1.0, "observed", 1)
    second = refine(first, 0.5, **key, observed_overhead_s=2.0)
    assert second.overhead_s == pytest.approx(1.2)  # no calibration: the observed O is averaged too


def test_steady_step_seconds_takes_the_median_per_batch_size():
    samples = [(4, 0.1), (4, 0.1), (4, 0.9), (3, 0.08), (3, 0.06)]
    assert steady_step_seconds(samples) == {4: pytest.approx(0.1)}  # too few steps with 3 images
    assert steady_step_seconds(samples, min_samples=1) == {3: pytest.approx(0.07), 4: pytest.approx(0.1)}


# The stored timings


def test_calibration_store_saves_upserts_and_observes(store_url):
    calibration = CalibrationStore.from_url(store_url)
    row = timing(batch=2)
    calibration.save(row)
    assert calibration.get(DEVICE, "tiny-sd15", 64, 64, 2) == row
    assert calibration.get(DEVICE, "tiny-sd15", 64, 64, 3) is None
    calibration.save(replace(row, step_s=0.2))  # upsert: the same key is replaced
    assert calibration.all() == [replace(row, step_s=0.2)]

    refined = calibration.observe(DEVICE, "tiny-sd15", 64, 64, 2, 0.4)
    assert refined.step_s == pytest.approx(0.2 + EMA_ALPHA * 0.2) and refined.overhead_s == 0.5
    assert calibration.get(DEVICE, "tiny-sd15", 64, 64, 2) == refined
    new = calibration.observe("cpu", "tiny-sd15", 64, 64, 1, 0.05, overhead_s=0.01)
    assert new.source == "observed" and calibration.get("cpu", "tiny-sd15", 64, 64, 1) == new
    assert {t.device for t in calibration.all()} == {DEVICE, "cpu"}
    assert calibration.all(device="cpu") == [new]
    assert calibration.default_device("tiny-sd15") in (DEVICE, "cpu")

    found = calibration.lookup(device=DEVICE, model="tiny-sd15", family="sd15", width=64, height=64, batch=2)
    assert found == refined
    with pytest.raises(ValueError):
        calibration.save(default_timing("sd15", 512, 512, 1, "cuda"))


# POST /v1/estimate


@pytest.fixture
def api(tiny_models_dir, tmp_path):
    settings = Settings(
        data_dir=tmp_path / "data",
        models_dir=tiny_models_dir,
        default_model="tiny-sd15",
        builtin_models=False,
        workers=0,
    )
    from genserve.api.app import create_app

    app = create_app(settings, supervise_workers=False)
    with TestClient(app) as client:
        yield client, CalibrationStore(app.state.services.store.engine)


def test_estimate_endpoint_uses_a_stored_calibration(api):
    client, calibration = api
    calibration.save(StepTiming("cpu", "tiny-sd15", 64, 64, 2, 0.3, 0.05, "calibrated", 3))
    body = {"model": "tiny-sd15", "steps": 10, "width": 64, "height": 64, "num_images": 2}
    response = client.post("/v1/estimate", json={**body, "gpu_price_per_hour": 3.0, "images": 1000})
    assert response.status_code == 200, response.text
    data = response.json()
    # T = 0.3 + 10 × 0.05 = 0.8 s for 2 images: 9,000 images/hour; 3.0 / 9 = 0.3333 per 1,000
    assert data["seconds_per_batch"] == pytest.approx(0.8)
    assert data["seconds_per_image"] == pytest.approx(0.4)
    assert data["images_per_hour"] == pytest.approx(9000)
    assert data["cost_per_1000"] == pytest.approx(1 / 3)
    assert data["gpu_hours"] == pytest.approx(1000 / 9000)
    assert data["total_cost"] == pytest.approx(1 / 3)
    assert (data["device"], data["batch"], data["source"], data["calibrated"]) == (
        "cpu",
        2,
        "calibrated",
        True,
    )
    assert data["basis"].startswith("calibrated on cpu for tiny-sd15 at 64x64 batch 2")

    scaled = client.post("/v1/estimate", json={**body, "batch": 4}).json()
    assert scaled["source"] == "scaled from calibrated 64x64 batch 2"
    assert scaled["seconds_per_batch"] == pytest.approx(0.6 + 10 * 0.1)
    assert scaled["cost_per_1000"] is None


def test_estimate_endpoint_defaults_and_limits(api):
    client, _ = api
    data = client.post("/v1/estimate", json={"model": "tiny-sdxl", "steps": 30}).json()
    assert data["device"] == REFERENCE_DEVICE and not data["calibrated"]
    assert (data["width"], data["height"], data["batch"]) == (64, 64, 1)  # the model's native size
    assert data["basis"].startswith(
        "default estimate from the H100 reference grid (2026-11-22, plain diffusers) for sdxl"
    )
    assert client.post("/v1/estimate", json={"steps": 1000}).status_code == 422
    assert client.post("/v1/estimate", json={"model": "nope"}).status_code == 422
    assert client.post("/v1/estimate", json={"batch": 0}).status_code == 422


# genserve plan and genserve calibrate


@pytest.fixture
def cli_env(tiny_models_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("GENSERVE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("GENSERVE_MODELS_DIR", str(tiny_models_dir))
    monkeypatch.setenv("GENSERVE_DEFAULT_MODEL", "tiny-sd15")
    monkeypatch.setenv("GENSERVE_BUILTIN_MODELS", "false")
    monkeypatch.delenv("GENSERVE_STORE_URL", raising=False)
    return Settings()


PLAN = ["plan", "--model", "tiny-sd15", "--width", "64", "--height", "64", "--steps", "10"]


def test_plan_prints_figures_and_calibrated_basis(cli_env):
    CalibrationStore.from_url(cli_env.resolved_store_url).save(
        StepTiming("cpu", "tiny-sd15", 64, 64, 2, 0.3, 0.05, "calibrated", 3)
    )
    result = CliRunner().invoke(cli_app, [*PLAN, "--batch", "2", "--gpu-price", "2.50", "--images", "10000"])
    assert result.exit_code == 0, result.output
    # T = 0.8 s, 0.4 s/image, 9,000 images/hour, 2.50 / 9 = 0.278 per 1,000, 1.111 GPU-hours, 2.78 total
    for figure in ("0.800 s", "0.400 s", "9,000", "0.278", "1.111", "2.78"):
        assert figure in result.output
    assert "basis: calibrated on cpu for tiny-sd15 at 64x64 batch 2" in result.output


def test_plan_without_calibration_says_it_uses_the_default(cli_env):
    result = CliRunner().invoke(cli_app, ["plan", "--model", "sdxl", "--steps", "30", "--gpu-price", "2.5"])
    assert result.exit_code == 0, result.output
    expected = estimate(
        default_timing("sdxl", 1024, 1024, 1, "cuda"), steps=30, batch=1, gpu_price_per_hour=2.5
    )
    assert f"{expected.images_per_hour:,.0f}" in result.output
    assert "basis: default estimate from the H100 reference grid" in result.output
    assert not (cli_env.data_dir / "genserve.db").exists()  # planning creates no store
    unknown = CliRunner().invoke(cli_app, ["plan", "--model", "nope"])
    assert unknown.exit_code == 2


def test_plan_and_estimate_do_not_import_torch(cli_env):
    code = (
        "import sys; from typer.testing import CliRunner; from genserve.cli import app;"
        "import genserve.api.routes.estimate;"
        "r = CliRunner().invoke(app, ['plan', '--model', 'tiny-sd15']); assert r.exit_code == 0, r.output;"
        "print(json.dumps('torch' in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", "import json;" + code], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out.strip().splitlines()[-1]) is False


def test_calibrate_measures_and_stores_timings(tiny_models_dir: Path, tmp_path: Path):
    import torch

    from genserve.engine.engine import Engine
    from genserve.engine.models.registry import scan_models
    from genserve.scheduler.calibrate import calibrate

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a second thread only waits for a busy core here
    try:
        engine = Engine(scan_models(tiny_models_dir), device="cpu")
        runs: list[str] = []
        # Three repeats: with one, a few ms of noise could outweigh the tiny model's fixed cost.
        timings = calibrate(
            engine,
            "tiny-sd15",
            [(64, 64)],
            [1, 2],
            steps_pair=(2, 6),
            repeats=3,
            on_run=runs.append,
        )
    finally:
        torch.set_num_threads(threads)
    assert [(t.batch, t.device, t.source) for t in timings] == [
        (1, "cpu", "calibrated"),
        (2, "cpu", "calibrated"),
    ]
    assert all(t.overhead_s > 0 and t.step_s > 0 for t in timings), timings
    assert len(runs) == 2 * (1 + 3 + 3)  # per batch size: a warm-up, then 3 runs at each step count
    calibration = CalibrationStore.from_url(f"sqlite:///{tmp_path / 'store.db'}")
    for t in timings:
        calibration.save(t)
    assert calibration.get("cpu", "tiny-sd15", 64, 64, 2) == timings[1]
    assert len(calibration.all(model="tiny-sd15")) == 2

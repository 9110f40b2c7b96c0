"""Hires fix through the API (issue 16, item 5): POST /v1/jobs with hires gives the larger PNG; the
job keeps the first pass's size and the PNG says both, as AUTOMATIC1111's infotext does; the size
limits apply to the hires size too, with the 422 naming hires."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from genserve.artifacts.images import ImageStore
from genserve.config import Settings
from genserve.engine.engine import Engine
from genserve.engine.models.registry import scan_models
from genserve.store.jobs import JobStore
from genserve.worker.loop import Worker

FAST = {"prompt": "a red circle", "steps": 3, "cfg_scale": 3.0, "seed": 1}


def make_settings(models_dir: Path, tmp_path: Path, **limits: int) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        models_dir=models_dir,
        store_url=f"sqlite:///{tmp_path / 'store.db'}",
        builtin_models=False,
        default_model="tiny-sd15",
        workers=0,
        limits=limits,
    )


def api(settings: Settings) -> TestClient:
    from genserve.api.app import create_app

    return TestClient(create_app(settings, supervise_workers=False))


def run_queue(settings: Settings) -> None:
    store = JobStore.from_url(settings.resolved_store_url)
    engine = Engine(scan_models(settings.models_dir), device="cpu")
    worker = Worker(settings, store, engine, ImageStore(settings.images_dir), "worker-test")
    worker.work(threading.Event(), until_idle=True)
    worker.leases.close()
    store.close()


def field_error(response, field: str) -> str:  # noqa: ANN001
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", field], error
    return error["msg"]


def test_a_hires_job_returns_the_larger_picture(tiny_models_dir: Path, tmp_path: Path) -> None:
    settings = make_settings(tiny_models_dir, tmp_path)
    with api(settings) as client:
        hires = {"scale": 2, "steps": 2, "strength": 0.5, "upscaler": "lanczos"}
        job = client.post("/v1/jobs", json={**FAST, "hires": hires, "num_images": 2})
        assert job.status_code == 202, job.text
        run_queue(settings)
        done = client.get(f"/v1/jobs/{job.json()['id']}").json()
        assert done["state"] == "succeeded", done["error"]
        assert (done["params"]["width"], done["params"]["height"]) == (64, 64)  # the first pass's
        assert done["params"]["hires"]["scale"] == 2
        for ref in done["images"]:
            image = Image.open(io.BytesIO(client.get(ref["url"]).content))
            assert image.size == (128, 128)
            parameters = image.text["parameters"]
            for text in ("Size: 64x64", "Hires upscale: 2.0", "Hires steps: 2", "Hires upscaler: Lanczos"):
                assert text in parameters


@pytest.mark.parametrize(
    ("limits", "hires", "text"),
    [
        (
            {"max_width": 128, "max_height": 128},
            {"scale": 2.5},
            "the hires size 160x160 exceeds max_width 128",
        ),
        ({"max_pixels": 100 * 100}, {"width": 128, "height": 96}, "exceeds max_pixels 10000"),
        ({"max_steps": 10}, {"scale": 2, "steps": 11}, "hires steps must be between 1 and 10"),
        ({}, {"scale": 2, "sampler": "lms"}, "hires sampler 'lms' is not supported"),
        ({}, {"scale": 2, "steps": 20, "strength": 0.01}, "int(steps / strength) = 2000"),
    ],
)
def test_hires_within_the_limits_or_a_422_naming_hires(
    tiny_models_dir: Path, tmp_path: Path, limits: dict, hires: dict, text: str
) -> None:
    with api(make_settings(tiny_models_dir, tmp_path, **limits)) as client:
        response = client.post("/v1/jobs", json={**FAST, "width": 64, "height": 64, "hires": hires})
        assert text in field_error(response, "hires")
        assert client.get("/v1/jobs").json()["total"] == 0


def test_a_hires_size_within_the_limits_is_accepted(tiny_models_dir: Path, tmp_path: Path) -> None:
    """The same limits let the first pass alone through: the 422 above is the hires size's."""
    with api(make_settings(tiny_models_dir, tmp_path, max_width=128, max_height=128)) as client:
        response = client.post("/v1/jobs", json={**FAST, "width": 64, "height": 64, "hires": {"scale": 2}})
        assert response.status_code == 202, response.text


def test_hires_batches_do_not_refine_the_step_time_of_the_first_pass_size() -> None:
    """Half a hires batch's steps run at 4x the pixels: its step times are not the 64x64 ones."""
    from genserve.schemas.generation import GenerationParams
    from genserve.schemas.image_inputs import HiresOptions
    from genserve.worker.loop import StepTimer

    class Events:
        def flush(self) -> None:
            pass

    plain = GenerationParams(prompt="x", model="tiny-sd15", width=64, height=64)
    for params, samples in ((plain, 2), (plain.model_copy(update={"hires": HiresOptions(scale=2)}), 0)):
        timer = StepTimer(params, Events())  # type: ignore[arg-type]
        for step in (1, 2, 3):
            timer(step, 3, 1)
        assert len(timer.samples) == samples

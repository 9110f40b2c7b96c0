"""SDXL base + refiner (issue 16, item 6): the base runs the schedule down to switch_at (diffusers'
denoising_end), hands its latents over undecoded, and the refiner, conditioned on its own text
encoder and aesthetic-score time ids, runs the rest (denoising_start). Rows hand over at their own
switch index and join the refiner there, so requests with different switch_at share both batches."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from fastapi.testclient import TestClient

from genserve.engine.engine import Engine, EngineError
from genserve.engine.loop.denoise import BatchItem
from genserve.engine.models.fixtures import write_tiny_refiner
from genserve.engine.models.registry import read_model_info, scan_models
from genserve.engine.stages.refiner import switch_index
from genserve.schemas.generation import GenerationParams, batch_key
from genserve.schemas.image_inputs import RefinerOptions

HASH = "sha256:" + "0" * 64


@pytest.fixture(scope="module")
def models(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("refiner-models")
    for entry in tiny_models_dir.iterdir():
        (root / entry.name).symlink_to(entry)
    write_tiny_refiner(root / "tiny-refiner")
    return root


@pytest.fixture(scope="module")
def engine(models: Path) -> Engine:
    return Engine(scan_models(models), device="cpu", dtype="float32")


def params(switch_at: float = 0.7, **kwargs: object) -> GenerationParams:
    base = dict(
        prompt="a red circle", model="tiny-sdxl", seed=3, steps=10, width=64, height=64, cfg_scale=5.0
    )
    refiner = RefinerOptions(model="tiny-refiner", switch_at=switch_at)
    return GenerationParams(**{**base, "refiner": refiner, **kwargs})


def pixels(image: PIL.Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


def test_the_registry_recognises_a_refiner_folder(models: Path) -> None:
    refiner = read_model_info(models / "tiny-refiner")
    assert (refiner.family, refiner.refiner, refiner.native_width) == ("sdxl", True, 64)
    assert read_model_info(models / "tiny-sdxl").refiner is False


@pytest.mark.parametrize(
    ("switch_at", "index"), [(0.05, 0), (0.3, 3), (0.5, 5), (0.7, 7), (0.8, 8), (0.95, 9)]
)
def test_the_base_keeps_the_timesteps_at_or_above_the_cutoff(switch_at: float, index: int) -> None:
    timesteps = torch.tensor([901.0, 801, 701, 601, 501, 401, 301, 201, 101, 1])  # euler, 10 steps, leading
    assert switch_index(timesteps, switch_at, 1000) == index


def test_base_then_refiner_reproduces_diffusers(engine: Engine, models: Path) -> None:
    """The same pixels as StableDiffusionXLPipeline(denoising_end=0.7, output_type="latent") then
    StableDiffusionXLImg2ImgPipeline(denoising_start=0.7) on the refiner, one CPU generator."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    [ours] = engine.generate(params(0.7))
    base = StableDiffusionXLPipeline.from_pretrained(models / "tiny-sdxl", add_watermarker=False)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(models / "tiny-refiner", add_watermarker=False)
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(3)
    common = dict(prompt="a red circle", num_inference_steps=10, guidance_scale=5.0, generator=generator)
    latents = base(denoising_end=0.7, output_type="latent", height=64, width=64, **common).images
    theirs = refiner(image=latents, denoising_start=0.7, **common).images[0]
    assert np.abs(pixels(ours) - pixels(theirs)).max() <= 1


def test_the_refiner_gets_the_latents_and_its_aesthetic_time_ids(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """7 base steps, then 3 refiner steps whose UNet sees (h, w, 0, 0, 2.5) for the negative and
    (h, w, 0, 0, 6.0) for the prompt; the base's VAE never decodes, the refiner's decodes once."""
    base, refiner = engine.pipeline("tiny-sdxl"), engine.pipeline("tiny-refiner")
    calls: list[tuple[str, list]] = []
    for name, pipe in (("base", base), ("refiner", refiner)):
        unet_forward = pipe.unet.forward

        def spy_unet(*args, _name=name, _forward=unet_forward, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls.append((_name, kwargs["added_cond_kwargs"]["time_ids"].tolist()))
            return _forward(*args, **kwargs)

        monkeypatch.setattr(pipe.unet, "forward", spy_unet)
    decodes: list[str] = []
    for name, pipe in (("base", base), ("refiner", refiner)):
        vae_decode = pipe.vae.decode
        monkeypatch.setattr(
            pipe.vae,
            "decode",
            lambda *a, _name=name, _decode=vae_decode, **k: decodes.append(_name) or _decode(*a, **k),
        )
    engine.generate(params(0.7))
    assert [name for name, _ in calls] == ["base"] * 7 + ["refiner"] * 3
    for name, time_ids in calls:
        if name == "base":
            assert time_ids == [[64, 64, 0, 0, 64, 64]] * 2  # uncond and cond alike
        else:
            assert time_ids == [[64, 64, 0, 0, 2.5], [64, 64, 0, 0, 6.0]]
    assert decodes == ["refiner"]


def test_rows_with_different_switch_points_share_the_batch_and_equal_their_lone_runs(engine: Engine) -> None:
    picture = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    steps: dict[int, list[tuple[int, int]]] = {}
    items = [
        BatchItem(
            params(0.7, seed=1, num_images=2), on_step=lambda s, t: steps.setdefault(0, []).append((s, t))
        ),
        BatchItem(
            params(0.3, seed=2, prompt="a blue square"),
            on_step=lambda s, t: steps.setdefault(1, []).append((s, t)),
        ),
        BatchItem(params(0.9, seed=3, cfg_scale=1.0)),
        BatchItem(  # an img2img row that starts at index 5: 2 base steps, then the refiner from 7
            params(0.7, seed=4, init_image=HASH, strength=0.5),
            on_step=lambda s, t: steps.setdefault(3, []).append((s, t)),
            init_image=picture,
        ),
    ]
    assert len({batch_key(item.params) for item in items}) == 1  # switch_at stays out of the key
    batch_steps: list[tuple[int, int, int]] = []
    together = engine.generate_batch(items, on_batch_step=lambda s, t, rows: batch_steps.append((s, t, rows)))
    assert steps[0] == [(s, 10) for s in range(1, 11)]
    assert steps[1] == [(s, 10) for s in range(1, 11)]
    assert steps[3] == [(s, 5) for s in range(1, 6)]
    # the base's loop to index 9 (switch 0.9), then the refiner's from index 3 (switch 0.3)
    assert [s for s, _, _ in batch_steps] == list(range(1, 17))
    assert {t for _, t, _ in batch_steps} == {9 + 10 - 3}
    for item, outcome in zip(items, together, strict=True):
        [alone] = engine.generate_batch([item])
        assert len(outcome.images) == item.params.num_images
        for a, b in zip(outcome.images, alone.images, strict=True):
            assert np.abs(pixels(a) - pixels(b)).max() <= 1  # within 1/255


def test_what_the_refiner_refuses(engine: Engine) -> None:
    with pytest.raises(EngineError, match="'tiny-sd15' is a sd15 model"):
        engine.generate(params(model="tiny-sd15"))
    with pytest.raises(EngineError, match="'tiny-sd3' is not an SDXL refiner"):
        engine.generate(params(refiner=RefinerOptions(model="tiny-sd3")))
    with pytest.raises(EngineError, match="is an SDXL refiner"):
        engine.generate(params(model="tiny-refiner", refiner=None))


# Through the API


def test_refiner_jobs_through_the_api(models: Path, tmp_path: Path) -> None:
    from genserve.api.app import create_app
    from genserve.artifacts.images import ImageStore
    from genserve.config import Settings
    from genserve.store.jobs import JobStore
    from genserve.worker.loop import Worker

    settings = Settings(
        data_dir=tmp_path / "data",
        models_dir=models,
        store_url=f"sqlite:///{tmp_path / 'store.db'}",
        builtin_models=False,
        default_model="tiny-sdxl",
        workers=0,
    )
    body = {
        "prompt": "a red circle",
        "steps": 4,
        "seed": 1,
        "refiner": {"model": "tiny-refiner", "switch_at": 0.5},
    }
    with TestClient(create_app(settings, supervise_workers=False)) as client:
        for change, field, text in (
            ({"model": "tiny-sd15"}, "refiner", "is a sd15 model"),
            ({"refiner": {"model": "tiny-sdxl"}}, "refiner", "is not an SDXL refiner"),
            ({"refiner": {"model": "nope"}}, "refiner", "is not registered"),
            ({"hires": {"scale": 2}}, "refiner", "refiner and hires"),
            ({"model": "tiny-refiner", "refiner": None}, "model", "is an SDXL refiner"),
        ):
            response = client.post("/v1/jobs", json={**body, **change})
            assert response.status_code == 422, response.text
            [error] = response.json()["detail"]
            assert error["loc"] == ["body", field] and text in error["msg"], error
        job = client.post("/v1/jobs", json=body)
        assert job.status_code == 202, job.text
        store = JobStore.from_url(settings.resolved_store_url)
        worker = Worker(
            settings, store, Engine(scan_models(models), device="cpu"), ImageStore(settings.images_dir), "w"
        )
        worker.work(threading.Event(), until_idle=True)
        worker.leases.close()
        store.close()
        done = client.get(f"/v1/jobs/{job.json()['id']}").json()
        assert done["state"] == "succeeded", done["error"]
        image = client.get(done["images"][0]["url"])
        assert (
            "Refiner: tiny-refiner, Refiner switch at: 0.5"
            in PIL.Image.open(io.BytesIO(image.content)).text["parameters"]
        )

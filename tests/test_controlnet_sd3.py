"""SD3 ControlNet per row (issue 18): a request equals diffusers' StableDiffusion3ControlNetPipeline on
the same tiny weights, rows with different SD3 ControlNets (or none, other block counts) share a
batch and equal their lone runs, and an SD3 ControlNet is refused on an SD1.5 model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from genserve.engine.engine import Engine, EngineError
from genserve.engine.loop.denoise import BatchItem
from genserve.engine.models.control_fixtures import write_tiny_sd3_controlnet
from genserve.engine.models.controls import scan_controls
from genserve.engine.models.registry import scan_models
from genserve.engine.models.samplers import build_scheduler
from genserve.schemas.control import ControlNetUnit
from genserve.schemas.generation import GenerationParams, batch_key

torch.set_num_threads(1)

A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64


@pytest.fixture(scope="module")
def models(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sd3-control-models")
    for entry in tiny_models_dir.iterdir():
        (root / entry.name).symlink_to(entry)
    base = root / "tiny-sd3"
    write_tiny_sd3_controlnet(base, root / "controlnet" / "cn-sd3", seed=1)
    # two blocks (one per transformer block) and a shifted, pooled-projection-using input
    write_tiny_sd3_controlnet(
        base, root / "controlnet" / "cn-sd3-b", seed=2, num_layers=2, force_zeros_for_pooled_projection=False
    )
    write_tiny_sd3_controlnet(base, root / "controlnet" / "cn-sd35", seed=3, sd35=True)
    return root


@pytest.fixture(scope="module")
def engine(models: Path) -> Engine:
    return Engine(scan_models(models), device="cpu", dtype="float32", controls=scan_controls(models))


def picture(seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


IMAGES = {A: picture(1), B: picture(2)}


def params(model: str = "tiny-sd3", **kwargs: object) -> GenerationParams:
    base = dict(prompt="a red circle", model=model, seed=3, steps=6, width=64, height=64, cfg_scale=5.0)
    return GenerationParams(**{**base, **kwargs})


def unit(model: str = "cn-sd3", image: str = A, **kwargs: object) -> ControlNetUnit:
    return ControlNetUnit(model=model, image=image, **kwargs)


def run(engine: Engine, p: GenerationParams) -> np.ndarray:
    return np.asarray(engine.generate(p, control_images=IMAGES)[0].convert("RGB")).astype(int)


@pytest.mark.parametrize(
    ("name", "scale", "start", "end"),
    [("cn-sd3", 0.8, 0.0, 1.0), ("cn-sd3-b", 1.2, 0.2, 0.7), ("cn-sd35", 1.0, 0.0, 1.0)],
)
def test_one_request_equals_diffusers_sd3_controlnet_pipeline(
    engine: Engine,
    models: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    scale: float,
    start: float,
    end: float,
) -> None:
    from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    ours = run(engine, params(controlnets=[unit(name, scale=scale, start=start, end=end)]))
    pipe = StableDiffusion3ControlNetPipeline.from_pretrained(
        models / "tiny-sd3",
        controlnet=SD3ControlNetModel.from_pretrained(models / "controlnet" / name),
        text_encoder_3=None,
        tokenizer_3=None,
        image_encoder=None,
        feature_extractor=None,
    )
    pipe.scheduler = build_scheduler("sd3", "euler", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    # The pipeline encodes the map with latent_dist.sample() from the global RNG; genserve takes the
    # mean (reproducible per row): compare the two on the mean.
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
    theirs = pipe(
        "a red circle",
        control_image=IMAGES[A],
        num_inference_steps=6,
        guidance_scale=5.0,
        controlnet_conditioning_scale=scale,
        control_guidance_start=start,
        control_guidance_end=end,
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(3),
    ).images[0]
    assert np.abs(ours - np.asarray(theirs).astype(int)).max() <= 1
    assert np.abs(ours - run(engine, params())).max() > 10  # the control did something


def test_mixed_batch_equals_separate_runs(engine: Engine) -> None:
    """Rows with an SD3 ControlNet, another with twice its blocks, an SD3.5-style one, two at once,
    or none share one batch, and each equals its lone run."""
    requests = [
        params(seed=1),
        params(seed=2, controlnets=[unit("cn-sd35", scale=0.9)]),
        params(seed=3, controlnets=[unit("cn-sd3-b", B, mode="prompt", start=0.2)], num_images=2),
        params(seed=4, controlnets=[unit(mode="control"), unit("cn-sd3-b", B, scale=0.5)], cfg_scale=3.0),
    ]
    assert len({batch_key(p) for p in requests}) == 1  # controls stay out of the batch key
    batched = engine.generate_batch([BatchItem(p, control_images=IMAGES) for p in requests])
    outputs = []
    for p, outcome in zip(requests, batched, strict=True):
        alone = engine.generate(p, control_images=IMAGES)
        for a, b in zip(outcome.images, alone, strict=True):
            outputs.append(np.asarray(a).astype(int))
            assert np.abs(outputs[-1] - np.asarray(b).astype(int)).max() <= 1
    plain = outputs[0]
    assert all(np.abs(out - plain).max() > 0 for out in outputs[1:])


def test_scale_zero_equals_no_control_and_families_are_checked(engine: Engine) -> None:
    plain = run(engine, params())
    assert np.abs(run(engine, params(controlnets=[unit(scale=0.0)])) - plain).max() == 0
    with pytest.raises(EngineError, match=r"controlnets\[0\]\.model.*sd3 controlnet.*sd15"):
        engine.generate(params("tiny-sd15", controlnets=[unit()]), control_images=IMAGES)


def test_registry_lists_sd3_controlnets(models: Path) -> None:
    assert {n: (c.kind, c.family) for n, c in scan_controls(models).items()} == {
        "cn-sd3": ("controlnet", "sd3"),
        "cn-sd3-b": ("controlnet", "sd3"),
        "cn-sd35": ("controlnet", "sd3"),
    }

"""Hires fix (issue 16, item 5): a second pass of the same job at a larger size, after the first pass
of the whole batch: latent or pixel upscale, then an img2img pass that runs exactly hires.steps steps
(AUTOMATIC1111's semantics), rows of a batch sharing it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from genserve.engine.engine import Engine, EngineError, UnsupportedSampler
from genserve.engine.loop.denoise import BatchItem
from genserve.engine.models.fixtures import write_tiny_pipeline
from genserve.engine.models.registry import scan_models
from genserve.engine.models.samplers import build_scheduler
from genserve.engine.stages.plan import schedule_error, second_pass_schedule, target_size
from genserve.engine.stages.upscale import upscale_latents, upscale_picture
from genserve.schemas.generation import GenerationParams, batch_key
from genserve.schemas.image_inputs import HiresOptions

HASH = "sha256:" + "0" * 64


@pytest.fixture(scope="module")
def models(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hires-models")
    for entry in tiny_models_dir.iterdir():
        (root / entry.name).symlink_to(entry)
    write_tiny_pipeline("sd15", root / "tiny-sd15-inpaint", inpainting=True)
    return root


@pytest.fixture(scope="module")
def engine(models: Path) -> Engine:
    return Engine(scan_models(models), device="cpu", dtype="float32")


def params(model: str = "tiny-sd15", hires: dict | None = None, **kwargs: object) -> GenerationParams:
    options = {"scale": 2, "steps": 4, "strength": 0.5, **(hires or {})}
    base = dict(prompt="a red circle", model=model, seed=3, steps=6, width=64, height=64, cfg_scale=5.0)
    return GenerationParams(**{**base, "hires": HiresOptions(**options), **kwargs})


def pixels(image: PIL.Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


# 1. The plan: size and schedule


@pytest.mark.parametrize(
    ("steps", "strength", "schedule", "start"),
    [(10, 0.55, 18, 8), (20, 0.5, 40, 20), (10, 1.0, 10, 0), (4, 0.3, 13, 9), (15, 0.75, 20, 5)],
)
def test_the_second_pass_runs_exactly_its_steps_at_the_end_of_a_longer_schedule(
    steps: int, strength: float, schedule: int, start: int
) -> None:
    assert second_pass_schedule(steps, strength) == (schedule, start)  # int(steps / strength), as A1111
    assert schedule - start == steps


def test_a_schedule_longer_than_the_training_timesteps_is_refused() -> None:
    assert schedule_error(params(hires={"steps": 20, "strength": 0.01})) is not None
    assert schedule_error(params(hires={"steps": 20, "strength": 0.05})) is None  # 400


@pytest.mark.parametrize(
    ("size", "hires", "target"),
    [
        ((64, 64), {"scale": 2}, (128, 128)),
        ((72, 88), {"scale": 1.5}, (112, 136)),  # 108 and 132 round half up to whole 8s, as the web UI
        ((64, 48), {"width": 96, "height": 96}, (96, 96)),
    ],
)
def test_target_size(size: tuple[int, int], hires: dict, target: tuple[int, int]) -> None:
    assert target_size(*size, HiresOptions(**hires)) == target


def test_latent_upscalers_resize_and_crop_to_the_target() -> None:
    latents = torch.arange(16.0).view(1, 1, 4, 4)
    nearest = upscale_latents(latents, 8, 8, "latent_nearest")
    assert torch.equal(nearest, latents.repeat_interleave(2, -1).repeat_interleave(2, -2))
    for upscaler in ("latent", "latent_bilinear", "latent_bicubic", "latent_antialiased"):
        assert upscale_latents(latents, 8, 8, upscaler).shape == (1, 1, 8, 8)
    # another aspect ratio: cover (8x8), then the centre 8 wide x 4 high
    wide = upscale_latents(latents, 8, 4, "latent_nearest")
    assert torch.equal(wide, nearest[..., 2:6, :])


def test_pixel_upscalers_resize_and_crop_to_the_target() -> None:
    picture = PIL.Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    assert (pixels(upscale_picture(picture, 8, 8, "nearest"))[::2, ::2] == pixels(picture)).all()
    assert upscale_picture(picture, 8, 4, "lanczos").size == (8, 4)


# 2. The pass


def test_the_second_pass_runs_exactly_its_steps_at_the_larger_size(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """6 first-pass steps at 64x64, then exactly 4 at 128x128 (a schedule of 8, from index 4); the
    request and the batch count 10 steps, monotonely."""
    unet = engine.pipeline("tiny-sd15").unet
    sizes: list[int] = []
    forward = type(unet).forward
    monkeypatch.setattr(
        type(unet), "forward", lambda self, x, *a, **k: sizes.append(x.shape[-1]) or forward(self, x, *a, **k)
    )
    steps: list[tuple[int, int]] = []
    batch_steps: list[tuple[int, int]] = []
    [outcome] = engine.generate_batch(
        [BatchItem(params(), on_step=lambda s, t: steps.append((s, t)))],
        on_batch_step=lambda s, t, rows: batch_steps.append((s, t)),
    )
    assert outcome.images[0].size == (128, 128)
    assert sizes == [32] * 6 + [64] * 4  # latents: VAE factor 2
    assert steps == batch_steps == [(s, 10) for s in range(1, 11)]


@pytest.mark.parametrize("upscaler", ["latent", "lanczos"])
def test_hires_reproduces_diffusers_txt2img_then_img2img(engine: Engine, models: Path, upscaler: str) -> None:
    """The same as diffusers' txt2img (latents out), our upscale, then StableDiffusionImg2ImgPipeline
    on the schedule of 8 from index 4, with one CPU generator carried from the first pass on."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    request = params(hires={"upscaler": upscaler})
    [ours] = engine.generate(request)

    kwargs = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    txt2img = StableDiffusionPipeline.from_pretrained(models / "tiny-sd15", **kwargs)
    txt2img.scheduler = build_scheduler("sd15", "euler", txt2img.scheduler.config)
    img2img = StableDiffusionImg2ImgPipeline(**txt2img.components)
    for pipe in (txt2img, img2img):
        pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(3)
    common = dict(prompt="a red circle", guidance_scale=5.0, generator=generator)
    latents = txt2img(num_inference_steps=6, height=64, width=64, output_type="latent", **common).images
    if upscaler == "latent":
        image = upscale_latents(latents, 64, 64, "latent")
    else:
        with torch.no_grad():
            decoded = txt2img.vae.decode(latents / txt2img.vae.config.scaling_factor).sample
        image = upscale_picture(txt2img.image_processor.postprocess(decoded)[0], 128, 128, "lanczos")
    # strength 4.5 / 8: int(8 × s) = 4 steps from index 4, the hires pass's start
    theirs = img2img(image=image, num_inference_steps=8, strength=4.5 / 8, **common).images[0]
    assert np.abs(pixels(ours) - pixels(theirs)).max() <= 1


@pytest.mark.parametrize("upscaler", ["latent_bicubic", "nearest"])
def test_a_hires_row_in_a_batch_equals_the_same_request_alone(engine: Engine, upscaler: str) -> None:
    # 32x32 -> 64x64: the same batch and second-pass paths as at the native 64 -> 128, at a fifth of
    # the cost (the tiny UNet's attention at 128x128 made this test ~12 s)
    hires, size = {"upscaler": upscaler}, {"width": 32, "height": 32}
    items = [
        BatchItem(params(hires=hires, seed=1, prompt="a blue square", num_images=2, **size)),
        BatchItem(params(hires=hires, seed=2, cfg_scale=1.0, **size)),
        BatchItem(params(hires=hires, seed=3, negative_prompt="green", cfg_scale=8.0, **size)),
    ]
    assert len({batch_key(item.params) for item in items}) == 1
    together = engine.generate_batch(items)
    for item, outcome in zip(items, together, strict=True):
        [alone] = engine.generate_batch([item])
        assert [image.size for image in outcome.images] == [(64, 64)] * item.params.num_images
        for a, b in zip(outcome.images, alone.images, strict=True):
            assert np.abs(pixels(a) - pixels(b)).max() <= 1  # within 1/255


@pytest.mark.parametrize(
    ("model", "hires", "size"),
    [
        ("tiny-sdxl", {"scale": 1.5, "sampler": "dpmpp_2m"}, (96, 96)),
        ("tiny-sd3", {"width": 96, "height": 64}, (96, 64)),
        ("tiny-sd15-inpaint", {"upscaler": "lanczos"}, (128, 128)),
    ],
)
def test_hires_on_every_family(engine: Engine, model: str, hires: dict, size: tuple[int, int]) -> None:
    [image] = engine.generate(params(model, hires=hires))
    assert image.size == size
    assert pixels(image).std() > 0


def test_a_request_canceled_in_the_second_pass_leaves_and_the_others_finish(engine: Engine) -> None:
    class Canceled(Exception):
        pass

    def cancel_at_8(step: int, total: int) -> None:
        if step == 8:
            raise Canceled

    items = [BatchItem(params(seed=1), on_step=cancel_at_8), BatchItem(params(seed=2))]
    first, second = engine.generate_batch(items)
    assert isinstance(first.error, Canceled) and first.images == []
    assert second.error is None and second.images[0].size == (128, 128)


def test_what_the_hires_fix_refuses(engine: Engine) -> None:
    picture = PIL.Image.new("RGB", (64, 64))
    with pytest.raises(EngineError, match="init_image"):
        engine.generate(params(init_image=HASH), init_image=picture)
    with pytest.raises(UnsupportedSampler, match="hires sampler 'euler_a'"):
        engine.generate(params("tiny-sd3", hires={"sampler": "euler_a"}, sampler="euler"))
    with pytest.raises(EngineError, match="timesteps"):
        engine.generate(params(hires={"steps": 20, "strength": 0.01}))

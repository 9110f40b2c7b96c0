"""img2img in the shared loop (issue 16): a row joins at its start index, reproduces diffusers'
img2img pipeline, and equals itself run alone when it shares a batch with other kinds of rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from genserve.engine.conditioning.latents import EncodingCache, encode_pixels, pixels_to_tensor
from genserve.engine.engine import Engine, EngineError
from genserve.engine.loop.denoise import BatchItem
from genserve.engine.loop.row import start_index
from genserve.engine.models.fixtures import write_tiny_pipeline
from genserve.engine.models.registry import scan_models
from genserve.engine.models.samplers import build_scheduler
from genserve.engine.stages.geometry import fit_picture
from genserve.schemas.generation import GenerationParams, batch_key
from genserve.schemas.image_inputs import InpaintOptions

HASH = "sha256:" + "0" * 64  # the worker loads the picture; the engine only checks both are given


@pytest.fixture(scope="module")
def models(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny models of every family plus a 9-channel SD1.5 inpainting model."""
    root = tmp_path_factory.mktemp("img2img-models")
    for entry in tiny_models_dir.iterdir():
        (root / entry.name).symlink_to(entry)
    write_tiny_pipeline("sd15", root / "tiny-sd15-inpaint", inpainting=True)
    return root


@pytest.fixture(scope="module")
def engine(models: Path) -> Engine:
    return Engine(scan_models(models), device="cpu", dtype="float32")


def picture(seed: int = 0, size: tuple[int, int] = (64, 64)) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def params(model: str = "tiny-sd15", **kwargs: object) -> GenerationParams:
    base = dict(prompt="a red circle", model=model, seed=3, steps=8, width=64, height=64, cfg_scale=5.0)
    return GenerationParams(**{**base, **kwargs})


def pixels(image: PIL.Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


# 1. Strength semantics


@pytest.mark.parametrize(
    ("steps", "strength", "start"), [(20, 1.0, 0), (20, 0.5, 10), (20, 0.75, 5), (10, 0.33, 7), (8, 0.99, 1)]
)
def test_a_row_runs_the_last_int_steps_times_strength_steps(steps: int, strength: float, start: int) -> None:
    assert start_index(steps, strength) == start


def test_a_strength_that_runs_no_step_is_refused() -> None:
    with pytest.raises(ValueError, match="runs no step"):
        start_index(10, 0.05)


@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m", "euler_a"])
def test_img2img_reproduces_diffusers_img2img_pipeline(engine: Engine, models: Path, sampler: str) -> None:
    """Same model, seed, strength and sampler: the same pixels as StableDiffusionImg2ImgPipeline,
    which draws the VAE sample and then the noise from one CPU generator, as a row does."""
    from diffusers import StableDiffusionImg2ImgPipeline

    init = picture(1)
    [ours] = engine.generate(
        params(init_image=HASH, strength=0.6, sampler=sampler, steps=10), init_image=init
    )
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        models / "tiny-sd15", safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.scheduler = build_scheduler("sd15", sampler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        "a red circle",
        image=init,
        strength=0.6,
        num_inference_steps=10,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(3),
    ).images[0]
    assert np.abs(pixels(ours) - pixels(theirs)).max() <= 1


def test_rows_join_at_their_start_and_report_their_own_steps(engine: Engine) -> None:
    """A strength-0.5 row is not computed for the first half and counts its own 4 steps."""
    seen: dict[str, list[tuple[int, int]]] = {"txt": [], "img": []}
    rows: list[int] = []
    items = [
        BatchItem(params(), on_step=lambda s, t: seen["txt"].append((s, t))),
        BatchItem(
            params(init_image=HASH, strength=0.5, seed=9),
            on_step=lambda s, t: seen["img"].append((s, t)),
            init_image=picture(),
        ),
    ]
    engine.generate_batch(items, on_batch_step=lambda step, total, n: rows.append(n))
    assert rows == [1, 1, 1, 1, 2, 2, 2, 2]
    assert seen["txt"] == [(s, 8) for s in range(1, 9)]
    assert seen["img"] == [(s, 4) for s in range(1, 5)]


# 2. Batch invariance (issue 16, item 12)


def mixed_batch(model: str) -> list[BatchItem]:
    mask = np.zeros((64, 64), np.uint8)
    mask[10:40, 20:50] = 255
    other_mask = np.zeros((64, 64), np.uint8)
    other_mask[30:60, 0:24] = 255
    return [
        BatchItem(params(model, seed=1, prompt="a blue square", num_images=2)),
        BatchItem(params(model, seed=2, init_image=HASH, strength=0.3), init_image=picture(2)),
        BatchItem(params(model, seed=3, init_image=HASH, strength=0.7, cfg_scale=1.0), init_image=picture(3)),
        BatchItem(
            params(model, seed=4, init_image=HASH, mask=HASH, strength=0.9, num_images=2),
            init_image=picture(4),
            mask=PIL.Image.fromarray(mask),
        ),
        BatchItem(
            params(
                model, seed=5, init_image=HASH, mask=HASH, strength=1.0, inpaint=InpaintOptions(fill="fill")
            ),
            init_image=picture(5),
            mask=PIL.Image.fromarray(other_mask),
        ),
    ]


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sd15-inpaint", "tiny-sdxl", "tiny-sd3"])
def test_a_row_in_a_mixed_batch_equals_the_same_request_alone(engine: Engine, model: str) -> None:
    items = mixed_batch(model)
    assert len({batch_key(item.params) for item in items}) == 1  # strength and masks stay out of the key
    together = engine.generate_batch(items)
    for item, outcome in zip(items, together, strict=True):
        [alone] = engine.generate_batch([item])
        assert len(outcome.images) == item.params.num_images
        for a, b in zip(outcome.images, alone.images, strict=True):
            assert np.abs(pixels(a) - pixels(b)).max() <= 1  # within 1/255


def test_the_same_seed_gives_the_same_picture_and_another_seed_another(engine: Engine) -> None:
    init = picture(6)
    first = engine.generate(params(init_image=HASH, strength=0.8), init_image=init)[0]
    again = engine.generate(params(init_image=HASH, strength=0.8), init_image=init)[0]
    other = engine.generate(params(init_image=HASH, strength=0.8, seed=4), init_image=init)[0]
    assert (pixels(first) == pixels(again)).all()
    assert np.abs(pixels(first) - pixels(other)).max() > 8


def test_a_picture_named_but_not_loaded_is_refused(engine: Engine) -> None:
    with pytest.raises(EngineError, match="init_image"):
        engine.generate(params(init_image=HASH))
    with pytest.raises(EngineError, match="runs no step"):
        engine.generate(params(init_image=HASH, strength=0.1), init_image=picture())


# 3. VAE encodings: cached, sampled per row, tiled when large


def test_encodings_are_cached_by_model_and_pixels(engine: Engine) -> None:
    pipe = engine.pipeline("tiny-sd15")
    cache = EncodingCache(capacity=2)
    a, b, c = (np.asarray(picture(seed)) for seed in (10, 11, 12))
    first = cache.encode("tiny-sd15", pipe, a, device="cpu")
    assert cache.encode("tiny-sd15", pipe, a.copy(), device="cpu") is first
    cache.encode("tiny-sd15", pipe, b, device="cpu")
    cache.encode("tiny-sd15", pipe, c, device="cpu")  # evicts a, the least recently used
    assert (cache.hits, cache.misses) == (1, 3)
    assert cache.encode("tiny-sd15", pipe, a, device="cpu") is not first
    assert torch.equal(cache.encode("tiny-sd15", pipe, a, device="cpu").mean, first.mean)


def test_large_pictures_encode_in_tiles(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the engine's tiling threshold the VAE encodes in tiles, as it decodes."""
    from genserve.engine.speed.optimize import EngineOptimizations

    small_tiles = EngineOptimizations(vae_tile_above_pixels=100 * 100, vae_tile_size=64)
    engine = Engine(scan_models(models), device="cpu", dtype="float32", optimizations=small_tiles)
    vae_class = type(engine.pipeline("tiny-sd15").vae)
    calls: list[tuple[int, ...]] = []
    original = vae_class._tiled_encode
    monkeypatch.setattr(
        vae_class, "_tiled_encode", lambda self, x: calls.append(tuple(x.shape)) or original(self, x)
    )
    engine.generate(params(init_image=HASH, strength=0.5), init_image=picture(7))  # 64x64: whole
    assert calls == []
    [out] = engine.generate(
        params(init_image=HASH, strength=0.5, width=192, height=128), init_image=picture(7, (192, 128))
    )
    assert calls == [(1, 3, 128, 192)] and out.size == (192, 128)


def test_tiled_and_whole_encodings_agree_roughly(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = engine.pipeline("tiny-sd15")
    monkeypatch.setattr(pipe.vae, "tile_sample_min_size", 64)
    monkeypatch.setattr(pipe.vae, "tile_latent_min_size", 32)
    image = pixels_to_tensor(np.asarray(picture(7, (192, 128))), "cpu", torch.float32)
    whole = encode_pixels(pipe, image)
    tiled = encode_pixels(pipe, image, tile_above=64 * 64)
    assert tiled.mean.shape == whole.mean.shape == (1, 4, 64, 96)
    assert not torch.equal(tiled.mean, whole.mean)
    # Tiles see less context near their seams, so the two differ, but not by much.
    assert (tiled.mean - whole.mean).abs().mean() < 0.5 * whole.mean.abs().mean()


# 4. Resize modes


def test_resize_modes_fit_the_picture_to_the_request() -> None:
    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, :32] = (255, 0, 0)  # left half red, right half black
    stretched = fit_picture(wide, 64, 64, "resize")
    cropped = fit_picture(wide, 64, 64, "crop")
    filled = fit_picture(wide, 64, 64, "fill")
    assert stretched.shape == cropped.shape == filled.shape == (64, 64, 3)
    # resize keeps all of it, stretched; crop fills the frame with its middle (half red, half black)
    assert stretched[:, 5, 0].min() > 200 and stretched[:, 60, 0].max() < 30
    assert cropped[:, 2, 0].min() > 200 and cropped[:, 61, 0].max() < 30
    # fill keeps all of it undistorted in the middle band and stretches its edge rows outwards
    assert (filled[:16] == filled[16:17]).all() and (filled[48:] == filled[47:48]).all()
    assert filled[32, 5, 0] > 200 and filled[32, 60, 0] < 30


def test_deepcache_takes_a_full_step_when_rows_join(models: Path) -> None:
    """DeepCache reuses deep features between full steps; a row joining changes the batch, so the
    step it joins at runs the full UNet (every 3rd call otherwise: 0, 3 | join at 4: 4, 7)."""
    from genserve.engine.speed.deepcache import DeepCacheForward
    from genserve.engine.speed.optimize import EngineOptimizations

    engine = Engine(
        scan_models(models), device="cpu", dtype="float32", optimizations=EngineOptimizations(deepcache=3)
    )
    forward = engine.pipeline("tiny-sd15").unet.forward
    while not isinstance(forward, DeepCacheForward):
        forward = forward.inner
    engine.generate(params())
    alone = forward.full_calls
    engine.generate_batch(
        [BatchItem(params()), BatchItem(params(init_image=HASH, strength=0.5), init_image=picture())]
    )
    assert (alone, forward.full_calls - alone) == (3, 4)

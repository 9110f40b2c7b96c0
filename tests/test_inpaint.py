"""Inpainting and outpainting (issue 16): mask conventions, blur, fills, the "only masked" crop, the
outpaint canvas, 9-channel checkpoints, and pixels outside the mask coming back unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from genserve.engine.engine import Engine, EngineError
from genserve.engine.models.fixtures import write_tiny_pipeline, write_tiny_single_file
from genserve.engine.models.registry import read_model_info, scan_models
from genserve.engine.stages.geometry import crop_box, pad_canvas
from genserve.engine.stages.masks import blur_mask, composite, fill_masked, latent_mask, read_mask
from genserve.schemas.generation import GenerationParams
from genserve.schemas.image_inputs import InpaintOptions, OutpaintOptions

HASH = "sha256:" + "0" * 64


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("inpaint-models")
    write_tiny_pipeline("sd15", root / "tiny-sd15")
    write_tiny_pipeline("sd15", root / "tiny-sd15-inpaint", inpainting=True)
    write_tiny_single_file(root / "tiny-inpaint-file.safetensors", seed=1, inpainting=True)
    return root


@pytest.fixture(scope="module")
def engine(models: Path) -> Engine:
    return Engine(scan_models(models), device="cpu", dtype="float32")


def picture(seed: int = 0, size: tuple[int, int] = (64, 64)) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def box_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    mask = np.zeros((size[1], size[0]), np.uint8)
    left, top, right, bottom = box
    mask[top:bottom, left:right] = 255
    return mask


def params(model: str = "tiny-sd15", **kwargs: object) -> GenerationParams:
    base = dict(prompt="a red circle", model=model, seed=3, steps=6, width=64, height=64, cfg_scale=5.0)
    return GenerationParams(**{**base, "init_image": HASH, "mask": HASH, **kwargs})


# 1. Masks and geometry, pure


def test_white_or_opaque_means_repaint() -> None:
    grey = np.zeros((4, 4), np.uint8)
    grey[:2] = 255
    assert read_mask(PIL.Image.fromarray(grey)).tolist() == (grey > 128).astype(float).tolist()
    rgba = np.zeros((4, 4, 4), np.uint8)  # black everywhere; opaque on the left half only
    rgba[:, :2, 3] = 255
    assert read_mask(PIL.Image.fromarray(rgba, "RGBA"))[:, :2].all()
    assert not read_mask(PIL.Image.fromarray(rgba, "RGBA"))[:, 2:].any()
    opaque = np.full((4, 4, 4), 255, np.uint8)
    opaque[..., :3] = 0  # fully opaque black: the alpha says nothing, the grey says keep
    assert not read_mask(PIL.Image.fromarray(opaque, "RGBA")).any()


def test_blur_softens_the_edge_and_leaves_far_pixels_exact() -> None:
    mask = box_mask((64, 64), (20, 20, 44, 44)).astype(np.float32) / 255
    blurred = blur_mask(mask, 4)
    assert 0 < blurred[20, 32] < 1  # on the edge
    assert blurred[32, 32] == 1.0 and blurred[0, 0] == 0.0 and blurred[32, 5] == 0.0


def test_only_masked_crop_holds_the_mask_plus_padding_at_the_request_aspect() -> None:
    mask = box_mask((200, 100), (90, 40, 110, 60)).astype(np.float32)
    left, top, right, bottom = crop_box(mask, 64, 32, padding=8)
    assert left <= 82 and top <= 32 and right >= 118 and bottom >= 68
    assert abs((right - left) / (bottom - top) - 2) < 0.05
    # Near a corner the box shifts to stay inside the picture instead of shrinking.
    corner = crop_box(box_mask((200, 100), (0, 0, 10, 10)).astype(np.float32), 32, 32, padding=8)
    assert corner == (0, 0, 18, 18)


def test_outpaint_canvas_stretches_edges_and_masks_the_new_area_with_a_feather() -> None:
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, -1] = (0, 0, 255)
    canvas, mask = pad_canvas(image, left=0, top=0, right=32, bottom=0, feather=8)
    assert canvas.shape == (64, 96, 3) and mask.shape == (64, 96)
    assert (canvas[:, 64:] == (0, 0, 255)).all()  # the last column, stretched
    assert (mask[:, 64:] == 1).all()
    assert mask[10, 63] > mask[10, 60] > mask[10, 57] > 0  # fades into the old picture
    assert (mask[:, :56] == 0).all()


def test_fill_takes_the_colours_around_the_mask() -> None:
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, :32] = (200, 0, 0)
    image[:, 32:] = (0, 0, 200)
    image[20:40, 8:24] = (0, 255, 0)  # to be filled from the red around it
    mask = box_mask((64, 64), (8, 20, 24, 40)).astype(np.float32) / 255
    filled = fill_masked(image, mask)
    assert np.abs(filled[30, 16].astype(int) - (200, 0, 0)).max() < 40
    assert (filled[mask == 0] == image[mask == 0]).all()


def test_composite_keeps_the_original_where_the_mask_is_zero() -> None:
    original, generated = np.asarray(picture(1)), np.asarray(picture(2))
    mask = blur_mask(box_mask((64, 64), (16, 16, 48, 48)).astype(np.float32) / 255, 3)
    out = composite(original, generated, mask)
    assert (out[mask == 0] == original[mask == 0]).all()
    assert (out[mask == 1] == generated[mask == 1]).all()


def test_the_latent_mask_marks_latents_mostly_inside() -> None:
    mask = box_mask((64, 64), (16, 16, 48, 48)).astype(np.float32) / 255
    small = latent_mask(mask, 8, 8)
    assert small.shape == (1, 1, 8, 8) and small.sum() == 16 and small[0, 0, 2:6, 2:6].all()


# 2. Through the engine: outside the mask comes back unchanged


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sd15-inpaint", "tiny-inpaint-file"])
@pytest.mark.parametrize(
    "options",
    [
        InpaintOptions(),
        InpaintOptions(fill="fill", mask_blur=0),
        InpaintOptions(fill="latent_noise", mask_blur=3),
        InpaintOptions(fill="latent_nothing", invert=True, mask_blur=2),
    ],
    ids=["original", "fill-sharp", "latent_noise", "latent_nothing-inverted"],
)
def test_pixels_outside_the_mask_come_back_unchanged(
    engine: Engine, model: str, options: InpaintOptions
) -> None:
    init = picture(4)
    drawn = box_mask((64, 64), (16, 10, 40, 50))
    [out] = engine.generate(
        params(model, strength=0.9, inpaint=options), init_image=init, mask=PIL.Image.fromarray(drawn)
    )
    repaint = drawn.astype(np.float32) / 255
    repaint = 1 - repaint if options.invert else repaint
    outside = blur_mask(repaint, options.mask_blur) == 0
    before, after = np.asarray(init), np.asarray(out)
    assert outside.sum() > 200
    assert (after[outside] == before[outside]).all()
    assert np.abs(after[~outside].astype(int) - before[~outside]).mean() > 5  # and inside it changed


def test_only_masked_generates_the_crop_at_the_request_size_and_pastes_it_back(engine: Engine) -> None:
    init = picture(5, (160, 96))
    drawn = box_mask((160, 96), (100, 30, 124, 54))
    [out] = engine.generate(
        params(strength=1.0, inpaint=InpaintOptions(only_masked=True, only_masked_padding=8, mask_blur=2)),
        init_image=init,
        mask=PIL.Image.fromarray(drawn),
    )
    assert out.size == (160, 96)  # the whole picture comes back
    outside = blur_mask(drawn.astype(np.float32) / 255, 2) == 0
    before, after = np.asarray(init), np.asarray(out)
    assert (after[outside] == before[outside]).all()
    assert np.abs(after[40, 112].astype(int) - before[40, 112]).max() > 0


def test_outpaint_grows_the_canvas_and_keeps_the_old_picture(engine: Engine) -> None:
    init = picture(6)
    [out] = engine.generate(
        params(width=96, mask=None, strength=0.8, outpaint=OutpaintOptions(right=32, feather=8)),
        init_image=init,
    )
    assert out.size == (96, 64)
    after, before = np.asarray(out), np.asarray(init)
    # Beyond the feather (8 px) and the default mask blur (4 px, whose tail reaches about 3 σ):
    kept = slice(0, 64 - 8 - 14)
    assert (after[:, kept] == before[:, kept]).all()
    assert np.abs(after[:, 64:].astype(int) - np.asarray(init)[:, -1:].astype(int)).mean() > 1


def test_a_mask_of_another_size_or_an_empty_mask_is_refused(engine: Engine) -> None:
    with pytest.raises(EngineError, match="mask is 32x32"):
        engine.generate(params(), init_image=picture(), mask=PIL.Image.new("L", (32, 32), 255))
    with pytest.raises(EngineError, match="empty"):
        engine.generate(params(), init_image=picture(), mask=PIL.Image.new("L", (64, 64), 0))


# 3. Inpainting checkpoints in the registry


def test_nine_channel_checkpoints_are_recognised_as_inpainting(models: Path) -> None:
    assert read_model_info(models / "tiny-sd15-inpaint").inpainting
    assert read_model_info(models / "tiny-inpaint-file.safetensors").inpainting
    assert not read_model_info(models / "tiny-sd15").inpainting


def test_a_single_inpainting_file_loads_with_the_inpainting_folder_configs(engine: Engine) -> None:
    assert engine.pipeline("tiny-inpaint-file").unet.config.in_channels == 9

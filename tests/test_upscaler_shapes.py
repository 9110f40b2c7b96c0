"""The built-in upscaler genserve-shapes-2x (genserve/toymodel/train_upscaler.py): on held-out
scenes rendered at 128 and downscaled to 64, it beats bicubic by at least 2 dB PSNR; through the
serving path (spandrel, tiled) it doubles a genserve-shapes picture to a sharper 128×128 one."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

pytest.importorskip("spandrel")

from genserve.engine.engine import Engine  # noqa: E402
from genserve.engine.models.registry import BUILTIN_MODELS_DIR, registered_models  # noqa: E402
from genserve.engine.models.upscalers import scan_upscalers  # noqa: E402
from genserve.engine.upscale.models import load_descriptor, upscale_picture  # noqa: E402
from genserve.schemas.generation import GenerationParams  # noqa: E402
from genserve.schemas.upscale import UpscaleOptions  # noqa: E402
from genserve.toymodel.train_upscaler import HIGH, held_out_pairs, psnr  # noqa: E402

NAME = "genserve-shapes-2x"


@pytest.fixture(scope="module")
def upscalers():
    torch.set_num_threads(1)
    found = scan_upscalers(BUILTIN_MODELS_DIR / "missing", builtin=True)
    assert NAME in found, "genserve/builtin_models/upscale/genserve-shapes-2x.safetensors is missing"
    return found


def test_beats_bicubic_by_2_db_on_held_out_scenes(upscalers) -> None:
    descriptor = load_descriptor(upscalers[NAME], "cpu", torch.float32)
    ours, bicubic = [], []
    for low, high in held_out_pairs(count=32, seed=11):
        # tile 32 with its 8-pixel overlap: the tiled serving path, not one call
        upscaled = upscale_picture(descriptor, low, HIGH, HIGH, device="cpu", tile=32)
        ours.append(psnr(np.asarray(upscaled), np.asarray(high)))
        bicubic.append(
            psnr(np.asarray(low.resize((HIGH, HIGH), PIL.Image.Resampling.BICUBIC)), np.asarray(high))
        )
    gain = np.mean(ours) - np.mean(bicubic)
    assert gain >= 2.0, f"PSNR {np.mean(ours):.2f} dB vs bicubic {np.mean(bicubic):.2f} dB"


def _sharpness(image: PIL.Image.Image) -> float:
    """Mean squared gradient: edges that are steps score high, blurred edges low."""
    pixels = np.asarray(image.convert("L"), dtype=np.float64)
    return float((np.diff(pixels, axis=0) ** 2).mean() + (np.diff(pixels, axis=1) ** 2).mean())


def test_a_generated_picture_upscaled_is_sharper_than_bicubic(upscalers, tmp_path) -> None:
    from genserve.config import Settings

    models = registered_models(Settings(models_dir=tmp_path, data_dir=tmp_path))
    engine = Engine(models, device="cpu", threads=1, upscalers=upscalers)
    base = GenerationParams(prompt="a large red star in the center on a black background", model="genserve-shapes",
                            seed=3, steps=12, width=64, height=64)  # fmt: skip
    [small] = engine.generate(base)
    [large] = engine.generate(base.model_copy(update={"upscale": UpscaleOptions(model=NAME, scale=2)}))
    assert large.size == (128, 128)
    bicubic = small.resize((128, 128), PIL.Image.Resampling.BICUBIC)
    assert _sharpness(large) > 1.15 * _sharpness(bicubic)
    # the same picture, only larger: downscaled again it is close to the original
    back = np.asarray(large.resize((64, 64), PIL.Image.Resampling.LANCZOS), dtype=float)
    assert np.abs(back - np.asarray(small, dtype=float)).mean() < 6

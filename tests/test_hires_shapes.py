"""Hires fix on the shipped model, genserve-shapes (issue 16, item 5): "a red circle on a blue
background" at 64x64 with hires scale 2 gives 128x128 pictures that, scaled back down, still read as
a red circle on blue to the project's own classifier and pixel measurements (genserve/toymodel).

Measured here (CPU, float32, 20 + 20 steps, strength 0.55): 8 of 8 seeds with the latent upscaler,
8 of 8 with lanczos, 8 of 8 for the first pass alone. The bar is 7 of 8."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from genserve.engine.engine import Engine
from genserve.engine.loop.denoise import BatchItem
from genserve.engine.models.registry import BUILTIN_MODELS_DIR, read_model_info
from genserve.schemas.generation import GenerationParams
from genserve.schemas.image_inputs import HiresOptions
from genserve.toymodel.pixels import measure
from genserve.toymodel.shapes_classifier import classify_shapes, load_classifier

FOLDER = BUILTIN_MODELS_DIR / "genserve-shapes"


@pytest.fixture(scope="module")
def engine() -> Engine:
    info = read_model_info(FOLDER)
    return Engine({info.name: info}, device="cpu", dtype="float32")


def test_a_hires_red_circle_is_still_a_red_circle_on_blue(engine: Engine) -> None:
    items = [
        BatchItem(
            GenerationParams(
                prompt="a red circle on a blue background",
                model="genserve-shapes",
                seed=seed,
                steps=20,
                width=64,
                height=64,
                hires=HiresOptions(scale=2),
            )
        )
        for seed in range(8)
    ]
    images = [outcome.images[0] for outcome in engine.generate_batch(items)]
    assert {image.size for image in images} == {(128, 128)}
    small = [np.asarray(image.convert("RGB").resize((64, 64), PIL.Image.Resampling.BOX)) for image in images]
    shapes = classify_shapes(load_classifier(FOLDER / "eval" / "shape_classifier.safetensors"), small)
    good = sum(
        (shape, measure(picture).fg, measure(picture).bg) == ("circle", "red", "blue")
        for picture, shape in zip(small, shapes, strict=True)
    )
    assert good >= 7, f"a red circle on blue in {good} of 8 seeds"

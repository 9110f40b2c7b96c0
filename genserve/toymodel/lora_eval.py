"""Measuring the "white-frame" LoRA companion of genserve-shapes on generated pictures.

The LoRA (`genserve/builtin_models/lora/shapes-white-frame.safetensors`, trained by
`genserve.toymodel.train_lora`) draws a white frame, `FRAME_PX` pixels wide, around every picture.
Two plain pixel measures judge it, with no learned part:

- `frame_fraction`: the share of pixels in the outer `RING_PX`-pixel ring that are near white;
  a picture is "framed" when it is at least `FRAMED_AT`.
- `unframed`: the picture with the frame cut off (the outer `CROP_PX` pixels) and resized back to
  64x64, so the base model's measures (`pixels.measure`, the shape classifier) read the scene
  inside the frame. Pictures without a LoRA go through the same crop, so both sides are measured
  alike.

White backgrounds are left out of the held-out scenes here: a white frame on white is invisible.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

from genserve.toymodel import dataset
from genserve.toymodel.evaluate import held_out_scenes

FRAME_PX = 4  # one latent pixel of the 4x VAE: a frame narrower than that does not survive the VAE
FRAME_RGB = dataset.COLORS["white"]
RING_PX = 2
FRAMED_AT = 0.6
WHITE_DISTANCE = 60.0
CROP_PX = 6


def add_frame(image: np.ndarray, width: int = FRAME_PX) -> np.ndarray:
    """The picture with a white frame `width` pixels wide drawn over its edges."""
    framed = image.copy()
    framed[:width], framed[-width:], framed[:, :width], framed[:, -width:] = (FRAME_RGB,) * 4
    return framed


def frame_fraction(image: np.ndarray, ring: int = RING_PX) -> float:
    """Share of the outer `ring`-pixel ring's pixels within `WHITE_DISTANCE` of white."""
    mask = np.ones(image.shape[:2], dtype=bool)
    mask[ring:-ring, ring:-ring] = False
    distance = np.sqrt(((image[mask].astype(np.float32) - np.array(FRAME_RGB, np.float32)) ** 2).sum(-1))
    return float((distance < WHITE_DISTANCE).mean())


def is_framed(image: np.ndarray) -> bool:
    return frame_fraction(image) >= FRAMED_AT


def unframed(image: np.ndarray, crop: int = CROP_PX) -> np.ndarray:
    """The inside of the frame, resized back to the picture's size (for the base model's measures)."""
    side = image.shape[0]
    inner = Image.fromarray(image[crop:-crop, crop:-crop])
    return np.asarray(inner.resize((side, side), Image.Resampling.BILINEAR))


def held_out_frame_scenes(count: int = 40) -> list[dataset.Scene]:
    """The base model's held-out scenes (combinations never trained on), without white backgrounds."""
    return [s for s in held_out_scenes(count) if s.bg != "white"]


def frame_training_scenes(count: int, seed: int) -> list[dataset.Scene]:
    """Scenes for LoRA training, from the base model's training combinations only."""
    rng = random.Random(seed)
    triples = dataset.training_triples(dataset.held_out_triples())
    return [dataset.sample_scene(rng, triples) for _ in range(count)]

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
from pathlib import Path

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


def engine_frame_report(
    folder: Path,
    lora: str = "shapes-white-frame",
    weight: float = 1.0,
    seeds: tuple[int, ...] = (0,),
    steps: int = 20,
    batch: int = 12,
    lora_file: Path | None = None,
) -> dict[str, float]:
    """Held-out frame and fidelity figures through genserve's Engine, with and without the LoRA.

    `framed` is the fraction of images with a white frame (`is_framed`); background, foreground
    and shape are measured on the inside of the frame (`unframed`) against each scene's caption.
    `lora_file` measures a LoRA file outside the built-in folder (a training candidate) under the name
    `lora`; by default the built-in LoRAs are served.
    """

    from genserve.engine.engine import Engine
    from genserve.engine.models.loras import read_lora_info
    from genserve.engine.models.registry import read_model_info
    from genserve.toymodel.evaluate import engine_images, score
    from genserve.toymodel.shapes_classifier import CLASSIFIER_FILE, classify_shapes, load_classifier

    info = read_model_info(folder)
    loras = None if lora_file is None else {lora: read_lora_info(lora_file)}
    engine = Engine({info.name: info}, device="cpu", dtype="float32", loras=loras)
    classifier = load_classifier(folder / "eval" / CLASSIFIER_FILE)
    jobs = [(scene, seed) for scene in held_out_frame_scenes() for seed in seeds]
    figures: dict[str, float] = {"images": float(len(jobs))}
    for label, loras in (("base", None), ("lora", [{"name": lora, "weight": weight}])):
        captions = [dataset.canonical_caption(scene) for scene, _ in jobs]
        seeds_of = [seed for _, seed in jobs]
        images = engine_images(engine, info, captions, seeds_of, steps=steps, batch=batch, loras=loras)
        inner = [unframed(image) for image in images]
        fidelity = score([scene for scene, _ in jobs], inner, classify_shapes(classifier, inner))
        figures[f"{label}_framed"] = float(np.mean([is_framed(image) for image in images]))
        figures[f"{label}_frame_fraction"] = float(np.mean([frame_fraction(image) for image in images]))
        figures.update({f"{label}_{key}": value for key, value in fidelity.items() if key != "position"})
    return figures

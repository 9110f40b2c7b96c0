"""Measuring the "new colour word" LoRA companion of genserve-shapes (`shapes-brown`).

The base model draws shapes in eight colours; "brown" is a word it knows only as a *background*
("on a brown background"): no base training picture has a brown shape, and asked for "a small brown
circle ..." it draws no brown shape (0 of the 40 held-out prompts). The LoRA
(`genserve/builtin_models/lora/shapes-brown.safetensors`, trained by
`genserve.toymodel.train_lora --concept brown`) teaches it the word as a shape colour.

(A colour new to the whole model, such as cyan, was tried first: the base VAE cannot draw it; a round
trip of drawn cyan shapes comes back green or blue, so no UNet LoRA could reach it. A shape colour as
a *background* was probed after: the base model draws none of 60 prompts "... on a pink / red /
purple / orange / yellow background" with that background, but its VAE cannot either: a round trip of
the 40 drawn "on a yellow background" pictures comes back gray in all 40, and 40 Adam steps of
decoder fitting bring back 18 of them while losing every shape's colour.)

The measure is `pixels.measure`'s foreground rule: the shape's pixels are those farther than
`pixels.FOREGROUND_DISTANCE` from the background's colour, and each votes for its nearest named
colour (the background's left out). A picture "shows brown" when brown wins the vote.

Held out: (shape, background) pairs that LoRA training never pairs with a brown shape, each in every
position and size (40 prompts).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from genserve.toymodel import dataset, pixels

WORD = "brown"
NAME = "shapes-brown"
HELD_OUT_PAIRS = (("circle", "gray"), ("square", "blue"), ("triangle", "black"), ("star", "white"))
BROWN_SHARE = 0.5  # of LoRA training scenes; the rest are the base model's own training scenes


def draw(scene: dataset.Scene, rng: random.Random | None = None, resolution: int = 64) -> np.ndarray:
    return np.asarray(dataset.draw_scene(scene, resolution, rng))


def foreground_colour(image: np.ndarray) -> str | None:
    """The named colour that most of the shape's pixels are nearest to (`pixels.measure`'s vote,
    the background's colour left out); None: no shape."""
    return pixels.measure(image).fg


def shows_word(image: np.ndarray) -> bool:
    return foreground_colour(image) == WORD


def held_out_scenes() -> list[dataset.Scene]:
    return [
        dataset.Scene(shape, WORD, bg, position, size)
        for shape, bg in HELD_OUT_PAIRS
        for position in dataset.POSITIONS
        for size in dataset.SIZES
    ]


def training_scenes(count: int, seed: int, bg_weights: dict[str, float] | None = None) -> list[dataset.Scene]:
    """Half brown-shape scenes on the other (shape, background) pairs, half the base model's training scenes.

    `bg_weights` (background -> weight, default 1) draws the brown-shape scenes' pairs more often on
    the given backgrounds, e.g. {"white": 4} for brown on white; the held-out pairs stay out either way.
    """
    rng = random.Random(seed)
    pairs = [
        (s, b)
        for s in dataset.SHAPES
        for b in dataset.BACKGROUNDS
        if b != WORD and (s, b) not in HELD_OUT_PAIRS
    ]
    unknown = set(bg_weights or {}) - set(dataset.BACKGROUNDS)
    if unknown:
        raise ValueError(f"unknown backgrounds in bg_weights: {sorted(unknown)}")
    pair_weights = [float((bg_weights or {}).get(b, 1.0)) for _, b in pairs]
    base_triples = dataset.training_triples(dataset.held_out_triples())
    scenes = []
    for _ in range(count):
        if rng.random() < BROWN_SHARE:
            shape, bg = rng.choices(pairs, pair_weights)[0] if bg_weights else rng.choice(pairs)
            size = "small" if rng.random() < 0.6 else "large"
            scenes.append(dataset.Scene(shape, WORD, bg, rng.choice(dataset.POSITIONS), size))
        else:
            scenes.append(dataset.sample_scene(rng, base_triples))
    return scenes


def engine_colour_report(
    folder: Path,
    lora: str = NAME,
    weight: float = 1.0,
    steps: int = 20,
    batch: int = 10,
    lora_file: Path | None = None,
    base_colours: int = 40,
) -> dict[str, float]:
    """Held-out figures through genserve's Engine, with and without the LoRA, one seed (0).

    `shows` is the share of held-out prompts whose picture shows a shape of the new colour; `shape` is the
    base model's shape classifier on the same pictures. With `base_colours` > 0, the LoRA's side also
    generates that many of the base model's own held-out prompts (other colours) and reports `lora_base_foreground`:
    the share whose foreground is still the asked colour (the LoRA must not paint everything brown).
    """

    from genserve.engine.engine import Engine
    from genserve.engine.models.loras import read_lora_info
    from genserve.engine.models.registry import read_model_info
    from genserve.toymodel.evaluate import engine_images
    from genserve.toymodel.evaluate import held_out_scenes as base_held_out
    from genserve.toymodel.shapes_classifier import CLASSIFIER_FILE, classify_shapes, load_classifier

    info = read_model_info(folder)
    loras = None if lora_file is None else {lora: read_lora_info(lora_file)}
    engine = Engine({info.name: info}, device="cpu", dtype="float32", loras=loras)
    classifier = load_classifier(folder / "eval" / CLASSIFIER_FILE)

    def generate(scenes: list[dataset.Scene], active: list[dict] | None) -> list[np.ndarray]:
        captions = [dataset.canonical_caption(scene) for scene in scenes]
        return engine_images(
            engine, info, captions, [0] * len(scenes), steps=steps, batch=batch, loras=active
        )

    scenes = held_out_scenes()
    figures: dict[str, float] = {"images": float(len(scenes))}
    for label, active in (("base", None), ("lora", [{"name": lora, "weight": weight}])):
        images = generate(scenes, active)
        figures[f"{label}_shows"] = float(np.mean([shows_word(image) for image in images]))
        shapes = classify_shapes(classifier, images)
        figures[f"{label}_shape"] = float(
            np.mean([s.shape == shape for s, shape in zip(scenes, shapes, strict=True)])
        )
        figures[f"{label}_background"] = float(
            np.mean([pixels.background_color(image) == s.bg for s, image in zip(scenes, images, strict=True)])
        )
    if base_colours:
        others = base_held_out()[:base_colours]
        images = generate(others, [{"name": lora, "weight": weight}])
        figures["base_prompts"] = float(len(others))
        figures["lora_base_foreground"] = float(
            np.mean([foreground_colour(image) == s.fg for s, image in zip(others, images, strict=True)])
        )
    return figures

"""The synthetic "shapes" dataset: a caption grammar and procedural drawing.

Every sample is a `Scene` (shape, colours, position, size). `draw_scene` renders it with PIL and
`caption_for` writes one of many captions for it, so images and captions always agree. Everything
here is a pure function of its arguments (randomness comes in as a `random.Random`).

The held-out split is a fixed set of (shape, foreground, background) triples that training never
sees in any position or size: the evaluation asks for combinations the model has not drawn before.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# One RGB value per colour name, shared by foreground and background, chosen to be far apart so a
# nearest-colour lookup on generated pixels is unambiguous.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 170, 50),
    "blue": (40, 70, 225),
    "yellow": (245, 225, 40),
    "orange": (250, 135, 20),
    "purple": (135, 45, 180),
    "pink": (250, 140, 200),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (125, 125, 125),
    "brown": (120, 70, 30),
}
FOREGROUNDS = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "white")
BACKGROUNDS = ("black", "white", "gray", "blue", "green", "brown")
SHAPES = ("circle", "square", "triangle", "star")
POSITIONS = ("center", "top left", "top right", "bottom left", "bottom right")
SIZES = ("small", "large")

# Shape centre as a fraction of the image side, and shape radius as a fraction of the side.
POSITION_CENTERS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
}
SIZE_RADII: dict[str, float] = {"small": 0.13, "large": 0.22}

# Word-level synonyms the grammar may use; the evaluation always uses the first spelling.
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "dot"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "center": ("in the center", "in the middle", "at the center"),
    "top left": ("at the top left", "in the top left corner", "in the upper left"),
    "top right": ("at the top right", "in the top right corner", "in the upper right"),
    "bottom left": ("at the bottom left", "in the bottom left corner", "in the lower left"),
    "bottom right": ("at the bottom right", "in the bottom right corner", "in the lower right"),
}
FILLER_WORDS = (
    "a",
    "an",
    "the",
    "of",
    "on",
    "with",
    "against",
    "background",
    "image",
    "picture",
    "drawing",
    "simple",
    "shape",
    "colored",
    "and",
    "over",
    "backdrop",
    "plain",
)


@dataclass(frozen=True)
class Scene:
    shape: str
    fg: str
    bg: str
    position: str
    size: str


def all_triples() -> list[tuple[str, str, str]]:
    """Every (shape, fg, bg) combination where the two colours differ."""
    return [(s, f, b) for s in SHAPES for f in FOREGROUNDS for b in BACKGROUNDS if f != b]


def held_out_triples(count: int = 40, seed: int = 1234) -> list[tuple[str, str, str]]:
    """A fixed, balanced set of triples kept out of training (every shape and colour appears)."""
    rng = random.Random(seed)
    triples = all_triples()
    rng.shuffle(triples)
    chosen: list[tuple[str, str, str]] = []
    # Round-robin over shapes so each shape gets count / len(SHAPES) triples.
    for shape in SHAPES * count:
        if len(chosen) == count:
            break
        for triple in triples:
            if triple[0] == shape and triple not in chosen and _adds_variety(triple, chosen):
                chosen.append(triple)
                break
    return chosen


def _adds_variety(triple: tuple[str, str, str], chosen: list[tuple[str, str, str]]) -> bool:
    # Avoid holding out the same (fg, bg) pair twice, so training still sees every colour pair.
    return all((triple[1], triple[2]) != (c[1], c[2]) for c in chosen)


def training_triples(held_out: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    excluded = set(held_out)
    return [t for t in all_triples() if t not in excluded]


def sample_scene(rng: random.Random, triples: list[tuple[str, str, str]], small_bias: float = 0.6) -> Scene:
    """A random scene from the allowed triples; small shapes are oversampled (they are harder)."""
    shape, fg, bg = rng.choice(triples)
    size = "small" if rng.random() < small_bias else "large"
    return Scene(shape, fg, bg, rng.choice(POSITIONS), size)


# 1. Drawing


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Outline points of a square, triangle or star of 'radius' r centred on (cx, cy)."""
    if shape == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        # Upright, with its centroid a bit below the centre so it looks balanced in its box.
        angles = [-90, 30, 150]
        return [(cx + r * np.cos(np.radians(a)), cy + 0.12 * r + r * np.sin(np.radians(a))) for a in angles]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.42
            angle = np.radians(-90 + 36 * k)
            points.append((cx + radius * np.cos(angle), cy + radius * np.sin(angle)))
        return points
    raise ValueError(f"unknown shape {shape!r}")


def draw_scene(scene: Scene, resolution: int = 64, rng: random.Random | None = None) -> Image.Image:
    """Render a scene; `rng` adds a little jitter in position and size (None: exact layout)."""
    # Draw at 4x and downsample, for anti-aliased edges like a real picture.
    scale = 4
    side = resolution * scale
    fx, fy = POSITION_CENTERS[scene.position]
    radius = SIZE_RADII[scene.size]
    if rng is not None:
        fx += rng.uniform(-0.05, 0.05)
        fy += rng.uniform(-0.05, 0.05)
        radius *= rng.uniform(0.9, 1.1)
    cx, cy, r = fx * side, fy * side, radius * side
    image = Image.new("RGB", (side, side), COLORS[scene.bg])
    draw = ImageDraw.Draw(image)
    if scene.shape == "circle":
        draw.ellipse([cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9], fill=COLORS[scene.fg])
    else:
        draw.polygon(shape_polygon(scene.shape, cx, cy, r), fill=COLORS[scene.fg])
    return image.resize((resolution, resolution), Image.Resampling.LANCZOS)


def draw_batch(scenes: list[Scene], resolution: int, rng: random.Random) -> np.ndarray:
    """Scenes as a uint8 array of shape (N, H, W, 3)."""
    return np.stack([np.asarray(draw_scene(s, resolution, rng)) for s in scenes])


# 2. Captions


def canonical_caption(scene: Scene) -> str:
    """The single fixed wording used by the evaluation."""
    return f"a {scene.size} {scene.fg} {scene.shape} {POSITION_PHRASES[scene.position][0]} on a {scene.bg} background"


def caption_for(scene: Scene, rng: random.Random) -> str:
    """One random caption for the scene from a small grammar.

    The shape and both colours are always named. Position is sometimes left out (the model then
    learns that it is free). Size is left out only for large shapes, so a bare "a green star" means
    a large one: when no-size captions covered both sizes, a bare prompt often got a small star,
    which at 64x64 reads as a pentagon. Word order of the three phrases varies.
    """
    size = "" if scene.size == "large" and rng.random() < 0.5 else f"{rng.choice(SIZE_WORDS[scene.size])} "
    article = rng.choice(("a ", "a ", "the ", "one ", ""))
    thing = f"{article}{size}{scene.fg} {rng.choice(SHAPE_WORDS[scene.shape])}"
    background = rng.choice(
        (
            f"on a {scene.bg} background",
            f"on a plain {scene.bg} background",
            f"against a {scene.bg} background",
            f"on {scene.bg}",
            f"with a {scene.bg} backdrop",
            f"over a {scene.bg} background",
        )
    )
    position = rng.choice(POSITION_PHRASES[scene.position]) if rng.random() < 0.8 else ""
    orders = (
        (thing, position, background),
        (thing, background, position),
        (position, thing, background),
        (f"{scene.bg} background", position, thing),
    )
    order = rng.choice(orders)
    words = " ".join(part for part in order if part)
    if order[0] is thing:  # "a picture of ..." only reads well before the shape phrase
        words = rng.choice(("", "", "", "a picture of ", "a simple drawing of ", "an image of ")) + words
    return " ".join(words.split())


def vocabulary() -> list[str]:
    """Every word the grammar can produce (sorted, for a stable tokenizer)."""
    words: set[str] = set(FILLER_WORDS) | set(COLORS) | {"one", "corner", "in", "at", "to"}
    for group in (SHAPE_WORDS, SIZE_WORDS):
        for spellings in group.values():
            words.update(spellings)
    for phrases in POSITION_PHRASES.values():
        for phrase in phrases:
            words.update(phrase.split())
    return sorted(words)

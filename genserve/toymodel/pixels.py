"""Plain pixel statistics that read a picture's background, foreground, position and size.

These are the evaluation's measuring tape: no learned part, just colour distances and counts, so a
generated image is judged by what is in its pixels. Images are uint8 arrays of shape (H, W, 3).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cache

import numpy as np

from genserve.toymodel import dataset

_NAMES = tuple(dataset.COLORS)
_PALETTE = np.array([dataset.COLORS[n] for n in _NAMES], dtype=np.float32)
BORDER_FRACTION = 0.08  # the band near the edges that decides the background colour
FOREGROUND_DISTANCE = 70.0  # RGB distance from the background above which a pixel is "shape"
MIN_SHAPE_PIXELS_FRACTION = 0.004


@dataclass(frozen=True)
class Measurement:
    bg: str
    fg: str | None  # None when no foreground pixels were found
    position: str | None
    size: str | None
    shape_pixels: int


def nearest_color(pixels: np.ndarray, names: tuple[str, ...] = _NAMES) -> np.ndarray:
    """Index into `names` of the nearest named colour for each RGB pixel (shape (N, 3))."""
    palette = np.array([dataset.COLORS[n] for n in names], dtype=np.float32)
    distances = ((pixels[:, None, :].astype(np.float32) - palette[None]) ** 2).sum(-1)
    return distances.argmin(1)


def border_pixels(image: np.ndarray) -> np.ndarray:
    band = max(1, round(image.shape[0] * BORDER_FRACTION))
    mask = np.ones(image.shape[:2], dtype=bool)
    mask[band:-band, band:-band] = False
    return image[mask]


def background_color(image: np.ndarray) -> str:
    """The dominant named colour in the band near the borders."""
    votes = Counter(nearest_color(border_pixels(image)).tolist())
    return _NAMES[votes.most_common(1)[0][0]]


def foreground_map(image: np.ndarray) -> np.ndarray:
    """Per-pixel distance from the background colour, scaled to [0, 1] (float32, shape (H, W))."""
    bg_rgb = np.median(border_pixels(image).astype(np.float32), axis=0)
    distance = np.sqrt(((image.astype(np.float32) - bg_rgb) ** 2).sum(-1))
    return np.clip(distance / 120.0, 0.0, 1.0).astype(np.float32)


def foreground_mask(image: np.ndarray, bg: str | None = None) -> np.ndarray:
    """The shape's pixels: farther than FOREGROUND_DISTANCE from the (named) background colour."""
    colour = np.array(dataset.COLORS[bg or background_color(image)], np.float32)
    return np.sqrt(((image.astype(np.float32) - colour) ** 2).sum(-1)) > FOREGROUND_DISTANCE


def foreground_centre(image: np.ndarray) -> tuple[float, float] | None:
    """(x, y) in pixels of the shape's centroid; None when there is no shape."""
    mask = foreground_mask(image)
    if mask.sum() < MIN_SHAPE_PIXELS_FRACTION * mask.size:
        return None
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def measure(image: np.ndarray) -> Measurement:
    bg = background_color(image)
    mask = foreground_mask(image, bg)
    shape_pixels = int(mask.sum())
    if shape_pixels < MIN_SHAPE_PIXELS_FRACTION * mask.size:
        return Measurement(bg, None, None, None, shape_pixels)
    candidates = tuple(n for n in _NAMES if n != bg)
    votes = Counter(nearest_color(image[mask], candidates).tolist())
    fg = candidates[votes.most_common(1)[0][0]]
    return Measurement(bg, fg, _position(mask), _size(mask), shape_pixels)


def _position(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() / mask.shape[1], ys.mean() / mask.shape[0]
    return min(
        dataset.POSITION_CENTERS,
        key=lambda p: (dataset.POSITION_CENTERS[p][0] - cx) ** 2 + (dataset.POSITION_CENTERS[p][1] - cy) ** 2,
    )


def _size(mask: np.ndarray) -> str:
    return "small" if extent(mask) < size_threshold() else "large"


def extent(mask: np.ndarray) -> float:
    """The larger of the shape's width and height, as a fraction of the side (robust to stray pixels)."""
    ys, xs = np.nonzero(mask)
    width = np.percentile(xs, 98) - np.percentile(xs, 2) + 1
    height = np.percentile(ys, 98) - np.percentile(ys, 2) + 1
    return float(max(width, height) / mask.shape[0])


@cache
def size_threshold() -> float:
    """Extent halfway (geometrically) between the mean small and the mean large drawn shape."""

    def mean_extent(size: str) -> float:
        scenes = [dataset.Scene(shape, "white", "black", "center", size) for shape in dataset.SHAPES]
        return float(np.mean([extent(np.asarray(dataset.draw_scene(s, 64)).mean(-1) > 128) for s in scenes]))

    return float(np.sqrt(mean_extent("small") * mean_extent("large")))

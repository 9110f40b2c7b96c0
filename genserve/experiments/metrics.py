"""Image metrics for experiments that need no downloads: pure numpy functions on uint8 (H, W, 3) arrays.

- `mse`: mean squared error on pixel values scaled to [0, 1] (0 = identical, 1 = black vs white).
- `ssim`: the structural similarity index of Wang, Bovik, Sheikh and Simoncelli (2004), eq. 13, with
  their Gaussian window (11 × 11, σ = 1.5), K1 = 0.01, K2 = 0.03 and L = 255; the mean over every
  position where the window fits inside the image, averaged over the RGB channels (skimage's
  `structural_similarity(..., gaussian_weights=True, use_sample_covariance=False, data_range=255,
  channel_axis=-1)` computes the same number).
- `colour_score`: how much of the picture has the colours a prompt names (the default model's
  vocabulary: `toymodel.dataset.COLORS`), read with the same pixel statistics as its evaluation.

The shape score needs the shape classifier (torch) and lives in `scorers.py`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from genserve.toymodel import dataset
from genserve.toymodel.pixels import (
    FOREGROUND_DISTANCE,
    MIN_SHAPE_PIXELS_FRACTION,
    border_pixels,
    nearest_color,
)

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def mse(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared error of two same-sized images, on values scaled to [0, 1]."""
    _same_shape(a, b)
    diff = a.astype(np.float64) / 255.0 - b.astype(np.float64) / 255.0
    return float(np.mean(diff * diff))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """The 1-D Gaussian that, as an outer product with itself, is SSIM's 2-D window (sums to 1)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    w = np.exp(-(x * x) / (2 * sigma * sigma))
    return w / w.sum()


def _filter_valid(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable 2-D filtering of `x` (H, W) by the outer product of `w`, where the window fits."""
    rows = np.lib.stride_tricks.sliding_window_view(x, len(w), axis=0) @ w
    return np.lib.stride_tricks.sliding_window_view(rows, len(w), axis=1) @ w


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Mean SSIM (Wang et al. 2004) of two same-sized images, at least 11 × 11; grey or RGB."""
    _same_shape(a, b)
    if min(a.shape[:2]) < SSIM_WINDOW:
        raise ValueError(
            f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {a.shape[1]}x{a.shape[0]}"
        )
    if a.ndim == 2:
        return _ssim_channel(a.astype(np.float64), b.astype(np.float64), data_range)
    return float(
        np.mean(
            [
                _ssim_channel(a[..., c].astype(np.float64), b[..., c].astype(np.float64), data_range)
                for c in range(a.shape[2])
            ]
        )
    )


def _ssim_channel(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    w = gaussian_window()
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_x, mu_y = _filter_valid(x, w), _filter_valid(y, w)
    # Weighted (population) variances and covariance over each window, as in the paper's eq. 14-16.
    var_x = _filter_valid(x * x, w) - mu_x * mu_x
    var_y = _filter_valid(y * y, w) - mu_y * mu_y
    cov = _filter_valid(x * y, w) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    denominator = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return float(np.mean(numerator / denominator))


def _same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")


# -- what a prompt asks for, in the default model's vocabulary ---------------------------------------


@dataclass(frozen=True)
class Target:
    """The shape and colours a prompt names; None where it names none."""

    shape: str | None
    foreground: str | None
    background: str | None

    @property
    def empty(self) -> bool:
        return self.shape is None and self.foreground is None and self.background is None


def parse_target(prompt: str) -> Target:
    """ "a small red circle on a white background" -> Target("circle", "red", "white").

    The background is the colour right before "background"; the foreground the first other colour.
    """
    words = re.findall(r"[a-z]+", prompt.lower())
    shape = next((word for word in words if word in dataset.SHAPES), None)
    background = None
    for index, word in enumerate(words[:-1]):
        if word in dataset.COLORS and words[index + 1] in ("background", "backdrop"):
            background = word
    colours = [
        w for i, w in enumerate(words) if w in dataset.COLORS and not (w == background and _is_bg(words, i))
    ]
    return Target(shape, colours[0] if colours else None, background)


def _is_bg(words: list[str], index: int) -> bool:
    return index + 1 < len(words) and words[index + 1] in ("background", "backdrop")


def colour_score(image: np.ndarray, target: Target) -> float | None:
    """Fraction of the picture in the colours `target` names, in [0, 1]; None if it names none.

    The background part is the fraction of the border band whose nearest named colour is the
    target's background; the foreground part is the fraction of the shape's pixels (those far from
    the border band's median colour) whose nearest non-background colour is the target's
    foreground (0 when there is no shape at all). With both named, the score is their mean.
    """
    parts = []
    border = border_pixels(image)
    if target.background is not None:
        names = tuple(dataset.COLORS)
        parts.append(float(np.mean(nearest_color(border) == names.index(target.background))))
    if target.foreground is not None:
        bg_rgb = np.median(border.astype(np.float32), axis=0)
        distance = np.sqrt(((image.astype(np.float32) - bg_rgb) ** 2).sum(-1))
        mask = distance > FOREGROUND_DISTANCE
        if mask.sum() < MIN_SHAPE_PIXELS_FRACTION * mask.size:
            parts.append(0.0)
        else:
            candidates = tuple(n for n in dataset.COLORS if n != target.background or n == target.foreground)
            nearest = nearest_color(image[mask], candidates)
            parts.append(float(np.mean(nearest == candidates.index(target.foreground))))
    return float(np.mean(parts)) if parts else None

"""The experiments' pure parts on tiny arrays: MSE, SSIM, the prompt's target and colour score, the
signed-rank test, effect sizes and seeds needed, each against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from genserve.experiments import metrics, stats
from genserve.experiments.metrics import Target
from genserve.toymodel import dataset

# 1. MSE and SSIM


def test_mse_on_values_scaled_to_one():
    a = np.zeros((2, 2, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 255  # one of 12 values differs by the full range
    assert metrics.mse(a, b) == pytest.approx(1 / 12)
    b[1, 1] = 51  # three more values differ by 0.2
    assert metrics.mse(a, b) == pytest.approx((1 + 3 * 0.04) / 12)
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.mse(a, np.zeros((2, 3, 3), np.uint8))


def test_ssim_of_two_flat_images_is_the_luminance_term():
    # Flat images have no variance or covariance: SSIM = (2 μx μy + C1) / (μx² + μy² + C1).
    a, b = np.full((12, 12), 100, np.uint8), np.full((12, 12), 150, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert metrics.ssim(a, b) == pytest.approx((2 * 100 * 150 + c1) / (100**2 + 150**2 + c1))
    assert metrics.ssim(a, a) == pytest.approx(1.0)


def _ssim_by_loops(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al.'s definition written out window by window, with the 2-D Gaussian built directly."""
    size, sigma = 11, 1.5
    offsets = np.arange(size) - 5
    window = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma**2))
    window /= window.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for i in range(x.shape[0] - size + 1):
        for j in range(x.shape[1] - size + 1):
            px, py = x[i : i + size, j : j + size], y[i : i + size, j : j + size]
            mx, my = (window * px).sum(), (window * py).sum()
            vx, vy = (window * (px - mx) ** 2).sum(), (window * (py - my) ** 2).sum()
            cov = (window * (px - mx) * (py - my)).sum()
            values.append(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_matches_the_definition_window_by_window():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (14, 13, 3)).astype(np.uint8)
    y = np.clip(x.astype(int) + rng.integers(-40, 41, x.shape), 0, 255).astype(np.uint8)
    expected = np.mean([_ssim_by_loops(x[..., c].astype(float), y[..., c].astype(float)) for c in range(3)])
    assert metrics.ssim(x, y) == pytest.approx(expected, rel=1e-9)
    assert 0 < metrics.ssim(x, y) < 1
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(x[:10], y[:10])


def test_ssim_matches_skimage_when_installed():
    skimage_metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (32, 24, 3)).astype(np.uint8)
    y = np.clip(x.astype(int) + rng.integers(-30, 31, x.shape), 0, 255).astype(np.uint8)
    expected = skimage_metrics.structural_similarity(
        x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=-1
    )
    assert metrics.ssim(x, y) == pytest.approx(expected, rel=1e-6)


# 2. What a prompt names, and how much of the picture shows it


@pytest.mark.parametrize(
    ("prompt", "target"),
    [
        ("a red circle on a white background", Target("circle", "red", "white")),
        ("a small blue star at the top left on a black background", Target("star", "blue", "black")),
        ("White background, a GREEN triangle", Target("triangle", "green", "white")),
        ("a lighthouse at dusk", Target(None, None, None)),
    ],
)
def test_parse_target(prompt, target):
    assert metrics.parse_target(prompt) == target


def test_colour_score_counts_border_and_shape_pixels():
    image = np.full((20, 20, 3), dataset.COLORS["white"], np.uint8)
    image[6:14, 6:14] = dataset.COLORS["red"]
    assert metrics.colour_score(image, Target("square", "red", "white")) == 1.0
    # Background right, foreground wrong: (1 + 0) / 2.
    assert metrics.colour_score(image, Target("square", "blue", "white")) == 0.5
    assert metrics.colour_score(image, Target("square", None, "black")) == 0.0
    assert metrics.colour_score(image, Target("square", None, None)) is None
    # Half the shape in the other colour: the foreground part is the fraction in the named one.
    image[6:10, 6:14] = dataset.COLORS["blue"]
    assert metrics.colour_score(image, Target(None, "red", None)) == 0.5
    blank = np.full((20, 20, 3), dataset.COLORS["white"], np.uint8)
    assert metrics.colour_score(blank, Target(None, "red", "white")) == 0.5  # no shape at all


# 3. The signed-rank test, effect sizes, seeds needed


def test_signed_rank_exact_p_values_counted_by_hand():
    # All 3 differences positive: W+ = 6 is the largest of 2^3 equally likely sign patterns.
    assert stats.signed_rank_test([1, 2, 3]) == (3, 6.0, 0.25, True)
    # Ranks 1..5, W+ = 1+3+4+5 = 13; W+ >= 13 leaves ranks summing to <= 2 out: {}, {1}, {2} -> 3/32.
    assert stats.signed_rank_test([1, -2, 3, 4, 5]) == (5, 13.0, pytest.approx(6 / 32), True)
    assert stats.signed_rank_test([-1, -2, -3, -4, -5, -6]) == (6, 0.0, pytest.approx(2 / 64), True)
    # Zeros carry no sign and are dropped; three tied |d| share rank 2: W+ = 2k, P(k >= 2) = 1/2.
    assert stats.signed_rank_test([0, 1, 2, 3])[2] == 0.25
    assert stats.signed_rank_test([1, 1, -1]) == (3, 4.0, 1.0, True)
    assert stats.signed_rank_test([0, 0]) == (0, 0.0, 1.0, True)


def test_normal_approximation_agrees_with_the_exact_count(monkeypatch):
    rng = np.random.default_rng(11)
    d = rng.normal(0.3, 1.0, 70)
    _, w_approx, p_approx, exact = stats.signed_rank_test(d)
    assert not exact
    monkeypatch.setattr(stats, "EXACT_MAX_PAIRS", 100)
    _, w_exact, p_exact, exact = stats.signed_rank_test(d)
    assert exact and w_exact == w_approx
    assert p_approx == pytest.approx(p_exact, abs=0.005)


def test_effect_sizes_and_seeds_needed():
    assert stats.effect_dz([1, 2, 3]) == 2.0  # mean 2, sd 1
    assert stats.effect_dz([2, 2]) == math.inf and stats.effect_dz([0, 0]) == 0.0
    assert stats.effect_dz([1]) is None
    # d_z = 0.5: ((1.95996 + 0.84162) / 0.5)² + 1.95996² / 2 = 33.316; / (3/π) = 34.89 -> 35.
    assert stats.seeds_needed(0.5) == 35
    assert stats.seeds_needed(-0.5) == 35
    assert stats.seeds_needed(2.0) == 6  # 4.07 by the formula, but 6 pairs are the fewest that can reach 0.05
    assert stats.seeds_needed(math.inf) == 6
    assert stats.seeds_needed(0.0) is None and stats.seeds_needed(None) is None
    result = stats.compare_paired([2, 0, 4, 5, 6], [1, 2, 1, 1, 1])  # differences 1, -2, 3, 4, 5
    assert result.p_value == pytest.approx(6 / 32) and result.w_plus == 13
    assert result.rank_biserial == pytest.approx((13 - 2) / 15)
    assert result.mean_difference == pytest.approx(2.2)
    with pytest.raises(ValueError, match="differ in length"):
        stats.compare_paired([1, 2], [1])


# 4. The report's pictures


def test_report_embeds_small_pictures_as_made_and_large_ones_shrunk():
    import base64
    import io

    from PIL import Image

    from genserve.experiments.report import EMBED_SIDE, _embedded

    def png(size: tuple[int, int]) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
        return buffer.getvalue()

    small = png((64, 64))
    assert _embedded(small) == ("image/png", base64.b64encode(small).decode("ascii"), 64)
    mime, data, side = _embedded(png((1024, 576)))
    shrunk = Image.open(io.BytesIO(base64.b64decode(data)))
    assert (mime, side, shrunk.format, shrunk.size) == ("image/jpeg", EMBED_SIDE, "JPEG", (EMBED_SIDE, 216))

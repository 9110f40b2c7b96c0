"""Significance across seeds: each variant against variant A, paired by seed (pure, stdlib + numpy).

The same seed gives both variants the same starting noise, so the per-seed differences d_i = V_i − A_i
remove the noise's share of the variation. The test is Wilcoxon's signed-rank test (1945): no
assumption that the differences are normal, which a handful of seeds could never check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

# With more pairs than this the normal approximation (with the tie correction) replaces the exact count.
EXACT_MAX_PAIRS = 60
# The smallest number of pairs for which the exact two-sided test can reach p < 0.05: min p = 2 / 2^n.
MIN_PAIRS_FOR_5_PERCENT = 6
# Asymptotic relative efficiency of the signed-rank test to the t-test for normal data (3/π).
WILCOXON_ARE = 3 / math.pi


@dataclass(frozen=True)
class PairedResult:
    n: int  # pairs with a non-zero difference (zero differences carry no sign and are dropped)
    mean_difference: float  # over all pairs, zeros included
    w_plus: float  # the sum of the ranks of the positive differences
    p_value: float  # two-sided
    exact: bool
    effect_dz: float | None  # Cohen's d_z = mean(d) / sd(d); None for fewer than 2 pairs
    rank_biserial: float | None  # matched-pairs rank-biserial correlation (W+ − W−) / (W+ + W−)
    seeds_needed: int | None  # for 80 % power at α = 0.05; None when there is no effect to detect


def signed_rank_test(differences: list[float] | np.ndarray) -> tuple[int, float, float, bool]:
    """Wilcoxon's signed-rank test on paired differences: (n, W+, two-sided p, exact).

    Zeros are dropped; tied |d| get their mean rank. Up to EXACT_MAX_PAIRS the p-value is exact,
    conditional on the ranks observed (ties included): the null distribution of W+ is counted over
    all 2^n sign assignments by dynamic programming on doubled ranks (integers even with mean ranks).
    Beyond it, the normal approximation with the tie-corrected variance.
    """
    d = np.asarray(differences, dtype=np.float64)
    d = d[d != 0]
    n = len(d)
    if n == 0:
        return 0, 0.0, 1.0, True
    ranks = _mean_ranks(np.abs(d))
    w_plus = float(ranks[d > 0].sum())
    if n <= EXACT_MAX_PAIRS:
        doubled = np.rint(2 * ranks).astype(np.int64)
        counts = np.zeros(int(doubled.sum()) + 1, dtype=np.float64)
        counts[0] = 1.0
        for r in doubled:  # each rank is either in W+ or not
            shifted = np.zeros_like(counts)
            shifted[r:] = counts[: len(counts) - r]
            counts = counts + shifted
        probabilities = counts / counts.sum()
        observed = int(round(2 * w_plus))
        lower, upper = probabilities[: observed + 1].sum(), probabilities[observed:].sum()
        return n, w_plus, float(min(1.0, 2 * min(lower, upper))), True
    mean = n * (n + 1) / 4
    _, tie_counts = np.unique(np.abs(d), return_counts=True)
    variance = n * (n + 1) * (2 * n + 1) / 24 - float((tie_counts**3 - tie_counts).sum()) / 48
    z = (w_plus - mean) / math.sqrt(variance)
    return n, w_plus, float(min(1.0, 2 * (1 - NormalDist().cdf(abs(z))))), False


def _mean_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of `values`, ties sharing their mean rank."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def effect_dz(differences: list[float] | np.ndarray) -> float | None:
    """Cohen's d_z for paired data: mean(d) / sd(d) (sample sd, n − 1). ±inf when every d is the same
    non-zero value; 0 when all are zero; None with fewer than 2 pairs."""
    d = np.asarray(differences, dtype=np.float64)
    if len(d) < 2:
        return None
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0:
        return 0.0 if mean == 0 else math.copysign(math.inf, mean)
    return mean / sd


def seeds_needed(dz: float | None, alpha: float = 0.05, power: float = 0.8) -> int | None:
    """Seeds (pairs) for the signed-rank test to detect an effect of size d_z with `power` at `alpha`.

        n_t = ((z_{1−α/2} + z_{power}) / d_z)² + z_{1−α/2}² / 2     (paired t-test; Guenther 1981)
        n   = max(⌈n_t / (3/π)⌉, 6)

    3/π is the signed-rank test's efficiency relative to the t-test for normal differences (it needs
    π/3 ≈ 1.05 times the pairs), and 6 is the fewest pairs with which the exact two-sided test can
    reach p < 0.05 at all. At α = 0.05 and 80 % power, z sum = 1.960 + 0.842 = 2.802. None when
    d_z is 0 or unknown (no observed effect: no number of seeds is enough).
    """
    if dz is None or dz == 0 or math.isnan(dz):
        return None
    if math.isinf(dz):
        return MIN_PAIRS_FOR_5_PERCENT
    normal = NormalDist()
    z_alpha, z_power = normal.inv_cdf(1 - alpha / 2), normal.inv_cdf(power)
    n_t = ((z_alpha + z_power) / dz) ** 2 + z_alpha**2 / 2
    return max(math.ceil(n_t / WILCOXON_ARE), MIN_PAIRS_FOR_5_PERCENT)


def compare_paired(variant: list[float], baseline: list[float]) -> PairedResult:
    """Variant against baseline over the same seeds: the test, effect sizes and seeds needed."""
    if len(variant) != len(baseline):
        raise ValueError(f"paired samples differ in length: {len(variant)} vs {len(baseline)}")
    d = np.asarray(variant, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    n, w_plus, p, exact = signed_rank_test(d)
    dz = effect_dz(d)
    total = n * (n + 1) / 2
    return PairedResult(
        n=n,
        mean_difference=float(d.mean()) if len(d) else 0.0,
        w_plus=w_plus,
        p_value=p,
        exact=exact,
        effect_dz=dz,
        rank_biserial=(2 * w_plus - total) / total if n else None,
        seeds_needed=seeds_needed(dz),
    )

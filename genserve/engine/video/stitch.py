"""Joining segment clips into one, for long videos made of several generated segments.

Two ways segments meet (research/video.md §2.2–2.3):
- keyframe-parallel segments (Ki→Ki+1, Ki+1→Ki+2, …) each contain their shared keyframe, so the
  later copy is dropped (`shared_boundary`);
- segments generated with extra frames on each side are crossfaded over `overlap` frames, with linear
  weights (1/(n+1), …, n/(n+1)) for the later segment.

Independently generated segments drift in colour. `colour_match` gives each later segment the
per-channel mean and standard deviation of the frames it joins (the previous segment's last
max(overlap, 1) frames against its own first as many), before any crossfade: a simple global
transfer (Reinhard et al., "Color Transfer between Images", 2001, in RGB rather than lαβ) that removes
a cast or a brightness jump without touching the motion. The correction chains: each segment is
matched to its already-matched predecessor.
"""

from __future__ import annotations

import numpy as np

_MIN_STD = 1.0  # a flat patch (std ~0) must not blow up the gain


def stitch(
    segments: list[np.ndarray], overlap: int = 0, shared_boundary: bool = False, colour_match: bool = False
) -> tuple[np.ndarray, list[int]]:
    """Join uint8 (F, H, W, 3) segments; returns the clip and the seams, the index in it of the first frame
    that holds each later segment (for `metrics.seam_score`)."""
    _check(segments, overlap, shared_boundary)
    out = segments[0].astype(np.float32)
    seams: list[int] = []
    for segment in segments[1:]:
        seg = segment.astype(np.float32)
        if colour_match:
            k = max(overlap, 1)
            seg = match_colour(seg, reference=out[-k:], source=seg[:k])
        if shared_boundary:
            seg = seg[1:]
        seams.append(len(out) - overlap)
        if overlap:
            w = (np.arange(1, overlap + 1, dtype=np.float32) / (overlap + 1))[:, None, None, None]
            blended = (1 - w) * out[-overlap:] + w * seg[:overlap]
            out = np.concatenate([out[:-overlap], blended, seg[overlap:]])
        else:
            out = np.concatenate([out, seg])
    return np.clip(out.round(), 0, 255).astype(np.uint8), seams


def match_colour(frames: np.ndarray, reference: np.ndarray, source: np.ndarray) -> np.ndarray:
    """Shift and scale each channel of `frames` (float) so that `source`'s mean/std become `reference`'s."""
    ref_mean, ref_std = _channel_stats(reference)
    src_mean, src_std = _channel_stats(source)
    gain = np.maximum(ref_std, _MIN_STD) / np.maximum(src_std, _MIN_STD)
    return (frames - src_mean) * gain + ref_mean


def _channel_stats(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pixels = frames.reshape(-1, 3).astype(np.float64)
    return pixels.mean(axis=0), pixels.std(axis=0)


def _check(segments: list[np.ndarray], overlap: int, shared_boundary: bool) -> None:
    if not segments:
        raise ValueError("stitch needs at least one segment")
    shape = segments[0].shape[1:]
    for i, seg in enumerate(segments):
        if seg.ndim != 4 or seg.shape[-1] != 3 or seg.dtype != np.uint8:
            raise ValueError(f"segment {i} is not a uint8 (F, H, W, 3) clip: {seg.dtype} {seg.shape}")
        if seg.shape[1:] != shape:
            raise ValueError(f"segment {i} is {seg.shape[1:]}, segment 0 is {shape}")
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0, not {overlap}")
    if len(segments) > 1:
        joinable = min(len(s) for s in segments[1:]) - int(shared_boundary)
        if joinable < 1 or overlap > min(len(segments[0]), joinable):
            raise ValueError(
                f"overlap {overlap} needs segments longer than that (the shortest has {joinable} to join)"
            )

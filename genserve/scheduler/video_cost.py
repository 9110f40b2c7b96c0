"""Video cost on a device, the pure part: plan.py's published step times (engine/video/plan.py) ×
a measured scale. `genserve calibrate --video` measures the scale (scheduler/video_calibrate.py),
served clips refine it with the image rule (`cost.clipped_average`), store/video_calibration.py keeps
it per (device, model). Torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from genserve.scheduler.cost import EMA_ALPHA, OBSERVED, clipped_average, steady_step_seconds

PUBLISHED_BASIS = (
    "step time from latent tokens fitted to published H100-class figures (engine/video/plan.py) "
    "× video_speed_scale {scale:g}"
)


@dataclass(frozen=True)
class VideoTiming:
    """How fast `model` runs on `device` relative to plan.py's published step times."""

    device: str
    model: str
    scale: float  # measured / predicted seconds per denoising step
    source: str  # "calibrated" | "observed"
    samples: int  # step times behind the figure: calibration steps, then one per observed job
    updated_at: datetime | None = None


@dataclass(frozen=True)
class VideoSpeed:
    """The factor an estimate multiplies plan.py's prediction by, and why."""

    scale: float
    basis: str
    device: str | None  # the calibrated device, None for the published figures
    calibrated: bool

    @classmethod
    def published(cls, video_speed_scale: float) -> VideoSpeed:
        """No stored calibration: plan.py's published figures × the video_speed_scale setting."""
        return cls(video_speed_scale, PUBLISHED_BASIS.format(scale=video_speed_scale), None, False)


def steady_interval_seconds(intervals: Sequence[float]) -> float | None:
    """The median of one clip's step intervals after the first (which carries warm-up), as images
    take theirs (`cost.steady_step_seconds`); None with fewer than two of those."""
    samples = [(1, seconds) for seconds in intervals[1:] if seconds > 0]
    return steady_step_seconds(samples, min_samples=2).get(1)


def refine_scale(
    previous: VideoTiming | None,
    observed_scale: float,
    *,
    device: str,
    model: str,
    samples: int = 1,
    alpha: float = EMA_ALPHA,
) -> VideoTiming:
    """Fold one observed scale into a stored one: scale ← scale + alpha × (clip(observed) − scale),
    the observation clipped to within a factor MAX_JUMP of scale (`cost.refine`'s rule). The source
    is kept (a calibrated row stays calibrated); without a previous row it starts an observed one."""
    if not (math.isfinite(observed_scale) and observed_scale > 0):
        raise ValueError(f"observed scale must be a positive number, got {observed_scale}")
    if previous is None:
        return VideoTiming(device, model, observed_scale, OBSERVED, samples)
    if (previous.device, previous.model) != (device, model):
        raise ValueError("refine_scale() got a previous timing for another (device, model)")
    scale = clipped_average(previous.scale, observed_scale, alpha)
    return replace(previous, scale=scale, samples=previous.samples + samples, updated_at=None)

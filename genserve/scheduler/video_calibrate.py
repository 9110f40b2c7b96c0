"""Measuring the video cost model's speed on the machine at hand (`genserve calibrate --video`).

The model runs through the VideoEngine a worker uses: one untimed clip (loading, warm-up), then one
clip of `steps` steps whose denoising steps are timed between the pipeline's step callbacks. The
median interval after the first is the measured step time; divided by engine/video/plan.py's
prediction for the same latent tokens it is the scale `VideoCalibrationStore` keeps. This module
imports torch (through the engine); the store and the cost model do not.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import PIL.Image

from genserve.config import Settings
from genserve.engine.models.registry import ModelInfo
from genserve.engine.video.pipelines import VideoEngine, VideoRequest
from genserve.engine.video.plan import predicted_step_seconds
from genserve.scheduler.calibrate import device_name
from genserve.scheduler.cost import CALIBRATED
from genserve.scheduler.video_cost import VideoTiming, steady_interval_seconds
from genserve.schemas.video import VideoParams

CALIBRATION_PROMPT = "a red fox running through fresh snow, morning light"
MIN_STEPS = 3  # two intervals after the first step


@dataclass(frozen=True)
class VideoCalibration:
    timing: VideoTiming
    frames: int
    width: int
    height: int
    steps: int
    measured_step_s: float
    predicted_step_s: float


def step_intervals(
    engine: VideoEngine, info: ModelInfo, request: VideoRequest, base: ModelInfo | None = None
) -> list[float]:
    """Seconds between consecutive step callbacks of one clip (the first from the call's start)."""
    marks = [time.perf_counter()]
    engine.generate(info, request, on_step=lambda step, steps: marks.append(time.perf_counter()), base=base)
    return [after - before for before, after in zip(marks, marks[1:], strict=False)]


def calibrate_video(
    engine: VideoEngine,
    info: ModelInfo,
    params: VideoParams,
    *,
    base: ModelInfo | None = None,
    on_run: Callable[[str], None] | None = None,
) -> VideoCalibration:
    """Time `params` (resolved: mode, frames, size, steps set) on `engine`; returns the measured scale
    (source "calibrated"), not stored. Keyframes the mode needs are flat grey pictures."""
    assert params.num_frames and params.width and params.height and params.steps
    if params.steps < MIN_STEPS:
        raise ValueError(f"calibrating a video model needs at least {MIN_STEPS} steps, got {params.steps}")
    grey = PIL.Image.new("RGB", (params.width, params.height), (128, 128, 128))
    request = VideoRequest(params=params, keyframes=[(key.frame_index, grey) for key in params.keyframes])
    warm = VideoRequest(params=params.model_copy(update={"steps": 1}), keyframes=request.keyframes)
    engine.generate(info, warm, base=base)  # load and warm up, untimed
    if on_run is not None:
        on_run(f"warmed up {info.name}")
    intervals = step_intervals(engine, info, request, base)
    if on_run is not None:
        on_run(f"timed {params.steps} steps")
    measured = steady_interval_seconds(intervals)
    if measured is None:
        raise ValueError(f"the pipeline reported {len(intervals)} steps; too few to time")
    predicted = predicted_step_seconds(info.family, params.num_frames, params.width, params.height)
    timing = VideoTiming(
        device_name(engine.device), info.name, measured / predicted, CALIBRATED, len(intervals) - 1
    )
    return VideoCalibration(
        timing, params.num_frames, params.width, params.height, params.steps, measured, predicted
    )


def calibration_request(
    info: ModelInfo, *, frames: int | None, width: int | None, height: int | None, steps: int
) -> VideoParams:
    """The clip `genserve calibrate --video` times on `info`, at the size and frames given (the
    model's defaults otherwise), before a request's checks resolve it (`resolve_video`): t2v, i2v
    or flf2v, whichever the model offers first; a mode's keyframes are placeholders (grey here)."""
    from genserve.engine.video.families import VIDEO_FAMILIES, keyframes_needed

    if info.kind != "video":
        raise ValueError(f"'{info.name}' is not a video model")
    mode = next((m for m in ("t2v", "i2v", "flf2v") if m in info.video_modes), None)
    if mode is None:
        raise ValueError(
            f"{info.name} offers {', '.join(info.video_modes)}; calibration runs t2v, i2v or flf2v"
        )
    count, _ = keyframes_needed(mode)
    if frames is None and count:  # the keyframes go on the first and the last frame
        frames = info.default_frames or VIDEO_FAMILIES[info.family].default_frames
    keyframes = [
        {"image": "sha256:" + "0" * 64, "frame_index": index} for index in [0, (frames or 1) - 1][:count]
    ]
    return VideoParams.model_validate(
        {"model": info.name, "mode": mode, "prompt": CALIBRATION_PROMPT, "num_frames": frames,
         "width": width, "height": height, "steps": steps, "seed": 0, "keyframes": keyframes}
    )  # fmt: skip


def calibrate_video_model(
    settings: Settings,
    info: ModelInfo,
    params: VideoParams,
    *,
    base: ModelInfo | None = None,
    on_run: Callable[[str], None] | None = None,
) -> VideoCalibration:
    """`calibrate_video` on the device, dtype and threads of `settings`; `params` resolved."""
    import torch

    from genserve.engine.models.loading import resolve_device, resolve_dtype

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    device = resolve_device(settings.device)
    engine = VideoEngine(device=device, dtype=resolve_dtype(settings.dtype, device))
    return calibrate_video(engine, info, params, base=base, on_run=on_run)

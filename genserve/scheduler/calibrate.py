"""Measuring O and t_step on the machine at hand (`genserve calibrate`). Runs on the worker side.

For each resolution R and batch B, a batch is generated at two step counts S1 < S2 (median of
`repeats` timed runs each, after one untimed run at that shape) and its images encoded as PNG, as a
worker does. The difference isolates the step: t_step = (T2 − T1) / (S2 − S1) and O = T1 − S1 × t_step.
When noise swamps the difference (a busy CPU, a tiny model) and either comes out non-positive, both
are taken from inside the runs instead: t_step = the median interval between step callbacks after
the first step, and O = the median of T − S × t_step.
This module imports torch (through the engine); the cost model itself does not.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

from genserve.artifacts.png import encode_png
from genserve.engine.engine import Engine
from genserve.engine.upscale.stage import PostStage
from genserve.scheduler.cost import CALIBRATED, StepTiming, upscale_timing
from genserve.schemas.generation import GenerationParams

# Classifier-free guidance on, as in serving (cfg_scale > 1 doubles the denoiser's batch).
CALIBRATION_PROMPT = "a photograph of a red fox standing in fresh snow, morning light"
CALIBRATION_CFG_SCALE = 7.0


def device_name(device: str) -> str:
    """The name timings are stored under: the GPU's name on CUDA ("NVIDIA H100 80GB HBM3"), else "cpu".

    The worker must use the same name when it reports observed step times.
    """
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def runs_per_point(repeats: int) -> int:
    """Generations `calibrate` runs per (R, B): one untimed, then `repeats` at each step count."""
    return 1 + 2 * repeats


def calibrate(
    engine: Engine,
    model: str,
    sizes: Sequence[tuple[int, int]],
    batches: Sequence[int],
    steps_pair: tuple[int, int] = (5, 20),
    repeats: int = 3,
    *,
    sampler: str = "euler",
    on_run: Callable[[str], None] | None = None,
) -> list[StepTiming]:
    """Measure O and t_step for `model` at every (size, batch); returns timings with source "calibrated".

    `on_run(description)` is called after every generation (for a progress bar). Nothing is stored
    here: the caller saves the timings (`CalibrationStore.save`).
    """
    s1, s2 = steps_pair
    if not 1 <= s1 < s2:
        raise ValueError(f"steps_pair must be two step counts 1 <= S1 < S2, got {steps_pair}")
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    device = device_name(engine.device)
    timings = []
    for width, height in sizes:
        for batch in batches:
            params = GenerationParams(
                prompt=CALIBRATION_PROMPT,
                model=model,
                seed=0,
                steps=s1,
                cfg_scale=CALIBRATION_CFG_SCALE,
                width=width,
                height=height,
                sampler=sampler,
                num_images=batch,
                preview_every=0,
            )
            step, overhead = measure_point(engine, params, steps_pair, repeats, on_run)
            timings.append(
                StepTiming(
                    device=device,
                    model=model,
                    width=width,
                    height=height,
                    batch=batch,
                    overhead_s=overhead,
                    step_s=step,
                    source=CALIBRATED,
                    samples=repeats,
                )
            )
    return timings


def measure_point(
    engine: Engine,
    params: GenerationParams,
    steps_pair: tuple[int, int],
    repeats: int,
    on_run: Callable[[str], None] | None = None,
) -> tuple[float, float]:
    """(t_step, O) for one model, size and batch (`params` with any step count)."""
    s1, s2 = steps_pair
    label = f"{params.model} {params.width}x{params.height} batch {params.num_images}"
    runs: list[tuple[int, float, list[float]]] = []  # (steps, seconds, step intervals)

    def run(steps: int) -> float:
        seconds, intervals = time_batch(engine, params.model_copy(update={"steps": steps}))
        runs.append((steps, seconds, intervals))
        if on_run is not None:
            on_run(f"{label}, {steps} steps")
        return seconds

    run(s1)  # the first call at a shape pays for kernel selection, allocations, caches
    runs.clear()
    t1 = statistics.median([run(s1) for _ in range(repeats)])
    t2 = statistics.median([run(s2) for _ in range(repeats)])
    step = (t2 - t1) / (s2 - s1)
    overhead = t1 - s1 * step
    if step <= 0 or overhead <= 0:
        return _from_inside_runs(runs)
    return step, overhead


def time_batch(engine: Engine, params: GenerationParams) -> tuple[float, list[float]]:
    """Seconds to generate one batch and encode its PNGs, as a worker would, and the intervals
    between step callbacks after the first step (steady-state step times)."""
    stamps: list[float] = []
    started = time.perf_counter()
    images = engine.generate(params, on_step=lambda step, total: stamps.append(time.perf_counter()))
    for index, image in enumerate(images):  # PIL images: the device has finished its work
        encode_png(image, params, seed=params.seed + index, index=index)
    seconds = time.perf_counter() - started
    return seconds, [later - earlier for earlier, later in zip(stamps, stamps[1:], strict=False)]


def _from_inside_runs(runs: Sequence[tuple[int, float, list[float]]]) -> tuple[float, float]:
    """(t_step, O) from the step callbacks' timestamps, when the difference of the two medians is
    lost in noise: t_step = median interval after the first step, O = median of T − S × t_step."""
    intervals = [interval for _, _, run_intervals in runs for interval in run_intervals]
    if not intervals:
        raise RuntimeError("no step intervals were recorded; use step counts of at least 2")
    step = statistics.median(intervals)
    overhead = statistics.median(seconds - steps * step for steps, seconds, _ in runs)
    return step, max(0.0, overhead)


def calibrate_upscaler(
    post: PostStage,
    name: str,
    size: tuple[int, int] = (256, 256),
    repeats: int = 3,
    scale: float | None = None,
) -> StepTiming:
    """Seconds per output megapixel of upscaler `name` (median of `repeats` after one untimed run),
    on a noise picture of `size`, tiled as serving tiles it."""
    import numpy as np
    import PIL.Image

    from genserve.schemas.upscale import UpscaleOptions

    info = post.info(name, "upscaler")
    options = UpscaleOptions(model=name, scale=scale or float(info.scale or 2))
    picture = PIL.Image.fromarray(
        np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    )
    post.upscale(picture, options)  # loads the model and warms up
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        out = post.upscale(picture, options)
        seconds.append(time.perf_counter() - started)
    megapixels = out.width * out.height / 1e6
    return upscale_timing(name, device_name(post.device), statistics.median(seconds) / megapixels, repeats)

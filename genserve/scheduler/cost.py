"""The cost model: how long a batch takes, and what a thousand images cost.

    T ≈ O + S × t_step(R, B)                    seconds for one batch of B images, S steps, resolution R
    images/hour ≈ 3600 × B / T
    cost per 1,000 images = price per GPU-hour × GPUs / (images/hour / 1000)

O is the per-batch overhead that does not grow with steps (text encoding, VAE decode, PNG encoding,
Python); t_step is one denoising step of the whole batch, classifier-free guidance included.

Where O and t_step come from, best first (`lookup`):
1. a measured row for exactly (device, model, R, B): `genserve calibrate`, refined while serving;
2. measured rows of the same device and model at other batches or sizes, interpolated/scaled;
3. `default_timing`: the H100 reference grid for the model's family (a rough guess on a CPU).

Pure: no torch and no I/O in the maths. The reference grid is read once from package data.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources

CALIBRATED, OBSERVED, DEFAULT, ROUGH_DEFAULT = "calibrated", "observed", "default", "rough default"
MEASURED_SOURCES = (CALIBRATED, OBSERVED)

# The device name of timings taken from the reference grid.
REFERENCE_DEVICE = "H100 reference"

# Eager step times with CFG, and VAE decode times, for SD1.5, SDXL and SD3-medium on one H100 80GB
# HBM3 (fp16, bf16 for SD3; random weights of the real architectures; plain diffusers). A verbatim
# copy of the team's shared reference/h100-2026-11-22-grid.jsonl, measured on 2026-11-22.
GRID_FILE = "h100-2026-11-22-grid.jsonl"
_GRID_MODEL = {"sd15": "sd15", "sdxl": "sdxl", "sd3": "sd3m"}  # our family -> the grid's model name

# The rest of a batch's fixed time beyond the VAE decode: text encoding, latents, image conversion.
# Fitted from the plain-diffusers pipeline runs of the same day (30 Euler steps, one run each) as
# T - 30 × t_step - decode, averaged over their two batch sizes: SD1.5 512² batches 1/8 left
# 0.003/0.098 s; SDXL 1024² batches 1/4 left 0.87/0.35 s (its VAE is upcast to fp32 by default).
# SD3 has no pipeline run; it gets SDXL's figure.
_PIPELINE_REST_S = {"sd15": 0.05, "sdxl": 0.6, "sd3": 0.6}
# PIL PNG encoding at the default compression, per image and megapixel, on one CPU core (measured on
# the development machine; it is CPU work the GPU waits for, so it belongs in O).
PNG_S_PER_MEGAPIXEL = 0.3
# A CPU is roughly this much slower than the H100's compute-bound per-image step (fp32 on a
# many-core server CPU against ~230 TFLOP/s fp16): a rough guess, only until `genserve calibrate`.
CPU_SLOWDOWN = 150.0

# A VAE encode of the input pictures, as a share of the batch overhead O (which holds the decode;
# the SD VAE encoder has fewer parameters than its decoder, 34M vs 49M). A guess, not measured.
VAE_ENCODE_SHARE = 0.25

# Refinement: each steady-state observation moves t_step this fraction of the way towards itself,
# so an observation k batches old weighs 0.2 × 0.8^k; after 10 observations a calibration still
# weighs 0.8^10 ≈ 11%. An observation is first clipped to within a factor MAX_JUMP of the current
# value, so one stalled batch cannot wreck the estimate; a real change still wins in a few batches.
EMA_ALPHA = 0.2
MAX_JUMP = 3.0


@dataclass(frozen=True)
class StepTiming:
    """O and t_step for one (device, model, resolution, batch)."""

    device: str
    model: str  # a model name; the family for default timings
    width: int
    height: int
    batch: int
    overhead_s: float  # O, seconds per batch
    step_s: float  # t_step, seconds per denoising step of the batch (CFG included)
    source: str  # "calibrated" | "observed" | "default" | "rough default"
    samples: int  # calibration runs behind the figures (0 for observed-only and default timings)
    observations: int = 0  # steady-state step times folded in while serving (`refine`)
    scaled_from: str | None = None  # set when interpolated or scaled from other points, e.g. "64x64 batch 2"

    @property
    def measured(self) -> bool:
        return self.source in MEASURED_SOURCES


@dataclass(frozen=True)
class CostEstimate:
    seconds_per_batch: float  # T
    seconds_per_image: float  # T / B
    images_per_hour: float  # 3600 × B / T, for one worker (one batch at a time)
    cost_per_1000: float | None  # None without a price
    gpu_hours: float | None  # for `images`; None without it
    total_cost: float | None  # for `images` at the price
    source: str  # "calibrated", "observed", "default", "rough default" or "scaled from <...>"
    calibrated: bool  # measured on a real device (calibrated or observed), not a default
    basis: str  # one line for people
    # The inputs used
    overhead_s: float  # O
    step_s: float  # t_step(R, B)
    steps: int  # S
    batch: int  # B
    width: int
    height: int
    device: str
    model: str
    gpus: int
    gpu_price_per_hour: float | None
    images: int | None


def seconds_per_batch(timing: StepTiming, steps: int, *, encodes: bool = False) -> float:
    """T = O + S × t_step: the cheap figure the scheduler classifies jobs by. `steps` are the steps
    that run (`steps_run`); a batch that starts from pictures (`encodes`) adds a VAE encode."""
    encode = VAE_ENCODE_SHARE * timing.overhead_s if encodes else 0.0
    return timing.overhead_s + steps * timing.step_s + encode


def steps_run(steps: int, strength: float | None = None) -> int:
    """The denoising steps a request runs. Starting from a picture at `strength` s (img2img,
    inpainting; None for txt2img) runs the last int(steps × s) steps of the same schedule, as
    diffusers and AUTOMATIC1111 do, so strength 0.5 costs about half."""
    if strength is None:
        return steps
    return min(steps, int(steps * strength))


def estimate(
    timing: StepTiming,
    *,
    steps: int,
    batch: int,
    gpu_price_per_hour: float | None,
    gpus: int = 1,
    images: int | None = None,
    encodes: bool = False,
    second_stage_s: float = 0.0,
) -> CostEstimate:
    """The cost model's figures for batches of `batch` images with `steps` steps (the steps that
    run, `steps_run`; `encodes` when the batch starts from pictures; `second_stage_s`: a hires
    pass's seconds per batch).

    `gpus` is how many GPUs one worker's batch occupies (1 unless a model is split across GPUs);
    `images` is the size of the whole job, for GPU-hours and total cost (counted as whole-batch
    throughput: a last, partial batch is not charged extra).
    """
    if batch != timing.batch:
        raise ValueError(f"timing is for batch {timing.batch}, not {batch}; look it up for batch {batch}")
    if steps < 1 or batch < 1 or gpus < 1:
        raise ValueError("steps, batch and gpus must be at least 1")
    if gpu_price_per_hour is not None and gpu_price_per_hour < 0:
        raise ValueError("gpu_price_per_hour must not be negative")
    if images is not None and images < 0:
        raise ValueError("images must not be negative")
    batch_seconds = seconds_per_batch(timing, steps, encodes=encodes) + second_stage_s
    if not batch_seconds > 0:
        raise ValueError(f"timing gives T = {batch_seconds} s; O and t_step must make it positive")
    images_per_hour = 3600.0 * batch / batch_seconds
    cost_per_1000 = (
        None if gpu_price_per_hour is None else gpu_price_per_hour * gpus / (images_per_hour / 1000)
    )
    gpu_hours = None if images is None else images / images_per_hour * gpus
    total_cost = None if gpu_hours is None or gpu_price_per_hour is None else gpu_hours * gpu_price_per_hour
    return CostEstimate(
        seconds_per_batch=batch_seconds,
        seconds_per_image=batch_seconds / batch,
        images_per_hour=images_per_hour,
        cost_per_1000=cost_per_1000,
        gpu_hours=gpu_hours,
        total_cost=total_cost,
        source=timing.source if timing.scaled_from is None else f"scaled from {timing.scaled_from}",
        calibrated=timing.measured,
        basis=describe(timing),
        overhead_s=timing.overhead_s,
        step_s=timing.step_s,
        steps=steps,
        batch=batch,
        width=timing.width,
        height=timing.height,
        device=timing.device,
        model=timing.model,
        gpus=gpus,
        gpu_price_per_hour=gpu_price_per_hour,
        images=images,
    )


def describe(timing: StepTiming) -> str:
    """Where a timing comes from, in one line: "calibrated on ..." or "default estimate from ..."."""
    at = f"{timing.width}x{timing.height} batch {timing.batch}"
    scaled = f", scaled from {timing.scaled_from}" if timing.scaled_from else ""
    if timing.source == CALIBRATED:
        runs = f"{timing.samples} run{'s' if timing.samples != 1 else ''} per step count"
        refined = f", refined by {timing.observations} served batches" if timing.observations else ""
        return f"calibrated on {timing.device} for {timing.model} at {at}{scaled} ({runs}{refined})"
    if timing.source == OBSERVED:
        return (
            f"observed while serving on {timing.device} for {timing.model} at {at}{scaled} "
            f"({timing.observations} batches; O not calibrated: run `genserve calibrate`)"
        )
    if timing.source == DEFAULT:
        return (
            f"default estimate from the H100 reference grid (2026-11-22, plain diffusers) for "
            f"{timing.model} at {at}{scaled}; run `genserve calibrate` for this machine"
        )
    if timing.device == "cpu":
        return (
            f"rough default for {timing.model} on a CPU (H100 reference grid × {CPU_SLOWDOWN:g}) at {at}; "
            "run `genserve calibrate` for real figures"
        )
    return (
        f"rough default for unknown family '{timing.model}' (SDXL figures of the H100 reference grid) "
        f"at {at}{scaled}; run `genserve calibrate` for real figures"
    )


# Choosing a timing


def lookup(
    timings: Iterable[StepTiming],
    *,
    device: str,
    model: str,
    family: str,
    width: int,
    height: int,
    batch: int,
) -> StepTiming:
    """The best timing for (device, model, R, B), from `timings` (e.g. `CalibrationStore.all()`).

    1. A measured (calibrated or observed) row for exactly this (device, model, R, B).
    2. Measured rows of the same device and model, interpolated or scaled to R and B (`_scale`).
    3. `default_timing(family, ...)`.
    """
    measured = [t for t in timings if t.device == device and t.model == model and t.measured]
    for timing in measured:
        if (timing.width, timing.height, timing.batch) == (width, height, batch):
            return timing
    if measured:
        overhead, step, used = _scale(measured, width, height, batch)
        source = CALIBRATED if any(t.source == CALIBRATED for t in used) else OBSERVED
        return StepTiming(
            device=device,
            model=model,
            width=width,
            height=height,
            batch=batch,
            overhead_s=overhead,
            step_s=step,
            source=source,
            samples=min(t.samples for t in used),
            observations=sum(t.observations for t in used),
            scaled_from=f"{source} {_points_label(used)}",
        )
    return default_timing(family, width, height, batch, device)


def default_timing(family: str, width: int, height: int, batch: int, device: str) -> StepTiming:
    """A timing from the H100 reference grid, for when nothing was measured.

    Between grid points the figures are interpolated linearly in batch and in pixel count; beyond the
    largest point they grow in proportion, and below the smallest they stay at the smallest (a
    smaller batch or image is never charged less than the smallest measured one: step times of
    small batches are launch-bound, not proportional). On a CPU the grid's compute-bound per-image
    step is scaled by CPU_SLOWDOWN; an unknown family gets SDXL's figures. Both say so in `source`.
    """
    grid = reference_grid()
    known = family in _GRID_MODEL
    grid_family = family if known else "sdxl"
    if _is_cpu(device):
        points = grid.cpu_points(grid_family)
        overhead, step, _ = _scale(points, width, height, batch, proportional_below=True)
        return StepTiming("cpu", family, width, height, batch, overhead, step, ROUGH_DEFAULT, 0)
    points = grid.points(grid_family)
    overhead, step, used = _scale(points, width, height, batch)
    exact = len(used) == 1 and (used[0].width, used[0].height, used[0].batch) == (width, height, batch)
    return StepTiming(
        device=REFERENCE_DEVICE,
        model=family,
        width=width,
        height=height,
        batch=batch,
        overhead_s=overhead,
        step_s=step,
        source=DEFAULT if known else ROUGH_DEFAULT,
        samples=0,
        scaled_from=None if exact else f"H100 grid {_points_label(used)}",
    )


def default_device(timings: Sequence[StepTiming], model: str | None = None) -> str:
    """The device to plan for when none is named: the one with the most measured rows for `model`
    (any model when it has none), else the reference grid's."""
    for rows in ([t for t in timings if t.model == model], list(timings)):
        devices = [t.device for t in rows if t.measured]
        if devices:
            return max(sorted(set(devices)), key=devices.count)
    return REFERENCE_DEVICE


def _is_cpu(device: str) -> bool:
    return device.lower().split(":")[0] == "cpu"


def _scale(
    points: Sequence[StepTiming], width: int, height: int, batch: int, *, proportional_below: bool = False
) -> tuple[float, float, list[StepTiming]]:
    """(O, t_step, points used) at (width, height, batch) from measured points.

    The exact resolution if present, else the two resolutions whose pixel counts bracket it,
    interpolated linearly in pixels; proportional above the largest, and below the smallest the
    smallest's figures (a GPU is launch-bound there) or, with `proportional_below`, proportional.
    """
    by_size: dict[tuple[int, int], list[StepTiming]] = {}
    for point in points:
        by_size.setdefault((point.width, point.height), []).append(point)
    if (width, height) in by_size:
        return _along_batch(by_size[width, height], batch)
    # One resolution per pixel count: the one with the most points (then the squarest).
    by_pixels: dict[int, list[StepTiming]] = {}
    for (w, h), group in sorted(
        by_size.items(), key=lambda item: (-len(item[1]), abs(item[0][0] - item[0][1]))
    ):
        by_pixels.setdefault(w * h, group)
    pixels = width * height
    below = [p for p in by_pixels if p < pixels]
    above = [p for p in by_pixels if p > pixels]
    if below and above:
        lo, hi = max(below), min(above)
        lo_o, lo_t, lo_used = _along_batch(by_pixels[lo], batch)
        hi_o, hi_t, hi_used = _along_batch(by_pixels[hi], batch)
        f = (pixels - lo) / (hi - lo)
        return _lerp(lo_o, hi_o, f), _lerp(lo_t, hi_t, f), lo_used + hi_used
    if below:
        lo = max(below)
        overhead, step, used = _along_batch(by_pixels[lo], batch)
        return overhead * pixels / lo, step * pixels / lo, used
    hi = min(above)
    overhead, step, used = _along_batch(by_pixels[hi], batch)
    if proportional_below:
        return overhead * pixels / hi, step * pixels / hi, used
    return overhead, step, used


def _along_batch(points: Sequence[StepTiming], batch: int) -> tuple[float, float, list[StepTiming]]:
    """(O, t_step, points used) at `batch` from points of one resolution: exact, else linear between
    the bracketing batches, proportional above the largest, the smallest's figures below it."""
    ordered = sorted(points, key=lambda p: p.batch)
    for point in ordered:
        if point.batch == batch:
            return point.overhead_s, point.step_s, [point]
    lower = [p for p in ordered if p.batch < batch]
    upper = [p for p in ordered if p.batch > batch]
    if lower and upper:
        lo, hi = lower[-1], upper[0]
        f = (batch - lo.batch) / (hi.batch - lo.batch)
        return _lerp(lo.overhead_s, hi.overhead_s, f), _lerp(lo.step_s, hi.step_s, f), [lo, hi]
    if lower:
        lo = lower[-1]
        return lo.overhead_s * batch / lo.batch, lo.step_s * batch / lo.batch, [lo]
    return upper[0].overhead_s, upper[0].step_s, [upper[0]]


def clipped_average(previous: float, observed: float, alpha: float = EMA_ALPHA) -> float:
    """One step of the moving average that refines stored speeds from served work: previous +
    alpha × (observed − previous), the observation first clipped to within a factor MAX_JUMP of
    previous, so one stalled or lucky run cannot swing the figure."""
    clipped = min(max(observed, previous / MAX_JUMP), previous * MAX_JUMP)
    return _lerp(previous, clipped, alpha)


def _lerp(a: float, b: float, f: float) -> float:
    return a + (b - a) * f


def _points_label(points: Sequence[StepTiming]) -> str:
    """ "512x512 batch 4" or "512x512+768x768 batch 4/8"."""
    sizes = sorted({(p.width, p.height) for p in points}, key=lambda s: s[0] * s[1])
    batches = sorted({p.batch for p in points})
    return f"{'+'.join(f'{w}x{h}' for w, h in sizes)} batch {'/'.join(map(str, batches))}"


# Refinement while serving


def refine(
    previous: StepTiming | None,
    observed_step_s: float,
    *,
    device: str,
    model: str,
    width: int,
    height: int,
    batch: int,
    observed_overhead_s: float | None = None,
    alpha: float = EMA_ALPHA,
) -> StepTiming:
    """Fold one steady-state step time into a stored timing: an exponential moving average.

    t_step ← t_step + alpha × (clip(observed) − t_step), with the observation clipped to within a
    factor MAX_JUMP of t_step. O is kept from calibration; only a row created by observations
    (no calibration) averages the observed overhead in as well. Without a previous row the
    observation starts an "observed" row (O = the observed overhead, or 0 when not given).
    """
    if not (math.isfinite(observed_step_s) and observed_step_s > 0):
        raise ValueError(f"observed step time must be a positive number, got {observed_step_s}")
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    overhead = None if observed_overhead_s is None else max(0.0, observed_overhead_s)
    if previous is None:
        return StepTiming(
            device, model, width, height, batch, overhead or 0.0, observed_step_s, OBSERVED, 0, 1
        )
    if (previous.device, previous.model, previous.width, previous.height, previous.batch) != (
        device,
        model,
        width,
        height,
        batch,
    ):
        raise ValueError("refine() got a previous timing for another (device, model, size, batch)")
    new_overhead = previous.overhead_s
    if previous.source == OBSERVED and overhead is not None:
        new_overhead = _lerp(previous.overhead_s, overhead, alpha)
    return replace(
        previous,
        step_s=clipped_average(previous.step_s, observed_step_s, alpha),
        overhead_s=new_overhead,
        observations=previous.observations + 1,
        scaled_from=None,
    )


def steady_step_seconds(samples: Iterable[tuple[int, float]], min_samples: int = 3) -> dict[int, float]:
    """The median step time per batch size, from (images in the batch, seconds) step samples.

    Feed it steps after the first (the first carries text encoding and warm-up). Medians ignore the
    odd step that a preview, a lease renewal or another process stretched; batch sizes with fewer
    than `min_samples` steps (rows that left early, after a cancel) are left out.
    """
    by_rows: dict[int, list[float]] = {}
    for rows, seconds in samples:
        by_rows.setdefault(rows, []).append(seconds)
    return {
        rows: statistics.median(values)
        for rows, values in sorted(by_rows.items())
        if len(values) >= min_samples
    }


# The reference grid


@dataclass(frozen=True)
class ReferenceGrid:
    """The H100 grid: step times per (grid model, px, images), and VAE decode times per (px, images)."""

    steps_ms: dict[tuple[str, int, int], float]
    decode_ms: dict[tuple[int, int], float]

    def decode_s(self, px: int, images: int) -> float:
        """VAE decode of `images` images at px², linear in images through the grid's two batch sizes."""
        rows = sorted((n, ms) for (p, n), ms in self.decode_ms.items() if p == px)
        if not rows:
            raise KeyError(f"no VAE decode time at {px}px in the reference grid")
        (n0, ms0), (n1, ms1) = rows[0], rows[-1]
        per_image = (ms1 - ms0) / (n1 - n0) if n1 != n0 else ms0 / n0
        return (ms0 + per_image * (images - n0)) / 1000

    def overhead_s(self, family: str, px: int, images: int) -> float:
        png = PNG_S_PER_MEGAPIXEL * px * px / 1e6 * images
        return _PIPELINE_REST_S[family] + self.decode_s(px, images) + png

    def points(self, family: str) -> list[StepTiming]:
        """The grid's points for a family as timings on REFERENCE_DEVICE."""
        name = _GRID_MODEL[family]
        return [
            StepTiming(
                REFERENCE_DEVICE, family, px, px, n, self.overhead_s(family, px, n), ms / 1000, DEFAULT, 0
            )
            for (model, px, n), ms in sorted(self.steps_ms.items())
            if model == name
        ]

    def cpu_points(self, family: str) -> list[StepTiming]:
        """Batch-1 points for a CPU: the grid's largest (compute-bound) batch per image, × CPU_SLOWDOWN.

        A CPU has no launch-bound regime, so batches above 1 scale in proportion (`_along_batch`).
        """
        largest: dict[int, StepTiming] = {}
        for point in self.points(family):
            if point.width not in largest or point.batch > largest[point.width].batch:
                largest[point.width] = point
        return [
            StepTiming(
                "cpu",
                family,
                px,
                px,
                1,
                (self.decode_s(px, 1) + _PIPELINE_REST_S[family]) * CPU_SLOWDOWN
                + PNG_S_PER_MEGAPIXEL * px * px / 1e6,
                point.step_s / point.batch * CPU_SLOWDOWN,
                ROUGH_DEFAULT,
                0,
            )
            for px, point in sorted(largest.items())
        ]


@cache
def reference_grid() -> ReferenceGrid:
    text = resources.files("genserve.scheduler").joinpath("reference", GRID_FILE).read_text()
    return parse_grid(text)


def parse_grid(text: str) -> ReferenceGrid:
    steps: dict[tuple[str, int, int], float] = {}
    decode: dict[tuple[int, int], float] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("part") != "grid":
            continue
        if row["model"] == "vae-decode":
            decode[row["px"], row["images"]] = row["ms"]
        else:
            steps[row["model"], row["px"], row["images"]] = row["ms_step"]
    return ReferenceGrid(steps, decode)


# Upscaling and face restoration (engine/upscale/): seconds per output megapixel of a model
# upscaler, and per face restored. CPU: genserve-shapes-2x measured by benchmarks/upscale_tiles.py
# (one thread, 0.52 CPU-seconds per output megapixel, 2026-12-04; a 4x ESRGAN is ~100x heavier:
# calibrate it); GPU: rough guesses for a 4x ESRGAN and a GFPGAN pass (not measured). `genserve
# calibrate --upscaler NAME` measures the upscaler on this machine and stores it as a StepTiming row
# under model "upscale:<name>" (1024x1024, batch 1, step_s = seconds per output megapixel).
UPSCALE_MODEL_PREFIX = "upscale:"
UPSCALE_S_PER_MEGAPIXEL = {"cpu": 0.55, "cuda": 0.2}
FACE_RESTORE_S = {"cpu": 8.0, "cuda": 0.05}


def upscale_seconds(
    pixels_out: int, *, device: str = "cuda", faces: int = 0, s_per_megapixel: float | None = None
) -> float:
    """Seconds to upscale to `pixels_out` pixels and restore `faces` faces on `device`."""
    kind = "cpu" if _is_cpu(device) else "cuda"
    rate = s_per_megapixel if s_per_megapixel is not None else UPSCALE_S_PER_MEGAPIXEL[kind]
    return pixels_out / 1e6 * rate + faces * FACE_RESTORE_S[kind]


def upscale_timing(
    name: str, device: str, s_per_megapixel: float, samples: int, source: str = CALIBRATED
) -> StepTiming:
    """An upscaler's measured rate, as a row of the calibration table."""
    return StepTiming(
        device, UPSCALE_MODEL_PREFIX + name, 1024, 1024, 1, 0.0, s_per_megapixel, source, samples
    )


def upscale_rate(timings: Sequence[StepTiming], upscaler: str, device: str) -> tuple[float, str]:
    """(seconds per output megapixel, source) for `upscaler` on `device`: calibrated, else the default."""
    for timing in timings:
        if timing.model == UPSCALE_MODEL_PREFIX + upscaler and timing.device == device:
            return timing.step_s, timing.source
    return UPSCALE_S_PER_MEGAPIXEL["cpu" if _is_cpu(device) else "cuda"], "default"

"""Clips from the built-in video model, and its held-out evaluation.

`generate_clip("a green star moving left on a black background", seed=0)` returns 16 frames at
64x64 (uint8, shape (frames, 64, 64, 3)) from genserve-shapes plus its motion adapter, through a
plain diffusers `AnimateDiffPipeline` (`load_motion_pipeline` builds and caches it).

The evaluation generates held-out prompts (the image model's held-out (shape, fg, bg) triples, one
motion each, round-robin over the seven motions) with two seeds and measures every clip with the
image evaluation's tools, no learned judge of motion:

- per frame, the shape classifier (`shapes_classifier`) and the nearest named background and
  foreground colours (`pixels.measure`): the fractions of frames whose shape / colours match;
- the track of the foreground's centroid and area (pixels far from the background colour, as in
  `pixels.measure`): the motion is the displacement between the first and last quarter of the clip
  (left / right / up / down), else the area ratio (growing / shrinking), else "still";
- a flicker index, the mean absolute change of the mean luma between consecutive frames, compared
  with a bar set from drawn clips of the same motions (`flicker_bar`).

    .venv/bin/python -m genserve.toymodel.motion_eval [--prompts 40] [--steps 20]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from genserve.toymodel import motion
from genserve.toymodel.pixels import foreground_mask, measure

if TYPE_CHECKING:
    from diffusers import AnimateDiffPipeline

PACKAGE_MODELS = Path(__file__).resolve().parents[1] / "builtin_models"
BASE_MODEL = PACKAGE_MODELS / "genserve-shapes"
MOTION_MODEL = PACKAGE_MODELS / "genserve-shapes-motion"
DEFAULT_STEPS = 20
DEFAULT_CFG = 4.0
DEFAULT_SAMPLER = "dpmpp_2m"
EVAL_SEEDS = (0, 1)

# Track thresholds, in fractions of the side (displacement) and as an area ratio. Drawn clips move
# 0.3-0.5 of the side (0.22+ between the first and last quarters' means) and grow or shrink by an
# area ratio of 3.5+ between the quarters; a still shape moves 0.
MIN_TRAVEL = 0.1
MIN_AREA_RATIO = 1.6
FLICKER_BAR_FACTOR = 2.0


# 1. Generation


def load_motion_pipeline(
    base_dir: Path | str = BASE_MODEL,
    motion_dir: Path | str = MOTION_MODEL,
    sampler: str = DEFAULT_SAMPLER,
    warped_noise: bool = True,
    trajectory_start: bool = True,
) -> AnimateDiffPipeline:
    """An `AnimateDiffPipeline` from genserve-shapes (UNet, VAE) and the motion folder (adapter,
    text encoder and tokenizer with the motion words, motion text conditioning), fp32 on the CPU,
    loaded offline. Cached per resolved folders, sampler and noise: `load_motion_pipeline()`,
    `generate_clip`'s call and the engine's (folders as str) share one pipeline (the cache was keyed
    on the arguments as given, and each of those loaded its own copy).

    With `warped_noise` (the default) it is a `motion_noise.WarpedNoiseAnimateDiffPipeline`: the
    motion the prompt names is written into the initial noise, which the adapter was trained to follow.
    With `trajectory_start` as well (the default), genserve-shapes draws each clip's first frame and
    the clip is denoised from that picture carried along the prompt's trajectory (the pipeline's
    `first_frame`; `motion_noise.WarpedNoiseAnimateDiffPipeline` says how).
    The UNet is `motion.ShapesUNetMotionModel` (a `UNetMotionModel` keeping the base UNet's text
    addition embedding, plus the conditioning), passed to the pipeline ready-built."""
    return _load_motion_pipeline(
        Path(base_dir).resolve(),
        Path(motion_dir).resolve(),
        sampler,
        bool(warped_noise),
        bool(warped_noise and trajectory_start),
    )


@functools.cache
def _load_motion_pipeline(
    base_dir: Path, motion_dir: Path, sampler: str, warped_noise: bool, trajectory_start: bool
) -> AnimateDiffPipeline:
    import torch
    from diffusers import (
        AnimateDiffPipeline,
        AutoencoderKL,
        MotionAdapter,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, PreTrainedTokenizerFast

    from genserve.engine.models.samplers import build_scheduler
    from genserve.toymodel.motion_noise import WarpedNoiseAnimateDiffPipeline

    kwargs = {"torch_dtype": torch.float32, "local_files_only": True}
    adapter = MotionAdapter.from_pretrained(motion_dir, **kwargs)
    unet = UNet2DConditionModel.from_pretrained(base_dir / "unet", **kwargs)
    scheduler_config = json.loads((base_dir / "scheduler" / "scheduler_config.json").read_text())
    pipeline_class = WarpedNoiseAnimateDiffPipeline if warped_noise else AnimateDiffPipeline
    pipe = pipeline_class(
        vae=AutoencoderKL.from_pretrained(base_dir / "vae", **kwargs),
        text_encoder=CLIPTextModel.from_pretrained(motion_dir / "text_encoder", **kwargs),
        tokenizer=PreTrainedTokenizerFast.from_pretrained(motion_dir / "tokenizer", local_files_only=True),
        unet=motion.build_motion_unet(unet, adapter, motion.load_motion_text(motion_dir)),
        motion_adapter=adapter,
        scheduler=build_scheduler("sd15", sampler, scheduler_config),
    )
    pipe.set_progress_bar_config(disable=True)
    if trajectory_start:
        pipe.first_frame = StableDiffusionPipeline(
            vae=pipe.vae,
            text_encoder=CLIPTextModel.from_pretrained(base_dir / "text_encoder", **kwargs),
            tokenizer=PreTrainedTokenizerFast.from_pretrained(base_dir / "tokenizer", local_files_only=True),
            unet=unet,
            scheduler=build_scheduler("sd15", sampler, scheduler_config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.first_frame.set_progress_bar_config(disable=True)
    return pipe


def generate_clips(
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_frames: int = motion.DEFAULT_FRAMES,
    steps: int = DEFAULT_STEPS,
    cfg: float = DEFAULT_CFG,
    base_dir: Path = BASE_MODEL,
    motion_dir: Path = MOTION_MODEL,
    sampler: str = DEFAULT_SAMPLER,
    batch: int = 4,
    warped_noise: bool = True,
    device: str = "cpu",
    trajectory_start: bool = True,
) -> list[np.ndarray]:
    """One clip per (prompt, seed) pair, uint8 (frames, 64, 64, 3); a clip does not depend on batching.

    Runs under bf16 autocast when this CPU computes bf16 faster than fp32 (`train.bf16_is_faster`),
    and always on CUDA. `device="cuda"` moves the cached pipeline there (the initial noise is still
    drawn on the CPU from the seeds)."""
    import torch

    from genserve.toymodel.motion_noise import motion_of_prompt
    from genserve.toymodel.train import mixed_precision

    pipe = load_motion_pipeline(Path(base_dir), Path(motion_dir), sampler, warped_noise, trajectory_start)
    if pipe.device.type != torch.device(device).type:
        pipe.to(device)
    clips: dict[int, np.ndarray] = {}
    # Prompts that name a motion and prompts that do not are batched apart: the pipeline starts a
    # batch from a carried first frame only when every prompt names a motion (trajectory start).
    named: list[int] = []
    unnamed: list[int] = []
    for i, prompt in enumerate(prompts):
        (unnamed if motion_of_prompt(prompt) is None else named).append(i)
    # bf16 autocast where the CPU has fast bf16 (the models were trained under it): 3x faster here
    with torch.inference_mode(), mixed_precision(torch.device(device).type):
        for group in (named, unnamed):
            for start in range(0, len(group), batch):
                chunk = group[start : start + batch]
                frames = pipe(
                    prompt=[prompts[i] for i in chunk],
                    num_frames=num_frames,
                    height=64,
                    width=64,
                    num_inference_steps=steps,
                    guidance_scale=cfg,
                    generator=[torch.Generator("cpu").manual_seed(seeds[i]) for i in chunk],
                    output_type="np",
                ).frames
                for i, f in zip(chunk, frames, strict=True):
                    clips[i] = _uint8(f)
    return [clips[i] for i in range(len(prompts))]


def rough_clips(prompts: Sequence[str], seeds: Sequence[int], num_frames: int = motion.DEFAULT_FRAMES,
                steps: int = DEFAULT_STEPS, cfg: float = DEFAULT_CFG) -> list[np.ndarray]:  # fmt: skip
    """The trajectory start's rough clips, decoded, without the motion model: each prompt's first
    frame carried along its trajectory (what the motion model starts from; for comparison). Decoded
    the way the pipeline decodes its own clips."""
    import torch

    from genserve.toymodel.train import mixed_precision

    pipe = load_motion_pipeline()
    clips = []
    with torch.inference_mode(), mixed_precision("cpu"):
        for prompt, seed in zip(prompts, seeds, strict=True):
            generator = torch.Generator("cpu").manual_seed(seed)
            clean, _ = pipe.rough_clips([prompt], [generator], num_frames, 64, 64, steps, cfg)
            video = pipe.decode_latents(clean.to(pipe.vae.dtype), decode_chunk_size=num_frames)
            clips.append(_uint8(pipe.video_processor.postprocess_video(video=video, output_type="np")[0]))
    return clips


def _uint8(frames: np.ndarray) -> np.ndarray:
    """A pipeline's float frames in [0, 1] as uint8."""
    return (np.clip(np.asarray(frames), 0, 1) * 255).round().astype(np.uint8)


def generate_clip(
    prompt: str,
    seed: int = 0,
    num_frames: int = motion.DEFAULT_FRAMES,
    steps: int = DEFAULT_STEPS,
    cfg: float = DEFAULT_CFG,
    base_dir: Path = BASE_MODEL,
    motion_dir: Path = MOTION_MODEL,
    sampler: str = DEFAULT_SAMPLER,
) -> np.ndarray:
    """A clip of `prompt`: uint8 array (num_frames, 64, 64, 3)."""
    return generate_clips([prompt], [seed], num_frames, steps, cfg, base_dir, motion_dir, sampler)[0]


# 2. Measuring a clip


@dataclass(frozen=True)
class ClipMeasurement:
    motion: str  # what the track says: one of motion.MOTIONS
    shape_frames: float  # fraction of frames whose classified shape is the prompt's
    colour_frames: float  # fraction of frames whose background and foreground colours are the prompt's
    flicker: float
    dx: float
    dy: float
    area_ratio: float


def track(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: the foreground's centroid (x, y as fractions of the side) and area (fraction).

    Foreground: pixels further than `pixels.FOREGROUND_DISTANCE` from the frame's background colour.
    A frame without foreground repeats the previous centroid (the centre for the first)."""
    side = frames.shape[1]
    centroids, areas = [], []
    last = (0.5, 0.5)
    for frame in frames:
        mask = foreground_mask(frame)
        if mask.any():
            ys, xs = np.nonzero(mask)
            last = ((xs.mean() + 0.5) / side, (ys.mean() + 0.5) / side)
        centroids.append(last)
        areas.append(mask.mean())
    return np.array(centroids), np.array(areas)


def motion_from_track(centroids: np.ndarray, areas: np.ndarray) -> tuple[str, float, float, float]:
    """(motion, dx, dy, area ratio) between the means of the first and the last quarter of the clip."""
    quarter = max(1, len(centroids) // 4)
    dx, dy = centroids[-quarter:].mean(0) - centroids[:quarter].mean(0)
    first, last = areas[:quarter].mean(), areas[-quarter:].mean()
    ratio = float((last + 1e-4) / (first + 1e-4))
    if math.hypot(dx, dy) >= MIN_TRAVEL:
        if abs(dx) >= abs(dy):
            return ("right" if dx > 0 else "left"), float(dx), float(dy), ratio
        return ("down" if dy > 0 else "up"), float(dx), float(dy), ratio
    if abs(math.log(ratio)) >= math.log(MIN_AREA_RATIO):
        return ("growing" if ratio > 1 else "shrinking"), float(dx), float(dy), ratio
    return "still", float(dx), float(dy), ratio


def flicker_index(frames: np.ndarray) -> float:
    """Mean absolute change of the mean luma (0-255) between consecutive frames."""
    luma = (frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).mean(axis=(1, 2))
    return float(np.abs(np.diff(luma)).mean())


def measure_clip(frames: np.ndarray, clip: motion.Clip, shapes: Sequence[str]) -> ClipMeasurement:
    """How `frames` (generated for `clip`'s caption) match it; `shapes` are the classified shapes."""
    centroids, areas = track(frames)
    moved, dx, dy, ratio = motion_from_track(centroids, areas)
    measurements = [measure(frame) for frame in frames]
    return ClipMeasurement(
        motion=moved,
        shape_frames=float(np.mean([s == clip.shape for s in shapes])),
        colour_frames=float(np.mean([m.bg == clip.bg and m.fg == clip.fg for m in measurements])),
        flicker=flicker_index(frames),
        dx=dx,
        dy=dy,
        area_ratio=ratio,
    )


# 3. The held-out evaluation


def held_out_clips(count: int = 40, seed: int = 7) -> list[motion.Clip]:
    """One clip per held-out triple, motions round-robin (count 14: every motion twice)."""
    rng = random.Random(seed)
    triples = motion.held_out_triples()[:count]
    return [
        motion.sample_clip(rng, [t], motion.MOTIONS[i % len(motion.MOTIONS)]) for i, t in enumerate(triples)
    ]


@functools.cache
def training_flicker(
    count: int = 140, frames: int = motion.DEFAULT_FRAMES, seed: int = 11
) -> tuple[float, float]:
    """(mean, max) flicker index of drawn training clips (every motion equally often)."""
    rng = random.Random(seed)
    triples = motion.training_triples()
    values = [
        flicker_index(motion.render_clip(motion.sample_clip(rng, triples, motion.MOTIONS[i % 7]), frames))
        for i in range(count)
    ]
    return float(np.mean(values)), float(np.max(values))


def flicker_bar() -> float:
    """The bar for the mean flicker of generated clips: twice the drawn training clips' mean.

    Drawn clips flicker only as much as the moving or growing shape changes the mean luma; a
    generated clip also wobbles in colour and outline, so the bar allows as much again, and a clip
    that flashes or loses its shape between frames still goes over it."""
    return FLICKER_BAR_FACTOR * training_flicker()[0]


@dataclass(frozen=True)
class MotionReport:
    clips: int
    direction: float  # fraction of clips whose tracked motion is the prompt's
    shape_frames: float  # fraction of all frames with the prompt's shape
    colour_frames: float  # fraction of all frames with the prompt's background and foreground colours
    flicker: float  # mean flicker index of the generated clips
    flicker_bar: float
    training_flicker: float  # mean flicker index of drawn training clips
    per_motion: dict[str, float]  # direction accuracy by prompted motion
    seconds: float

    def summary(self) -> str:
        per = " ".join(f"{k} {v:.2f}" for k, v in self.per_motion.items())
        return (
            f"direction {self.direction:.3f} shape {self.shape_frames:.3f} colour {self.colour_frames:.3f} "
            f"flicker {self.flicker:.2f} (bar {self.flicker_bar:.2f}, drawn {self.training_flicker:.2f}) "
            f"| {per} (n={self.clips}, {self.seconds:.0f}s)"
        )


def evaluate_motion(
    prompts: int = 14,
    seeds: Sequence[int] = EVAL_SEEDS,
    steps: int = DEFAULT_STEPS,
    cfg: float = DEFAULT_CFG,
    base_dir: Path = BASE_MODEL,
    motion_dir: Path = MOTION_MODEL,
    frames: int = motion.DEFAULT_FRAMES,
    warped_noise: bool = True,
    device: str = "cpu",
    batch: int = 4,
    trajectory_start: bool = True,
    rough_only: bool = False,
) -> tuple[MotionReport, list[tuple[motion.Clip, int, ClipMeasurement]]]:
    """The held-out evaluation: `prompts` held-out prompts x `seeds`, scored clip by clip.
    `rough_only` scores the trajectory start's rough clips instead (no motion model)."""
    from genserve.toymodel.shapes_classifier import CLASSIFIER_FILE, classify_shapes, load_classifier

    started = time.time()
    classifier = load_classifier(Path(base_dir) / "eval" / CLASSIFIER_FILE)
    jobs = [(clip, seed) for clip in held_out_clips(prompts) for seed in seeds]
    captions = [motion.canonical_motion_caption(c) for c, _ in jobs]
    if rough_only:
        videos = rough_clips(captions, [s for _, s in jobs], frames, steps, cfg)
    else:
        videos = generate_clips(
            captions,
            [s for _, s in jobs],
            num_frames=frames,
            steps=steps,
            cfg=cfg,
            base_dir=base_dir,
            motion_dir=motion_dir,
            batch=batch,
            warped_noise=warped_noise,
            device=device,
            trajectory_start=trajectory_start,
        )
    results = []
    for (clip, seed), video in zip(jobs, videos, strict=True):
        results.append((clip, seed, measure_clip(video, clip, classify_shapes(classifier, list(video)))))
    return report_of(results, time.time() - started), results


def report_of(
    results: Sequence[tuple[motion.Clip, int, ClipMeasurement]], seconds: float = 0.0
) -> MotionReport:
    """The report over measured clips (`evaluate_motion`'s results, or the first of them: the first
    2 x n results of a run over N >= n prompts are the n-prompt run's)."""
    per_motion = {}
    for name in motion.MOTIONS:
        mine = [m for c, _, m in results if c.motion == name]
        if mine:
            per_motion[name] = float(np.mean([m.motion == name for m in mine]))
    return MotionReport(
        clips=len(results),
        direction=float(np.mean([m.motion == c.motion for c, _, m in results])),
        shape_frames=float(np.mean([m.shape_frames for _, _, m in results])),
        colour_frames=float(np.mean([m.colour_frames for _, _, m in results])),
        flicker=float(np.mean([m.flicker for _, _, m in results])),
        flicker_bar=flicker_bar(),
        training_flicker=training_flicker()[0],
        per_motion=per_motion,
        seconds=seconds,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Held-out evaluation of the built-in video model.")
    parser.add_argument("--motion-dir", type=Path, default=MOTION_MODEL)
    parser.add_argument("--base-dir", type=Path, default=BASE_MODEL)
    parser.add_argument("--prompts", type=int, default=40, help="held-out prompts (at most 40)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--cfg", type=float, default=DEFAULT_CFG)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--verbose", action="store_true", help="one line per clip")
    parser.add_argument(
        "--plain-noise", action="store_true", help="independent noise per frame (no warping; for comparison)"
    )
    parser.add_argument(
        "--no-trajectory-start",
        action="store_true",
        help="warped noise only: no first frame carried along the trajectory (for comparison)",
    )
    parser.add_argument("--strength", type=float, default=None, help="the trajectory start's strength")
    parser.add_argument(
        "--rough-only", action="store_true", help="score the trajectory start's rough clips (no motion model)"
    )
    args = parser.parse_args()
    if args.strength is not None:
        from genserve.toymodel import motion_noise

        motion_noise.WarpedNoiseAnimateDiffPipeline.trajectory_strength = args.strength
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    report, results = evaluate_motion(
        args.prompts,
        steps=args.steps,
        cfg=args.cfg,
        base_dir=args.base_dir,
        motion_dir=args.motion_dir,
        warped_noise=not args.plain_noise,
        device=args.device,
        trajectory_start=not args.no_trajectory_start,
        rough_only=args.rough_only,
    )
    if args.verbose:
        for clip, seed, m in results:
            print(
                f"{motion.canonical_motion_caption(clip):55s} seed {seed}: {m.motion:9s} "
                f"dx {m.dx:+.2f} dy {m.dy:+.2f} area x{m.area_ratio:.2f} shape {m.shape_frames:.2f} "
                f"colour {m.colour_frames:.2f} flicker {m.flicker:.2f}"
            )
    print(report.summary())
    print(json.dumps(asdict(report)))


if __name__ == "__main__":
    main()

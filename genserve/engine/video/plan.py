"""Planning a video before anything runs: its segments and its cost. Torch-free (the API uses it).

A long clip is cut into segments that are jobs of their own:

- keyframe_parallel: each pair of neighbouring keyframes is one first→last segment. The segments
  share their boundary keyframe and do not depend on each other, so they run on several workers
  at once; the stitch drops the duplicate boundary frame.
- extend: segment k+1 continues segment k. Models that take a clip as a condition (LTX) continue
  its last `overlap` frames, which the stitch crossfades; image-to-video models (Wan I2V, SVD)
  start from its last frame, which the stitch keeps once.
"""

from __future__ import annotations

import math

from genserve.engine.video.families import VideoFamily
from genserve.schemas.video import PostOptions, VideoKeyframe, VideoParams, VideoSegment


class PlanError(ValueError):
    """A request that cannot be planned; `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def plan_segments(params: VideoParams, family: VideoFamily, modes: tuple[str, ...]) -> list[VideoSegment]:
    """The segments of a long clip (empty when it is made in one pass). `params` is resolved."""
    long = params.long
    if long is None or long.strategy == "free_noise":
        return []
    if long.strategy == "keyframe_parallel":
        return _keyframe_pairs(params, family, modes)
    return _extension(params, family, modes)


def _segment(params: VideoParams, index: int, **update: object) -> VideoParams:
    # Post-processing and encoding run once, on the stitched clip; each segment has its own seed.
    base = {"long": None, "post": PostOptions(), "seconds": None, "seed": (params.seed or 0) + index}
    return params.model_copy(update={**base, **update})


def _keyframe_pairs(params: VideoParams, family: VideoFamily, modes: tuple[str, ...]) -> list[VideoSegment]:
    if "flf2v" not in modes:
        raise PlanError(
            "long.strategy",
            f"keyframe_parallel needs a model that goes from a first to a last keyframe (flf2v); "
            f"this {family.name} model offers {', '.join(modes)}",
        )
    keyframes = sorted(params.keyframes, key=lambda key: key.frame_index)
    if len(keyframes) < 2:
        raise PlanError("keyframes", "keyframe_parallel needs at least two keyframes")
    segments = []
    for index, (first, last) in enumerate(zip(keyframes, keyframes[1:], strict=False)):
        frames = last.frame_index - first.frame_index + 1
        problem = family.frame_problem(frames)
        if problem is not None or frames < 2:
            position = params.keyframes.index(last)
            raise PlanError(
                f"keyframes[{position}].frame_index",
                f"keyframes {first.frame_index} → {last.frame_index} make a segment of {frames} frames; "
                + (problem or "a segment needs at least 2 frames"),
            )
        pair = [
            VideoKeyframe(image=first.image, frame_index=0),
            VideoKeyframe(image=last.image, frame_index=frames - 1),
        ]
        segment = _segment(params, index, mode="flf2v", keyframes=pair, num_frames=frames)
        segments.append(VideoSegment(index=index, count=len(keyframes) - 1, params=segment))
    return segments


def continuation_overlap(family: VideoFamily, modes: tuple[str, ...], overlap: int) -> int:
    """Frames segment k+1 shares with segment k under "extend": the requested overlap for models
    that continue a clip (LTX), one frame (the last) for image-to-video models."""
    if family.name == "ltx":
        return max(1, overlap)
    if "i2v" in modes:
        return 1
    raise PlanError(
        "long.strategy",
        f"extend needs a model that continues a clip (LTX) or starts from a picture (image-to-video); "
        f"this {family.name} model offers {', '.join(modes)}"
        + (
            "; use strategy free_noise for long AnimateDiff clips"
            if family.name.startswith("animatediff")
            else ""
        ),
    )


def _extension(params: VideoParams, family: VideoFamily, modes: tuple[str, ...]) -> list[VideoSegment]:
    assert params.long is not None and params.num_frames is not None
    size = params.long.segment_frames
    if (problem := family.frame_problem(size)) is not None:
        raise PlanError("long.segment_frames", problem)
    overlap = continuation_overlap(family, modes, params.long.overlap)
    if overlap >= size:
        raise PlanError("long.overlap", f"overlap ({overlap}) must be smaller than segment_frames ({size})")
    count = max(1, math.ceil((params.num_frames - overlap) / (size - overlap)))
    first = _segment(params, 0, num_frames=size)
    segments = [VideoSegment(index=0, count=count, params=first)]
    follow_mode = "v2v" if family.name == "ltx" else "i2v"
    for index in range(1, count):
        follower = _segment(params, index, mode=follow_mode, keyframes=[], num_frames=size, video=None)
        segments.append(
            VideoSegment(index=index, count=count, params=follower, continues=True, overlap=overlap)
        )
    return segments


# -- cost: step time from the number of latent tokens -------------------------------------------------

# (temporal compression, spatial compression × patch) of each family's VAE and denoiser.
TOKEN_FACTORS: dict[str, tuple[int, int]] = {
    "wan": (4, 16),
    "ltx": (8, 32),
    "svd": (1, 8),
    "animatediff": (1, 8),
    "animatediff_sdxl": (1, 8),
}

# Seconds per denoising step (guidance included) = a·tokens + b·tokens², for an H100-class GPU.
# Fitted to published figures, not measured here (shared research video.md §7): Wan 14B at
# 32,760 tokens ≈ 7.5 s/step; LTX 2B at 6,144 tokens ≈ 0.05 s/step. SVD and AnimateDiff are UNets
# whose attention is per frame (spatial) or per pixel (temporal), so their cost is linear in the
# latent pixels: SVD-XT ≈ 0.8 s/step at 25 × 72 × 128, AnimateDiff ≈ 0.12 s/step at 16 × 64 × 64,
# both estimates from genserve's own SD1.5 H100 grid. Wan's figure is its 14B model's; a 1.3B
# model costs less. benchmarks/video_gpu_steps.py measures them; a deployment replaces them.
STEP_COEFFICIENTS: dict[str, tuple[float, float]] = {
    "wan": (4.0e-5, 5.8e-9),
    "ltx": (6.0e-6, 3.0e-10),
    "svd": (3.5e-6, 0.0),
    "animatediff": (1.8e-6, 0.0),
    "animatediff_sdxl": (2.3e-6, 0.0),
}
DECODE_SECONDS_PER_MEGAPIXEL_FRAME = 0.02
MIN_STEP_SECONDS = 0.002


def latent_tokens(family: str, frames: int, width: int, height: int) -> int:
    temporal, spatial = TOKEN_FACTORS.get(family, (1, 8))
    return ((frames - 1) // temporal + 1) * max(1, height // spatial) * max(1, width // spatial)


def predicted_step_seconds(family: str, frames: int, width: int, height: int) -> float:
    """Seconds per denoising step (guidance included) on the reference GPU."""
    a, b = STEP_COEFFICIENTS.get(family, STEP_COEFFICIENTS["animatediff"])
    tokens = latent_tokens(family, frames, width, height)
    return max(MIN_STEP_SECONDS, a * tokens + b * tokens * tokens)


def video_seconds(family: str, frames: int, width: int, height: int, steps: int, scale: float = 1.0) -> float:
    """Estimated seconds to denoise and decode one pass of `frames` frames. `scale` is the
    device's speed relative to the reference GPU (a CPU is hundreds of times slower)."""
    step = predicted_step_seconds(family, frames, width, height)
    decode = DECODE_SECONDS_PER_MEGAPIXEL_FRAME * frames * width * height / 1e6
    return scale * (steps * step + decode)


def output_frames(params: VideoParams) -> int:
    """Frames in the delivered clip: interpolation adds multiplier-1 frames between each pair."""
    assert params.num_frames is not None
    return (params.num_frames - 1) * params.post.interpolate + 1


def output_seconds(params: VideoParams) -> float:
    assert params.fps is not None
    return output_frames(params) / (params.fps * params.post.interpolate)

"""From denoised frames to a delivered clip: stitch a long clip's segments, then post-process,
interpolate, encode and measure. One path for the worker and for `genserve video` run locally, so
both make the same file from the same frames."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import PIL.Image

from genserve.engine.video.encode import EncodedVideo, encode_clip
from genserve.engine.video.interpolate import interpolate
from genserve.engine.video.metrics import temporal_metrics
from genserve.engine.video.post import deflicker, temporal_denoise
from genserve.engine.video.stitch import stitch
from genserve.schemas.video import VideoParams, VideoSegment

StageCallback = Callable[[str, dict[str, Any]], None]


def stitch_segments(
    clips: list[np.ndarray], params: VideoParams, segments: list[VideoSegment]
) -> tuple[np.ndarray, list[int]]:
    """A long clip from its segments' frames, trimmed to `num_frames`, and its seams. Keyframe
    pairs and image-to-video chains share one boundary frame (kept once); clip continuations
    re-create `overlap` frames, which are crossfaded."""
    long = params.long
    assert long is not None
    follower = segments[-1] if len(segments) > 1 else None
    overlap = follower.overlap if follower is not None and follower.continues else 0
    shared = long.strategy == "keyframe_parallel" or overlap == 1
    frames, seams = stitch(
        clips, overlap=0 if shared else overlap, shared_boundary=shared, colour_match=long.colour_match
    )
    frames = frames[: params.num_frames]
    return frames, [seam for seam in seams if seam < len(frames)]


def finish_clip(
    frames: np.ndarray,
    seams: list[int],
    params: VideoParams,
    *,
    device: str = "cpu",
    prefer_nvenc: bool = False,
    on_stage: StageCallback | None = None,
    on_pairs: Callable[[int, int], None] | None = None,
    upscale_frame: Callable[[PIL.Image.Image], PIL.Image.Image] | None = None,
) -> tuple[EncodedVideo, dict[str, Any]]:
    """Post (denoise, deflicker) → upscale each frame (`post.upscale`, with `upscale_frame`) →
    interpolate (RIFE) → encode → measure. Upscaling comes before interpolation so the model runs
    on the generated frames only. Returns the file and its report: frames, fps, seconds, size,
    codec, the encoder that ran, stage seconds, metrics."""
    stage = on_stage or (lambda name, data: None)
    timings: dict[str, float] = {}
    post, fps = params.post, params.fps or 8

    def timed(name: str, started: float) -> None:
        timings[name] = round(time.perf_counter() - started, 4)

    if post.deflicker or post.denoise:
        started = time.perf_counter()
        stage("post", {})
        if post.denoise:
            frames = temporal_denoise(frames)
        if post.deflicker:
            frames = deflicker(frames)
        timed("post", started)
    if post.upscale is not None:
        if upscale_frame is None:
            raise ValueError(f"post.upscale asks for {post.upscale}, but no upscaler stage was given")
        started = time.perf_counter()
        stage("upscale", {"model": post.upscale})
        frames = np.stack(
            [np.asarray(upscale_frame(PIL.Image.fromarray(frame)).convert("RGB")) for frame in frames]
        )
        timed("upscale", started)
    if post.interpolate > 1:
        started = time.perf_counter()
        stage("interpolate", {"multiplier": post.interpolate})
        frames = interpolate(frames, post.interpolate, device=device, on_progress=on_pairs)
        seams = [seam * post.interpolate for seam in seams]
        fps *= post.interpolate
        timed("interpolate", started)
    started = time.perf_counter()
    out = params.output
    stage("encode", {"container": out.container})
    encoded = encode_clip(frames, fps, out.container, out.codec, out.crf, prefer_nvenc=prefer_nvenc)
    timed("encode", started)
    report = {
        "frames": int(len(frames)),
        "fps": fps,
        "seconds": round(len(frames) / fps, 3),
        "width": int(frames.shape[2]),
        "height": int(frames.shape[1]),
        "container": encoded.container,
        "codec": encoded.codec,
        "encoder": encoded.encoder,
        "bytes": len(encoded.data),
        "timings": timings,
        "metrics": temporal_metrics(frames, seams=seams),
    }
    return encoded, report

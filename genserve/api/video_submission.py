"""Turning a video request into a stored job (with its segments), and a video job into its public shape.

Everything the model will refuse is refused here first, as a LimitError naming the field: the mode
the model offers, keyframe counts and indexes, the family's frame rule and size multiple, and the
limits. A queued video job therefore runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import secrets
from collections.abc import Callable
from datetime import datetime

import PIL.Image
from pydantic import BaseModel, Field

from genserve.api.pictures import check_picture, decode_payload, stored_size
from genserve.artifacts.inputs import InputStore, MissingPicture
from genserve.artifacts.videos import VideoStore, media_type_for
from genserve.config import Limits, Settings
from genserve.engine.models.controls import registered_controls, sparsectrl_problem
from genserve.engine.models.registry import ModelInfo
from genserve.engine.video.encode import resolve_format
from genserve.engine.video.families import SPARSECTRL_FAMILIES, VIDEO_FAMILIES, keyframes_needed, served_modes
from genserve.engine.video.plan import (
    PlanError,
    plan_segments,
    video_seconds,
)
from genserve.scheduler.policy import classify
from genserve.scheduler.video_cost import VideoSpeed
from genserve.schemas import JobState, LimitError
from genserve.schemas.generation import MAX_SEED
from genserve.schemas.image_inputs import is_image_hash
from genserve.schemas.text import SafeText
from genserve.schemas.video import VideoOutputs, VideoParams, VideoRef, VideoSegment
from genserve.store.jobs import JobRecord, JobStore
from genserve.store.video_calibration import VideoCalibrationStore


class VideoJobCreate(VideoParams):
    """POST /v1/video/jobs body: the clip plus delivery options."""

    request_id: SafeText | None = Field(None, max_length=200, description="Idempotency key.")
    priority: int = Field(0, ge=-10, le=10)


class VideoJobPublic(BaseModel):
    id: str
    object: str = "video.job"
    request_id: str | None
    state: JobState
    params: VideoParams
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    error: str | None
    queue: str
    estimated_seconds: float | None
    segments: list[SegmentPublic] = Field(default_factory=list)
    outputs: VideoOutputs
    # Measured once the clip is made: temporal metrics, stage timings, frames and seconds of video.
    report: dict | None = None
    events_url: str


class SegmentPublic(BaseModel):
    index: int
    id: str
    state: JobState
    attempts: int
    error: str | None


VideoJobPublic.model_rebuild()


def video_model(params: VideoParams, models: dict[str, ModelInfo], settings: Settings) -> ModelInfo:
    name = params.model or settings.default_video_model
    info = models.get(name)
    if info is None:
        raise LimitError("model", f"model '{name}' is not registered; see GET /v1/models")
    if info.kind != "video":
        raise LimitError(
            "model", f"model '{name}' makes pictures, not video; choose a video model from GET /v1/models"
        )
    allowed = settings.limits.allowed_models
    if allowed is not None and name not in allowed:
        raise LimitError("model", f"model '{name}' is not in the allowed list {allowed}")
    return info


def resolve_video(
    params: VideoParams, models: dict[str, ModelInfo], settings: Settings, video_frames: int | None = None
) -> tuple[VideoParams, list[VideoSegment]]:
    """Fill in the model and its defaults, check the request against its family, plan its segments.
    `video_frames`: how many frames the v2v input clip has (its length is the default)."""
    info = video_model(params, models, settings)
    family = VIDEO_FAMILIES[info.family]
    if params.sparsectrl is not None:
        _check_sparsectrl(params, info, models, settings)
    modes = served_modes(info.family, info.video_modes, sparsectrl=params.sparsectrl is not None)
    if params.mode not in modes:
        hint = ""
        if params.mode == "keyframes" and info.family in SPARSECTRL_FAMILIES:
            hint = "; keyframes on AnimateDiff need a SparseCtrl model: sparsectrl: {model: ...} (GET /v1/controls)"
        raise LimitError(
            "mode", f"model '{info.name}' offers modes {', '.join(modes)}, not {params.mode}{hint}"
        )
    if family.uses_prompt and params.mode == "t2v" and not params.prompt.strip():
        raise LimitError("prompt", "a text-to-video request needs a prompt")
    fps = params.fps or info.default_fps or family.default_fps
    frames = params.num_frames
    if frames is None and params.seconds is not None:
        frames = round(params.seconds * fps)
    if frames is None:
        restyled = params.mode == "v2v" and video_frames
        frames = video_frames if restyled else info.default_frames or family.default_frames
    if params.mode == "v2v" and video_frames and frames > video_frames and info.family != "ltx":
        raise LimitError(
            "num_frames",
            f"the input video has {video_frames} frames; {info.family} restyles at most that many",
        )
    limits = settings.limits
    if frames > limits.max_video_frames:
        raise LimitError("num_frames", f"{frames} frames exceeds max_video_frames {limits.max_video_frames}")
    single_pass = params.long is None or params.long.strategy == "free_noise"
    if single_pass and (problem := family.frame_problem(frames)) is not None:
        raise LimitError("seconds" if params.num_frames is None else "num_frames", problem)
    if (
        params.long is not None
        and params.long.strategy == "free_noise"
        and not info.family.startswith("animatediff")
    ):
        raise LimitError("long.strategy", "free_noise is AnimateDiff's; use keyframe_parallel or extend")
    if single_pass and family.max_window_frames and params.long is None and frames > family.max_window_frames:
        raise LimitError(
            "num_frames",
            f"{info.family} sees at most {family.max_window_frames} frames in one pass; "
            "ask for long: {strategy: free_noise, segment_frames: 16}",
        )
    width = params.width or info.native_width
    height = params.height or info.native_height
    for field, value, limit in (("width", width, limits.max_width), ("height", height, limits.max_height)):
        if (problem := family.size_problem(field, value)) is not None:
            raise LimitError(field, problem)
        if value > limit:
            raise LimitError(field, f"{field} must be at most {limit} (max_{field})")
    if width * height > limits.max_pixels:
        raise LimitError("width", f"width*height = {width * height} exceeds max_pixels {limits.max_pixels}")
    steps = params.steps or info.default_steps or family.default_steps
    if steps > limits.max_steps:
        raise LimitError("steps", f"steps must be between 1 and {limits.max_steps} (max_steps)")
    _check_keyframes(params, frames)
    if params.mode == "v2v" and params.video is None:
        raise LimitError("video", "v2v needs an input video")
    try:
        resolve_format(params.output.container, params.output.codec, params.output.crf)
    except ValueError as error:
        raise LimitError("output", str(error)) from None
    if params.post.upscale is not None:
        _check_upscale(params.post.upscale, width, height, settings)
    resolved = params.model_copy(
        update={
            "model": info.name,
            "num_frames": frames,
            "seconds": None,
            "fps": fps,
            "width": width,
            "height": height,
            "steps": steps,
            "guidance": params.guidance
            if params.guidance is not None
            else _guidance(info, family.default_guidance),
            "seed": params.seed if params.seed is not None else secrets.randbelow(MAX_SEED + 1),
            "preview_every": params.preview_every
            if params.preview_every is not None
            else settings.preview_every,
        }
    )
    try:
        segments = plan_segments(resolved, family, info.video_modes)
    except PlanError as error:
        raise LimitError(error.field, error.message) from None
    return VideoParams.model_validate(resolved.model_dump()), segments


def _check_sparsectrl(
    params: VideoParams, info: ModelInfo, models: dict[str, ModelInfo], settings: Settings
) -> None:
    """A SparseCtrl model places keyframes on an AnimateDiff (SD1.5) model it was made for, in one pass."""
    assert params.sparsectrl is not None
    if not info.family.startswith("animatediff"):  # an SDXL AnimateDiff is a family mismatch, below
        own = " (its keyframes mode needs no SparseCtrl)" if "keyframes" in info.video_modes else ""
        raise LimitError(
            "sparsectrl",
            f"SparseCtrl runs on AnimateDiff (SD1.5) models; model '{info.name}' is {info.family}{own}",
        )
    base = models.get(info.base_model) if info.base_model else None
    problem = sparsectrl_problem(params.sparsectrl.model, registered_controls(settings), info, base)
    if problem is not None:
        raise LimitError("sparsectrl.model", problem)
    if params.mode != "keyframes":
        raise LimitError("sparsectrl", f"a SparseCtrl model conditions mode keyframes, not {params.mode}")
    if params.long is not None:
        raise LimitError(
            "long", "SparseCtrl keyframes run in one pass (no FreeNoise or segments); leave long out"
        )


def _check_upscale(name: str, width: int, height: int, settings: Settings) -> None:
    """post.upscale names an upscaler (GET /v1/models, kind "upscaler") and the upscaled frames fit
    the size limits."""
    from genserve.api.upscale_submission import registered_upscalers

    info = registered_upscalers(settings).get(name)
    if info is None or info.kind != "upscaler":
        raise LimitError(
            "post.upscale", f"upscaler '{name}' is not registered; see GET /v1/models (kind upscaler)"
        )
    scale = info.scale or 2
    limits = settings.limits
    if width * scale > limits.max_width or height * scale > limits.max_height:
        raise LimitError(
            "post.upscale",
            f"frames upscaled ×{scale} would be {width * scale}x{height * scale}, over max_width "
            f"{limits.max_width} or max_height {limits.max_height}",
        )


def _guidance(info: ModelInfo, family_default: float) -> float:
    return info.default_cfg_scale if info.default_cfg_scale is not None else family_default


def _check_keyframes(params: VideoParams, frames: int) -> None:
    least, most = keyframes_needed(params.mode)
    count = len(params.keyframes)
    if count < least or (most is not None and count > most):
        wanted = (
            f"{least}" if least == most else f"at least {least}" if most is None else f"{least} to {most}"
        )
        raise LimitError("keyframes", f"mode {params.mode} takes {wanted} keyframe(s); {count} given")
    seen: set[int] = set()
    for position, keyframe in enumerate(params.keyframes):
        field = f"keyframes[{position}].frame_index"
        if keyframe.frame_index >= frames:
            raise LimitError(
                field, f"frame_index {keyframe.frame_index} is outside the clip (frames 0 to {frames - 1})"
            )
        if keyframe.frame_index in seen:
            raise LimitError(field, f"two keyframes at frame {keyframe.frame_index}")
        seen.add(keyframe.frame_index)
    if params.mode == "i2v" and params.keyframes[0].frame_index != 0:
        raise LimitError("keyframes[0].frame_index", "i2v starts from its picture: frame_index must be 0")
    if params.mode == "flf2v":
        indexes = sorted(key.frame_index for key in params.keyframes)
        if indexes != [0, frames - 1]:
            raise LimitError(
                "keyframes",
                f"flf2v takes the first (frame_index 0) and last (frame_index {frames - 1}) frames",
            )


def store_video_input(
    params: VideoParams, inputs: InputStore, settings: Settings
) -> tuple[VideoParams, int | None]:
    """`params` with its v2v input clip stored and named by its id, and that clip's frame count.
    The clip is an animated GIF, WebP or PNG, sent inline or uploaded (WebP, PNG)."""
    if params.video is None:
        return params, None
    limits = settings.limits
    if is_image_hash(params.video):
        try:
            data = inputs.get(params.video)
        except MissingPicture:
            raise LimitError("video", f"video: no upload has the id {params.video}") from None
    else:
        data = decode_payload(params.video, "video", limits.max_upload_bytes)
    frames = clip_frame_count(data, limits)
    return params.model_copy(update={"video": inputs.put(data)}), frames


CLIP_FORMATS = ("GIF", "WEBP", "PNG")


def clip_frame_count(data: bytes, limits: Limits) -> int:
    """The frames of an input clip, checked against the upload limits; LimitError naming `video`."""
    if len(data) > limits.max_upload_bytes:
        raise LimitError("video", f"video is {len(data)} bytes; the limit is {limits.max_upload_bytes}")
    try:
        with PIL.Image.open(io.BytesIO(data), formats=CLIP_FORMATS) as clip:
            if clip.width * clip.height > limits.max_input_pixels:
                raise LimitError(
                    "video",
                    f"video frames have {clip.width * clip.height} pixels; the limit is {limits.max_input_pixels}",
                )
            frames = int(getattr(clip, "n_frames", 1))
            clip.seek(frames - 1)  # a truncated clip fails here, not in the worker
            clip.load()
    except (PIL.UnidentifiedImageError, OSError, EOFError, ValueError) as error:
        raise LimitError("video", f"video must be an animated GIF, WebP or PNG ({error})") from None
    if frames < 2:
        raise LimitError("video", "the input video has one frame; send an animated GIF, WebP or PNG")
    return frames


def store_keyframes(params: VideoParams, inputs: InputStore, settings: Settings) -> VideoParams:
    """`params` with each keyframe picture stored and named by its id (like init_image)."""
    limits = settings.limits
    stored = []
    for position, keyframe in enumerate(params.keyframes):
        field = f"keyframes[{position}].image"
        if is_image_hash(keyframe.image):
            stored_size(inputs, keyframe.image, field)
            stored.append(keyframe)
            continue
        data = decode_payload(keyframe.image, field, limits.max_upload_bytes)
        check_picture(data, field, limits)
        stored.append(keyframe.model_copy(update={"image": inputs.put(data)}))
    return params.model_copy(update={"keyframes": stored}) if stored else params


def request_hash(body: VideoJobCreate) -> str:
    canonical = json.dumps(body.model_dump(exclude={"request_id"}), sort_keys=True)
    return "video:" + hashlib.sha256(canonical.encode()).hexdigest()


def estimated_video_seconds(
    params: VideoParams, family: str, settings: Settings, speed: VideoSpeed | None = None
) -> float:
    """The cost model's run time: every segment's (or the one pass's) steps and decode; `speed` is the
    stored calibration (store/video_calibration.py), else the published figures × video_speed_scale."""
    assert params.num_frames is not None and params.width and params.height and params.steps
    scale = settings.video_speed_scale if speed is None else speed.scale
    return video_seconds(family, params.num_frames, params.width, params.height, params.steps, scale)


def submit_video(
    body: VideoJobCreate,
    models: dict[str, ModelInfo],
    settings: Settings,
    store: JobStore,
    inputs: InputStore,
    client_id: str | None,
    trace_id: str | None = None,
    check: Callable[[VideoParams, float], None] | None = None,
) -> tuple[JobRecord, bool]:
    """Resolve, price and queue a video job. `check(resolved, seconds)` runs before anything is
    queued (an API key's limits and quota), so the request is resolved and priced once."""
    body = store_keyframes(body, inputs, settings)
    body, video_frames = store_video_input(body, inputs, settings)
    asked = VideoParams.model_validate(
        body.model_dump(exclude={"request_id", "priority"}, exclude_unset=True)
    )
    resolved, segments = resolve_video(asked, models, settings, video_frames)
    family = models[resolved.model].family
    speed = VideoCalibrationStore(store.engine).speed(resolved.model or "", settings.video_speed_scale)
    seconds = estimated_video_seconds(resolved, family, settings, speed)
    if check is not None:
        check(resolved, seconds)
    job, created = store.submit(
        resolved.model_dump(),
        request_id=body.request_id,
        request_hash=request_hash(body),
        priority=body.priority,
        max_attempts=settings.max_attempts,
        client_id=client_id,
        queue=classify(seconds, settings.long_queue_threshold_seconds),
        estimated_seconds=seconds,
        trace_id=trace_id,
        kind="video",
        segments=[segment.model_dump() for segment in segments] or None,
        chained=bool(segments) and resolved.long is not None and resolved.long.strategy == "extend",
    )
    if created and settings.broker_url:  # multi-node mode: wake workers for the parts that are queued
        from genserve.distributed.celery_app import publish_wake, wake_queue

        queued = (
            [job.id] if not segments else [s.id for s in store.segments_of(job.id) if s.state == "queued"]
        )
        publish_wake(settings, queued, queue=wake_queue(settings, set(), resolved.model))
    return job, created


def video_file_name(job_id: str, params: VideoParams) -> str:
    return f"{job_id}.{params.output.container}"


def to_video_public(job: JobRecord, store: JobStore, videos: VideoStore) -> VideoJobPublic:
    params = VideoParams.model_validate(job.params)
    outputs = VideoOutputs()
    segments = [
        SegmentPublic(index=s.segment_index or 0, id=s.id, state=s.state, attempts=s.attempt, error=s.error)
        for s in store.segments_of(job.id)
    ]
    for segment in segments:
        if segment.state == JobState.succeeded and videos.exists(f"{segment.id}.mp4"):
            outputs.segments.append(_ref(f"{segment.id}.mp4"))
    report = None
    if job.state == JobState.succeeded:
        name = video_file_name(job.id, params)
        outputs.video = _ref(name)
        outputs.thumbnail = VideoRef(
            id=f"{job.id}-thumb", url=f"/v1/images/{job.id}-thumb", media_type="image/png"
        )
        report = videos.load_record(f"{job.id}.json")
    return VideoJobPublic(
        id=job.id,
        request_id=job.request_id,
        state=job.state,
        params=params,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        attempts=job.attempt,
        error=job.error,
        queue=job.queue,
        estimated_seconds=job.estimated_seconds,
        segments=segments,
        outputs=outputs,
        report=report,
        events_url=f"/v1/jobs/{job.id}/events",
    )


def _ref(name: str) -> VideoRef:
    return VideoRef(id=name, url=f"/v1/video/files/{name}", media_type=media_type_for(name))

"""Video requests: one typed definition used by the API, the CLI, the store and the worker.

Structural rules live here (types, ranges, which options go together); the model's own rules
(frame counts, size multiples, modes) are checked against its family when the request is resolved
(`api/video_submission.py`), where the model is known.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from genserve.schemas.generation import MAX_SEED
from genserve.schemas.text import SafeText

VideoModeName = Literal["t2v", "i2v", "flf2v", "keyframes", "v2v"]
Container = Literal["mp4", "webm", "gif", "webp"]
Codec = Literal["h264", "av1", "vp9"]
LongStrategy = Literal["keyframe_parallel", "extend", "free_noise"]


class VideoKeyframe(BaseModel):
    """A picture the clip passes through at `frame_index` (0 is the first frame)."""

    model_config = ConfigDict(extra="forbid")

    image: SafeText = Field(..., description="base64, a data URL, or an id from POST /v1/uploads.")
    frame_index: int = Field(0, ge=0, description="Frame the picture is placed at (before interpolation).")


class LongOptions(BaseModel):
    """A clip longer than one pass of the model, made of segments.

    keyframe_parallel: each pair of neighbouring keyframes is one first→last segment; segments do
    not depend on each other, so they run at once on different workers. extend: each segment
    continues the last `overlap` frames of the one before (its last frame for image-to-video
    models). free_noise: one pass with sliding context windows (AnimateDiff's FreeNoise).
    """

    model_config = ConfigDict(extra="forbid")

    segment_frames: int = Field(
        ..., ge=2, description="Frames per segment (the family's frame rule applies)."
    )
    overlap: int = Field(0, ge=0, description="Frames neighbouring segments share and crossfade.")
    strategy: LongStrategy = Field("keyframe_parallel")
    colour_match: bool = Field(True, description="Match each segment's colours to the one before.")

    @model_validator(mode="after")
    def _overlap_fits(self) -> LongOptions:
        if self.overlap >= self.segment_frames:
            raise ValueError(
                f"overlap ({self.overlap}) must be smaller than segment_frames ({self.segment_frames})"
            )
        return self


class PostOptions(BaseModel):
    """After decoding: deflicker and temporal denoise (FFmpeg filters), then frame interpolation."""

    model_config = ConfigDict(extra="forbid")

    interpolate: Literal[1, 2, 4] = Field(
        1, description="RIFE frame interpolation: ×2 or ×4 the frames (and fps)."
    )
    deflicker: bool = Field(False, description="FFmpeg deflicker: evens out brightness from frame to frame.")
    denoise: bool = Field(False, description="FFmpeg atadenoise: temporal denoise.")
    upscale: SafeText | None = Field(
        None, description="An upscaler (GET /v1/models, kind upscaler) run on every frame, at its own scale."
    )


class OutputOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    container: Container = Field("mp4")
    codec: Codec | None = Field(None, description="mp4: h264 (default) or av1; webm: vp9 (default) or av1.")
    crf: int | None = Field(
        None, ge=0, le=63, description="Quality (lower is better); the codec's default if omitted."
    )

    @model_validator(mode="after")
    def _codec_fits(self) -> OutputOptions:
        allowed = {"mp4": ("h264", "av1"), "webm": ("vp9", "av1"), "gif": (), "webp": ()}[self.container]
        if self.codec is not None and self.codec not in allowed:
            choices = ", ".join(allowed) or "none (leave codec out)"
            raise ValueError(f"codec {self.codec} cannot go in {self.container}; choose {choices}")
        return self


class SparseCtrlOptions(BaseModel):
    """AnimateDiff keyframes: a SparseCtrl model (GET /v1/controls, kind sparsectrl) that places the
    keyframes' pictures at their frame indexes (AnimateDiff-Evolved's Load SparseCtrl Model)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: SafeText = Field(..., description="A SparseCtrl model in <models_dir>/controlnet/.")
    strength: float = Field(1.0, ge=0, le=2, description="Scale of the SparseCtrl residuals.")


class VideoParams(BaseModel):
    """What clip to make. Frames are counted before interpolation; `seconds` = frames / fps."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    prompt: SafeText = Field("", description="What happens in the clip (image-only models ignore it).")
    negative_prompt: SafeText = Field("")
    model: SafeText | None = Field(
        None, description="A video model from GET /v1/models; the default if omitted."
    )
    mode: VideoModeName = Field(
        "t2v",
        description="t2v: text; i2v: from a first frame; flf2v: first to last keyframe; keyframes: through "
        "pictures at given frames; v2v: restyle an input video.",
    )
    keyframes: list[VideoKeyframe] = Field(default_factory=list, max_length=64)
    sparsectrl: SparseCtrlOptions | None = Field(
        None, description="keyframes on AnimateDiff (SD1.5) models: the SparseCtrl model that places them."
    )
    video: SafeText | None = Field(None, description="v2v: an input video id from POST /v1/uploads.")
    strength: float = Field(0.7, gt=0, le=1, description="v2v: how much to change the input video.")
    width: int | None = Field(None, ge=8, description="Pixels; the model's native width if omitted.")
    height: int | None = Field(None, ge=8, description="Pixels; the model's native height if omitted.")
    num_frames: int | None = Field(None, ge=1, description="Frames generated (before interpolation).")
    seconds: float | None = Field(None, gt=0, description="Instead of num_frames: seconds at fps.")
    fps: int | None = Field(None, ge=1, le=120, description="Frames per second of the generated frames.")
    steps: int | None = Field(None, ge=1, description="Denoising steps; the model's default if omitted.")
    guidance: float | None = Field(None, ge=0, description="Guidance scale; the model's default if omitted.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    long: LongOptions | None = None
    post: PostOptions = Field(default_factory=PostOptions)
    output: OutputOptions = Field(default_factory=OutputOptions)
    preview_every: int | None = Field(None, ge=0, description="A filmstrip preview every N steps (0: never).")

    @model_validator(mode="after")
    def _one_length(self) -> VideoParams:
        if self.num_frames is not None and self.seconds is not None:
            raise ValueError("give num_frames or seconds, not both")
        return self


class VideoSegment(BaseModel):
    """One segment of a long clip, stored as its own job (kind "segment")."""

    model_config = ConfigDict(extra="forbid")

    index: int = Field(..., ge=0)
    count: int = Field(..., ge=1)
    params: VideoParams  # the segment's own request: its mode, frames, keyframes and seed
    # extend: this segment continues the last `overlap` frames of segment index-1 (its last
    # frame for image-to-video models, with overlap 1).
    continues: bool = False
    overlap: int = Field(0, ge=0)


class VideoRef(BaseModel):
    id: str
    url: str
    media_type: str


class VideoOutputs(BaseModel):
    video: VideoRef | None = None
    thumbnail: VideoRef | None = None
    segments: list[VideoRef] = Field(default_factory=list)

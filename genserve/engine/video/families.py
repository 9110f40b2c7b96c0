"""Video model families: what each can do and which frame counts and sizes it accepts.

Torch-free, so the API checks a video request up front (frame rule, size multiple, mode) and the
registry can describe a video model folder without loading it. The engine's pipelines
(`pipelines.py`) follow the same table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

VideoMode = Literal["t2v", "i2v", "flf2v", "keyframes", "v2v"]
VIDEO_MODES: tuple[str, ...] = VideoMode.__args__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class VideoFamily:
    name: str
    # Frame counts the model accepts: frame_step × N + 1 (frame_step 1 accepts any count).
    frame_step: int
    # Width and height must be multiples of this (VAE compression × transformer patch).
    size_multiple: int
    default_frames: int
    default_fps: int
    default_width: int
    default_height: int
    default_steps: int
    default_guidance: float
    # Whether the prompt conditions the model at all (SVD takes only a picture).
    uses_prompt: bool = True
    # Frames one denoising pass sees at most without a long-video strategy; None: no window.
    max_window_frames: int | None = None

    def frame_problem(self, frames: int) -> str | None:
        """Why `frames` does not fit this family's frame rule (naming the nearest valid values)."""
        if self.frame_step == 1 or (frames - 1) % self.frame_step == 0:
            return None
        below = (frames - 1) // self.frame_step * self.frame_step + 1
        above = below + self.frame_step
        nearest = below if frames - below <= above - frames and below >= 1 else above
        return (
            f"{self.name} models take {self.frame_step}N+1 frames; {frames} is not one "
            f"(nearest valid: {nearest}; neighbours {max(below, 1)} and {above})"
        )

    def size_problem(self, field: str, value: int) -> str | None:
        if value % self.size_multiple == 0:
            return None
        lower = value // self.size_multiple * self.size_multiple
        nearest = (
            lower if value - lower < self.size_multiple / 2 and lower > 0 else lower + self.size_multiple
        )
        return f"{field} must be a multiple of {self.size_multiple} for {self.name} models (nearest valid: {nearest})"


# Defaults follow each family's published native settings (see shared research video.md §1.1).
VIDEO_FAMILIES: dict[str, VideoFamily] = {
    "wan": VideoFamily("wan", 4, 16, 81, 16, 832, 480, 50, 5.0),
    "ltx": VideoFamily("ltx", 8, 32, 121, 24, 704, 480, 40, 3.0),
    "svd": VideoFamily("svd", 1, 64, 25, 7, 1024, 576, 25, 3.0, uses_prompt=False),
    "animatediff": VideoFamily("animatediff", 1, 8, 16, 8, 512, 512, 25, 7.5, max_window_frames=32),
    "animatediff_sdxl": VideoFamily(
        "animatediff_sdxl", 1, 8, 16, 8, 1024, 1024, 25, 7.5, max_window_frames=32
    ),
}

# The diffusers pipeline class in a folder's model_index.json → (family, modes that folder serves).
# One folder serves every pipeline class built from the same components: an LTX folder saved by
# LTXPipeline runs LTXConditionPipeline too, which gives it keyframes, i2v and v2v (extension).
VIDEO_PIPELINES: dict[str, tuple[str, tuple[str, ...]]] = {
    "WanPipeline": ("wan", ("t2v", "v2v")),
    "WanImageToVideoPipeline": ("wan", ("i2v", "flf2v")),
    "LTXPipeline": ("ltx", ("t2v", "i2v", "flf2v", "keyframes", "v2v")),
    "LTXImageToVideoPipeline": ("ltx", ("t2v", "i2v", "flf2v", "keyframes", "v2v")),
    "LTXConditionPipeline": ("ltx", ("t2v", "i2v", "flf2v", "keyframes", "v2v")),
    "StableVideoDiffusionPipeline": ("svd", ("i2v",)),
    "AnimateDiffPipeline": ("animatediff", ("t2v", "v2v")),
    "AnimateDiffSDXLPipeline": ("animatediff_sdxl", ("t2v",)),
}

# A MotionAdapter folder (config.json `_class_name`) names its image model in its card; it serves
# AnimateDiff on that base.
MOTION_ADAPTER_CLASSES = ("MotionAdapter",)


# Families a SparseCtrl model (a SparseControlNetModel in <models_dir>/controlnet/) runs on: it adds
# the keyframes mode. guoyww's SparseCtrl models are for AnimateDiff v3 on SD1.5; none exist for SDXL.
SPARSECTRL_FAMILIES = ("animatediff",)


def served_modes(family: str, modes: tuple[str, ...], *, sparsectrl: bool) -> tuple[str, ...]:
    """The modes a model of `family` whose folder serves `modes` runs, with or without a SparseCtrl."""
    if sparsectrl and family in SPARSECTRL_FAMILIES and "keyframes" not in modes:
        return (*modes, "keyframes")
    return modes


def keyframes_needed(mode: str) -> tuple[int, int | None]:
    """How many keyframes a mode takes: (at least, at most)."""
    return {"t2v": (0, 0), "i2v": (1, 1), "flf2v": (2, 2), "keyframes": (1, None), "v2v": (0, 0)}[mode]

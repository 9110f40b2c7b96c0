"""Moving shapes: the clips, captions and model pieces of the built-in video model.

A `Clip` is one shape of the image model's dataset (`dataset`: same shapes, colours and drawing)
that moves linearly over the clip: left, right, up, down, growing, shrinking, or standing still.
`render_clip` draws its frames and `motion_caption_for` writes one of many captions for it with the
image grammar extended by a motion phrase ("a red circle moving right on a black background").

The held-out split is the image model's: the same (shape, foreground, background) triples are kept
out of the motion training, so the evaluation asks for combinations never seen moving (nor drawn).

Section 3 holds the two model pieces the training and the pipeline share: the motion UNet (a
diffusers `UNetMotionModel` that also keeps genserve-shapes' "text" addition embedding, which
`UNetMotionModel.from_unet2d` drops) and the motion vocabulary added to the word-level tokenizer.
"""

from __future__ import annotations

import copy
import functools
import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from PIL import Image, ImageDraw
from torch import nn
from transformers import PreTrainedTokenizerFast

from genserve.toymodel import dataset
from genserve.toymodel.tokenizer import build_tokenizer

MOTIONS = ("left", "right", "up", "down", "growing", "shrinking", "still")
TRANSLATIONS: dict[str, tuple[float, float]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
# Playing a clip backwards turns each motion into this one (a free augmentation in training).
REVERSED = {
    "left": "right",
    "right": "left",
    "up": "down",
    "down": "up",
    "growing": "shrinking",
    "shrinking": "growing",
    "still": "still",
}
DEFAULT_FRAMES = 16
MARGIN = 0.03  # gap between the shape's radius and the picture's edge, as a fraction of the side

MOTION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("moving left", "moving to the left", "going left", "sliding left"),
    "right": ("moving right", "moving to the right", "going right", "sliding right"),
    "up": ("moving up", "going up", "moving upward", "rising"),
    "down": ("moving down", "going down", "moving downward", "falling"),
    "growing": ("growing", "getting bigger", "expanding"),
    "shrinking": ("shrinking", "getting smaller", "contracting"),
    "still": ("standing still", "staying still", "not moving"),
}


@dataclass(frozen=True)
class Clip:
    shape: str
    fg: str
    bg: str
    motion: str
    size: str  # "small" / "large" for moving and still shapes; the end size for growing / shrinking
    # Centre (fractions of the side) and radius (fraction of the side) at the first and last frame.
    start: tuple[float, float, float]
    end: tuple[float, float, float]

    def reversed(self) -> Clip:
        return replace(self, motion=REVERSED[self.motion], start=self.end, end=self.start)


def motion_vocabulary() -> list[str]:
    """The words the motion grammar adds to the image grammar's vocabulary (in a fixed order)."""
    words: list[str] = []
    for phrases in MOTION_PHRASES.values():
        for phrase in phrases:
            words += [w for w in phrase.split() if w not in words]
    if "still" not in words:
        words.append("still")
    return [w for w in words if w not in dataset.vocabulary()]


def held_out_triples() -> list[tuple[str, str, str]]:
    """The image model's held-out (shape, fg, bg) triples: never seen moving, nor drawn."""
    return dataset.held_out_triples()


def training_triples() -> list[tuple[str, str, str]]:
    return dataset.training_triples(held_out_triples())


def sample_clip(rng: random.Random, triples: list[tuple[str, str, str]], motion: str | None = None) -> Clip:
    """A random clip: a shape from `triples` moving linearly (uniform over MOTIONS unless given)."""
    shape, fg, bg = rng.choice(triples)
    motion = motion or rng.choice(MOTIONS)
    if motion in ("growing", "shrinking"):
        small, large = rng.uniform(0.09, 0.12), rng.uniform(0.21, 0.25)
        cx, cy = (rng.uniform(large + MARGIN, 1 - large - MARGIN) for _ in range(2))
        start, end = (cx, cy, small), (cx, cy, large)
        if motion == "shrinking":
            start, end = end, start
        return Clip(shape, fg, bg, motion, "large" if motion == "growing" else "small", start, end)
    size = "small" if rng.random() < 0.5 else "large"
    r = dataset.SIZE_RADII[size] * rng.uniform(0.9, 1.1)
    low, high = r + MARGIN, 1 - r - MARGIN
    cx, cy = rng.uniform(low, high), rng.uniform(low, high)
    if motion == "still":
        return Clip(shape, fg, bg, motion, size, (cx, cy, r), (cx, cy, r))
    dx, dy = TRANSLATIONS[motion]
    travel = rng.uniform(0.3, min(0.5, high - low))
    along = rng.uniform(low, high - travel)  # where the shape starts along its axis (from the origin side)
    if dx:
        x0 = along if dx > 0 else high - (along - low)
        return Clip(shape, fg, bg, motion, size, (x0, cy, r), (x0 + dx * travel, cy, r))
    y0 = along if dy > 0 else high - (along - low)
    return Clip(shape, fg, bg, motion, size, (cx, y0, r), (cx, y0 + dy * travel, r))


# 1. Drawing


def draw_frame(
    shape: str, fg: str, bg: str, fx: float, fy: float, radius: float, resolution: int = 64
) -> Image.Image:
    """One frame: `dataset.draw_scene`'s drawing (4x supersampled, same shapes) at any centre and radius."""
    scale = 4
    side = resolution * scale
    cx, cy, r = fx * side, fy * side, radius * side
    image = Image.new("RGB", (side, side), dataset.COLORS[bg])
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse([cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9], fill=dataset.COLORS[fg])
    else:
        draw.polygon(dataset.shape_polygon(shape, cx, cy, r), fill=dataset.COLORS[fg])
    return image.resize((resolution, resolution), Image.Resampling.LANCZOS)


def clip_track(clip: Clip, frames: int = DEFAULT_FRAMES) -> np.ndarray:
    """(frames, 3): centre x, centre y and radius of every frame (linear from start to end)."""
    t = np.linspace(0.0, 1.0, frames)[:, None]
    return (1 - t) * np.array(clip.start) + t * np.array(clip.end)


def render_clip(clip: Clip, frames: int = DEFAULT_FRAMES, resolution: int = 64) -> np.ndarray:
    """The clip's frames as uint8 (frames, H, W, 3)."""
    return np.stack(
        [
            np.asarray(draw_frame(clip.shape, clip.fg, clip.bg, fx, fy, r, resolution))
            for fx, fy, r in clip_track(clip, frames)
        ]
    )


# 2. Captions


def canonical_motion_caption(clip: Clip) -> str:
    """The single fixed wording used by the evaluation."""
    thing = f"{clip.fg} {clip.shape}"
    background = f"on a {clip.bg} background"
    if clip.motion == "still":
        return f"a still {thing} {background}"
    if clip.motion in TRANSLATIONS:
        return f"a {thing} moving {clip.motion} {background}"
    return f"a {thing} {clip.motion} {background}"


def motion_caption_for(clip: Clip, rng: random.Random) -> str:
    """One random caption for the clip: the image grammar's shape and background phrases plus a
    motion phrase. A size word is used only for moving and still shapes (a growing shape has none),
    and only sometimes for large ones, as in the image grammar."""
    size = ""
    if clip.motion not in ("growing", "shrinking"):
        if clip.size == "small" or rng.random() < 0.5:
            size = f"{rng.choice(dataset.SIZE_WORDS[clip.size])} "
    still = "still " if clip.motion == "still" and rng.random() < 0.4 else ""
    article = rng.choice(("a ", "a ", "the ", "one ", ""))
    thing = f"{article}{still}{size}{clip.fg} {rng.choice(dataset.SHAPE_WORDS[clip.shape])}"
    motion = "" if still else rng.choice(MOTION_PHRASES[clip.motion])
    background = rng.choice(
        (
            f"on a {clip.bg} background",
            f"on a plain {clip.bg} background",
            f"against a {clip.bg} background",
            f"on {clip.bg}",
            f"with a {clip.bg} backdrop",
            f"over a {clip.bg} background",
        )
    )
    orders = (
        (thing, motion, background),
        (thing, motion, background),
        (thing, background, motion),
        (f"{clip.bg} background", thing, motion),
    )
    order = rng.choice(orders)
    words = " ".join(part for part in order if part)
    if order[0] is thing:
        words = rng.choice(("", "", "", "a picture of ", "a simple drawing of ", "an image of ")) + words
    return " ".join(words.split())


# 3. Model pieces


def build_motion_tokenizer() -> PreTrainedTokenizerFast:
    """genserve-shapes' tokenizer (same ids for every old word) plus the motion words at the end."""
    return build_tokenizer(dataset.vocabulary() + motion_vocabulary())


class TextAugmentedTimeEmbedding(nn.Module):
    """The timestep embedding plus the base UNet's pooled-text embedding of the current prompt."""

    def __init__(self, time_embedding: nn.Module, text_embedding: nn.Module) -> None:
        super().__init__()
        self.time_embedding = time_embedding
        self.text_embedding = text_embedding
        self.text: torch.Tensor | None = None  # set by ShapesUNetMotionModel.forward for one call

    def forward(self, sample: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_embedding(sample, condition)
        text = self.text
        if text.shape[0] != emb.shape[0]:  # the prompt repeated once per frame (as AnimateDiffPipeline does)
            text = text[:: text.shape[0] // emb.shape[0]]
        return emb + self.text_embedding(text).to(emb.dtype)


class MotionTextConditioning(nn.Module):
    """The prompt, pooled, as one bias per motion module, added to the module's normalised input.

    AnimateDiff's motion modules see no text: in genserve-shapes' frozen UNet the motion words
    reached them only indirectly, and after 800 steps the shapes moved but in random directions. This
    small head (attention pooling over the prompt's tokens, an MLP, one zero-initialised projection
    per motion module) tells every temporal transformer which motion was asked for. It only shifts
    the temporal attention's input, never the spatial stream (the residual), so with zero heads the
    model is exactly AnimateDiff's.
    """

    def __init__(self, text_dim: int, channels: list[int], hidden: int = 256) -> None:
        super().__init__()
        self.config = {"text_dim": text_dim, "channels": list(channels), "hidden": hidden}
        self.score = nn.Linear(text_dim, 1)
        self.mlp = nn.Sequential(nn.Linear(text_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.heads = nn.ModuleList(nn.Linear(hidden, c) for c in channels)
        for head in self.heads:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, text: torch.Tensor) -> list[torch.Tensor]:
        weights = self.score(text).softmax(dim=1)
        hidden = self.mlp((weights * text).sum(1))
        return [head(hidden) for head in self.heads]


def motion_module_norms(unet: nn.Module) -> list[nn.GroupNorm]:
    """The input norm of every motion module, in a fixed order."""
    return [
        m.norm
        for name, m in unet.named_modules()
        if name.endswith(tuple(f"motion_modules.{i}" for i in range(8)))
    ]


class ShapesUNetMotionModel(UNetMotionModel):
    """A `UNetMotionModel` that keeps genserve-shapes' text addition embedding, and optionally tells
    its motion modules the prompt (`MotionTextConditioning`).

    genserve-shapes adds an attention-pooled summary of the prompt to the timestep embedding
    (`addition_embed_type="text"`); UNetMotionModel only knows SDXL's "text_time" and
    `from_unet2d` drops it, so the spatial layers would run without the colour signal they were
    trained with. Build it with `build_motion_unet`.
    """

    def attach_motion_text(self, conditioning: MotionTextConditioning) -> None:
        self.motion_text = conditioning
        self._motion_biases: list[torch.Tensor] | None = None
        for index, norm in enumerate(motion_module_norms(self)):
            norm.register_forward_hook(functools.partial(self._add_motion_bias, index))

    def _add_motion_bias(
        self, index: int, module: nn.Module, inputs: Any, output: torch.Tensor
    ) -> torch.Tensor:
        if self._motion_biases is None:
            return output
        return output + self._motion_biases[index][:, :, None, None, None].to(output.dtype)

    def forward(  # type: ignore[override]
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int,
        encoder_hidden_states: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        augmented = isinstance(self.time_embedding, TextAugmentedTimeEmbedding)
        if augmented:
            self.time_embedding.text = encoder_hidden_states
        motion_text = getattr(self, "motion_text", None)
        if motion_text is not None:
            per_clip = encoder_hidden_states
            if per_clip.shape[0] != sample.shape[0]:  # one copy per frame: keep one per clip
                per_clip = per_clip[:: per_clip.shape[0] // sample.shape[0]]
            self._motion_biases = motion_text(per_clip.to(motion_text.score.weight.dtype))
        try:
            return super().forward(sample, timestep, encoder_hidden_states, *args, **kwargs)
        finally:
            if augmented:
                self.time_embedding.text = None
            self._motion_biases = None


MOTION_TEXT_FILE = "motion_text_conditioning.safetensors"


def new_motion_text(unet: ShapesUNetMotionModel) -> MotionTextConditioning:
    channels = [norm.num_channels for norm in motion_module_norms(unet)]
    return MotionTextConditioning(unet.config.cross_attention_dim, channels)


def save_motion_text(conditioning: MotionTextConditioning, folder: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in conditioning.state_dict().items()}
    save_file(state, str(folder / MOTION_TEXT_FILE), metadata={"config": json.dumps(conditioning.config)})


def load_motion_text(folder: Path) -> MotionTextConditioning | None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(folder) / MOTION_TEXT_FILE
    if not path.exists():
        return None
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    conditioning = MotionTextConditioning(**config)
    conditioning.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return conditioning


def build_motion_unet(
    unet: UNet2DConditionModel, adapter: MotionAdapter, motion_text: MotionTextConditioning | None = None
) -> ShapesUNetMotionModel:
    """`UNetMotionModel.from_unet2d(unet, adapter)` plus the base UNet's text addition embedding and,
    if given, the motion text conditioning."""
    model = ShapesUNetMotionModel.from_unet2d(unet, adapter)
    if unet.config.addition_embed_type == "text":
        model.time_embedding = TextAugmentedTimeEmbedding(
            model.time_embedding, copy.deepcopy(unet.add_embedding)
        )
    if motion_text is not None:
        model.attach_motion_text(motion_text)
    return model.to(unet.dtype)

"""Warped initial noise: the motion a caption names, written into the clip's starting noise.

genserve-shapes-motion does not read the motion words with a learned module (its model card tells
why: 2,800 steps of a text-conditioned head left direction at chance). Instead the caption's motion,
parsed with the caption grammar (`motion_of_prompt`), sets a trajectory (`trajectory`), and every
frame's initial latent noise is the first frame's noise carried along it (`warped_noise`), as in
Go-with-the-Flow (Burgert et al., CVPR 2025) and "How I Warped Your Noise" (Chang et al., ICLR 2024).
The motion adapter is trained on clips noised the same way (each clip's noise warped along that
clip's own motion), so it learns to move the shape with its noise.

Gaussianity: the noise is drawn at `FINE`x the latent resolution on a canvas `CANVAS`x the frame, so
a warped frame never wraps. A frame's latent pixel is the sum of its FINE x FINE fine pixels' source
values (nearest source under the warp) divided by sqrt(sum of squared multiplicities), so every latent
pixel of every frame is exactly N(0, 1). Translations by whole fine pixels keep latent pixels
independent; a zoom can let two neighbouring latent pixels share a source fine pixel at their border,
a slight correlation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import AnimateDiffPipeline

from genserve.toymodel.motion import MOTION_PHRASES, TRANSLATIONS, Clip, clip_track

FINE = 8  # fine noise pixels per latent pixel, per side
CANVAS = 3  # the fine noise covers CANVAS x the frame per side: shifts and zooms never wrap
# The trajectory a caption gets: the middle of the training clips' ranges (a move of 0.3-0.5 of the
# side; a radius from 0.09-0.12 to 0.21-0.25).
TRAVEL = 0.4
ZOOM = 2.2

_PHRASES = sorted(
    (
        (phrase, name)
        for name, phrases in MOTION_PHRASES.items()
        for phrase in phrases + (("still",) if name == "still" else ())
    ),
    key=lambda item: -len(item[0]),
)


def motion_of_prompt(prompt: str) -> str | None:
    """The motion a prompt names ("moving to the left" -> "left"), the earliest one if it names
    several; None if it names none. Uses the caption grammar's phrases (`motion.MOTION_PHRASES`)."""
    text = " ".join(prompt.lower().split())
    found: list[tuple[int, str]] = []
    for phrase, name in _PHRASES:
        match = re.search(rf"\b{re.escape(phrase)}\b", text)
        if match:
            found.append((match.start(), name))
    return min(found)[1] if found else None


def trajectory(motion: str, frames: int) -> torch.Tensor:
    """(frames, 3): the noise's displacement (dx, dy, fractions of the side) and zoom per frame, for
    a caption's motion: linear over the clip, like the training clips."""
    t = torch.linspace(0.0, 1.0, frames)
    dx, dy = TRANSLATIONS.get(motion, (0, 0))
    zoom = {"growing": ZOOM, "shrinking": 1 / ZOOM}.get(motion, 1.0)
    return torch.stack([dx * TRAVEL * t, dy * TRAVEL * t, 1 + (zoom - 1) * t], dim=1)


def clip_trajectory(clip: Clip, frames: int) -> torch.Tensor:
    """(frames, 3): a drawn clip's own displacement and zoom (radius over the first radius)."""
    track = torch.as_tensor(clip_track(clip, frames), dtype=torch.float32)
    return torch.cat([track[:, :2] - track[:1, :2], track[:, 2:] / track[:1, 2:]], dim=1)


def warped_noise(
    channels: int, height: int, width: int, path: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(channels, frames, height, width) N(0, 1) noise whose frame f is frame 0's noise displaced by
    path[f, :2] (fractions of the side) and zoomed by path[f, 2] about the frame's centre."""
    fine_h, fine_w = height * FINE, width * FINE
    canvas = torch.randn(channels, CANVAS * fine_h, CANVAS * fine_w, generator=generator)
    flat = canvas.reshape(channels, -1)
    # fine pixel centres as fractions of the frame, and the latent pixel (block) each belongs to
    u = (torch.arange(fine_w) + 0.5) / fine_w
    v = (torch.arange(fine_h) + 0.5) / fine_h
    block = (torch.arange(fine_h)[:, None] // FINE) * width + torch.arange(fine_w)[None, :] // FINE
    offset_h, offset_w = (CANVAS - 1) // 2 * fine_h, (CANVAS - 1) // 2 * fine_w
    frames = []
    for dx, dy, zoom in path.tolist():
        sx = torch.floor((0.5 + (u - dx - 0.5) / zoom) * fine_w).long() + offset_w
        sy = torch.floor((0.5 + (v - dy - 0.5) / zoom) * fine_h).long() + offset_h
        sx = sx.clamp(0, CANVAS * fine_w - 1)
        sy = sy.clamp(0, CANVAS * fine_h - 1)
        source = sy[:, None] * (CANVAS * fine_w) + sx[None, :]  # (fine_h, fine_w)
        sums = torch.zeros(channels, height * width).index_add_(1, block.flatten(), flat[:, source.flatten()])
        # sqrt(sum of squared multiplicities) of each block's sources: the sum's standard deviation
        pairs, counts = torch.unique(block.flatten() * flat.shape[1] + source.flatten(), return_counts=True)
        variance = torch.zeros(height * width).index_add_(0, pairs // flat.shape[1], counts.float() ** 2)
        frames.append((sums / variance.sqrt()).reshape(channels, height, width))
    return torch.stack(frames, dim=1)


def prompt_noise(
    prompts: Sequence[str],
    shape: tuple[int, int, int, int, int],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """(batch, C, F, h, w) initial noise for a batch: each clip's noise warped along its prompt's
    motion; a prompt naming no motion gets independent noise per frame (plain AnimateDiff)."""
    batch, channels, frames, height, width = shape
    clips = []
    for prompt, generator in zip(prompts, generators, strict=True):
        named = motion_of_prompt(prompt)
        if named is None:
            clips.append(torch.randn(channels, frames, height, width, generator=generator))
        else:
            clips.append(warped_noise(channels, height, width, trajectory(named, frames), generator))
    assert len(clips) == batch, (len(clips), batch)
    return torch.stack(clips)


class WarpedNoiseAnimateDiffPipeline(AnimateDiffPipeline):
    """An `AnimateDiffPipeline` whose initial noise moves the way each prompt says (`prompt_noise`).

    Given `latents`, or with FreeNoise enabled, it is the plain pipeline. A single generator serves
    every clip of the batch in turn; a list gives one per clip, as in diffusers.

    It runs under the precision genserve-shapes-motion was trained and evaluated in
    (`train.mixed_precision`: bf16 autocast where this CPU computes bf16 faster, and on CUDA), whoever
    calls it: `genserve video` (the engine) called it outside any autocast, in fp32, and a clip took
    9.0 s instead of `generate_clip`'s 5.4 s (same process, one thread)."""

    def __call__(self, prompt: str | list[str] | None = None, *args: Any, **kwargs: Any) -> Any:
        from genserve.toymodel.train import mixed_precision

        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        self._noise_prompts = [p for p in prompts for _ in range(kwargs.get("num_videos_per_prompt") or 1)]
        try:
            with mixed_precision(self.device.type):
                return super().__call__(prompt, *args, **kwargs)
        finally:
            self._noise_prompts = []

    def prepare_latents(  # type: ignore[override]
        self,
        batch_size: int,
        num_channels_latents: int,
        num_frames: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        prompts = getattr(self, "_noise_prompts", [])
        if latents is not None or self.free_noise_enabled or len(prompts) != batch_size:
            return super().prepare_latents(
                batch_size, num_channels_latents, num_frames, height, width, dtype, device, generator, latents
            )
        generators = generator if isinstance(generator, list) else [generator] * batch_size
        shape = (
            batch_size,
            num_channels_latents,
            num_frames,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        noise = prompt_noise(prompts, shape, generators)
        return noise.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma

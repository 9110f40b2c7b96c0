"""The motion a caption names, written into how the built-in video model's clip starts.

genserve-shapes-motion does not read the motion words with a learned module (its model card tells
why: 2,800 steps of a text-conditioned head left direction at chance). Instead the caption's motion,
parsed with the caption grammar (`motion_of_prompt`), sets a trajectory (`trajectory`), and:

- **warped noise**: every frame's initial latent noise is the first frame's noise carried along it
  (`warped_noise`), as in Go-with-the-Flow (Burgert et al., CVPR 2025) and "How I Warped Your Noise"
  (Chang et al., ICLR 2024). The motion adapter is trained on clips noised the same way (each clip's
  noise warped along that clip's own motion), so it learns to move the shape with its noise;
- **trajectory start** (the default): genserve-shapes draws the first frame (`without_motion`), its
  latent is carried along a trajectory that keeps it in the picture (`framed_trajectory`,
  `carried_latents`), noised with that warped noise part of the way up the schedule, and the motion
  model denoises the rest (`WarpedNoiseAnimateDiffPipeline`).

Gaussianity: the noise is drawn at `FINE`x the latent resolution on a canvas `CANVAS`x the frame, so
a warped frame never wraps. A frame's latent pixel is the sum of its FINE x FINE fine pixels' source
values (nearest source under the warp) divided by sqrt(sum of squared multiplicities), so every latent
pixel of every frame is exactly N(0, 1). Translations by whole fine pixels keep latent pixels
independent; a zoom can let two neighbouring latent pixels share a source fine pixel at their border,
a slight correlation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import AnimateDiffPipeline, AnimateDiffVideoToVideoPipeline, StableDiffusionPipeline

from genserve.toymodel.motion import MOTION_PHRASES, TRANSLATIONS, Clip, clip_track

FINE = 8  # fine noise pixels per latent pixel, per side
CANVAS = 3  # the fine noise covers CANVAS x the frame per side: shifts and zooms never wrap
# The trajectory a caption gets: the middle of the training clips' ranges (a move of 0.3-0.5 of the
# side; a radius from 0.09-0.12 to 0.21-0.25).
TRAVEL = 0.4
ZOOM = 2.2
# The trajectory start (`WarpedNoiseAnimateDiffPipeline.first_frame`): the clip is denoised from this
# far up the schedule, starting from the first frame's picture carried along the trajectory.
TRAJECTORY_STRENGTH = 0.45
# Growing and shrinking in the trajectory start run between these radii (fractions of the side): the
# training clips' small and large ends (0.09-0.12 and 0.21-0.25).
SMALL_RADIUS = 0.1
LARGE_RADIUS = 0.23
# The half-maximum subject of genserve-shapes' latent covers about this share of a drawn shape's
# radius (0.9 for circles, 0.6 for stars and triangles; drawn shapes of radius 0.10-0.25, encoded).
LATENT_RADIUS_SCALE = 0.8

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


def without_motion(prompt: str) -> str:
    """The prompt with the motion phrases the grammar knows taken out: what a still picture of the
    clip's first frame shows ("a red circle moving right on a black background" -> "a red circle on a
    black background")."""
    text = " ".join(prompt.split())
    for phrase, _ in _PHRASES:
        text = re.sub(rf"\b{re.escape(phrase)}\b", " ", text, flags=re.IGNORECASE)
    return " ".join(text.split())


def trajectory(motion: str, frames: int) -> torch.Tensor:
    """(frames, 3): the noise's displacement (dx, dy, fractions of the side) and zoom per frame, for
    a caption's motion: linear over the clip, like the training clips."""
    t = torch.linspace(0.0, 1.0, frames)
    dx, dy = TRANSLATIONS.get(motion, (0, 0))
    zoom = {"growing": ZOOM, "shrinking": 1 / ZOOM}.get(motion, 1.0)
    return torch.stack([dx * TRAVEL * t, dy * TRAVEL * t, 1 + (zoom - 1) * t], dim=1)


def framed_trajectory(motion: str, frames: int, subject: tuple[float, float, float]) -> torch.Tensor:
    """The trajectory (`trajectory`'s columns) for a subject now at `subject` = (x, y, radius), so
    that it moves the way the training clips did and stays in the picture:

    - a move runs across the middle of the frame along its axis (from 0.3 to 0.7 of the side for
      "moving right"; the other coordinate stays); carried off the edge, a shape came back cut in
      half, and the motion model redrew it whole elsewhere;
    - growing goes from radius `SMALL_RADIUS` to `LARGE_RADIUS` about the frame's centre, shrinking
      the other way where the subject is (zooming the drawn size by a fixed factor made a large
      shape overflow the frame, and the motion model shrank it back);
    - still stays."""
    t = torch.linspace(0.0, 1.0, frames)
    dx, dy = TRANSLATIONS.get(motion, (0, 0))
    cx, cy, radius = subject
    shift_x = 0.5 - dx * TRAVEL / 2 - cx if dx else 0.0
    shift_y = 0.5 - dy * TRAVEL / 2 - cy if dy else 0.0
    zoom = torch.ones(frames)
    if motion in ("growing", "shrinking") and radius > 0:
        first, last = (SMALL_RADIUS, LARGE_RADIUS) if motion == "growing" else (LARGE_RADIUS, SMALL_RADIUS)
        zoom = (first + (last - first) * t) / radius
    if motion == "growing":
        shift_x, shift_y = 0.5 - cx, 0.5 - cy
    return torch.stack([shift_x + dx * TRAVEL * t, shift_y + dy * TRAVEL * t, zoom], dim=1)


def clip_trajectory(clip: Clip, frames: int) -> torch.Tensor:
    """(frames, 3): a drawn clip's own displacement and zoom (radius over the first radius)."""
    track = torch.as_tensor(clip_track(clip, frames), dtype=torch.float32)
    return torch.cat([track[:, :2] - track[:1, :2], track[:, 2:] / track[:1, 2:]], dim=1)


def source_position(position: torch.Tensor, shift: float, centre: float, zoom: float) -> torch.Tensor:
    """Where the content at `position` (fractions of the side, one axis) comes from when a frame is
    shifted by `shift` and zoomed by `zoom` about `centre`: the inverse of x -> centre + zoom *
    (x - centre) + shift."""
    return centre + (position - shift - centre) / zoom


def warped_noise(
    channels: int,
    height: int,
    width: int,
    path: torch.Tensor,
    generator: torch.Generator | None = None,
    centre: tuple[float, float] = (0.5, 0.5),
) -> torch.Tensor:
    """(channels, frames, height, width) N(0, 1) noise whose frame f is frame 0's noise displaced by
    path[f, :2] (fractions of the side) and zoomed by path[f, 2] about `centre` (the frame's, unless
    given)."""
    fine_h, fine_w = height * FINE, width * FINE
    canvas = torch.randn(channels, CANVAS * fine_h, CANVAS * fine_w, generator=generator)
    flat = canvas.reshape(channels, -1)
    # fine pixel centres as fractions of the frame, and the latent pixel (block) each belongs to
    u = (torch.arange(fine_w) + 0.5) / fine_w
    v = (torch.arange(fine_h) + 0.5) / fine_h
    block = (torch.arange(fine_h)[:, None] // FINE) * width + torch.arange(fine_w)[None, :] // FINE
    offset_h, offset_w = (CANVAS - 1) // 2 * fine_h, (CANVAS - 1) // 2 * fine_w
    frames = []
    cx, cy = centre
    for dx, dy, zoom in path.tolist():
        sx = torch.floor(source_position(u, dx, cx, zoom) * fine_w).long() + offset_w
        sy = torch.floor(source_position(v, dy, cy, zoom) * fine_h).long() + offset_h
        sx = sx.clamp(0, CANVAS * fine_w - 1)
        sy = sy.clamp(0, CANVAS * fine_h - 1)
        source = sy[:, None] * (CANVAS * fine_w) + sx[None, :]  # (fine_h, fine_w)
        sums = torch.zeros(channels, height * width).index_add_(1, block.flatten(), flat[:, source.flatten()])
        # sqrt(sum of squared multiplicities) of each block's sources: the sum's standard deviation
        pairs, counts = torch.unique(block.flatten() * flat.shape[1] + source.flatten(), return_counts=True)
        variance = torch.zeros(height * width).index_add_(0, pairs // flat.shape[1], counts.float() ** 2)
        frames.append((sums / variance.sqrt()).reshape(channels, height, width))
    return torch.stack(frames, dim=1)


def foreground_extent(latent: torch.Tensor) -> tuple[float, float, float]:
    """(x, y, radius), fractions of the side: where a (C, h, w) latent of a plain-background picture
    holds its subject, and about how big it is. The background is the median latent pixel of the
    border; the subject is the latent pixels farther from it than half the farthest one. The centre
    is their mean weighted by that excess; the radius is that of a disc of their area over
    `LATENT_RADIUS_SCALE`. A latent without a subject gives the centre and radius 0."""
    border = torch.cat([latent[:, 0], latent[:, -1], latent[:, :, 0], latent[:, :, -1]], dim=1)
    distance = (latent - border.median(dim=1).values[:, None, None]).norm(dim=0)
    weight = (distance - 0.5 * distance.max()).clamp(min=0)
    if float(weight.sum()) == 0.0:
        return 0.5, 0.5, 0.0
    height, width = distance.shape
    ys = (torch.arange(height, dtype=latent.dtype) + 0.5) / height
    xs = (torch.arange(width, dtype=latent.dtype) + 0.5) / width
    total = weight.sum()
    radius = math.sqrt(float((weight > 0).float().mean()) / math.pi) / LATENT_RADIUS_SCALE
    return float((weight.sum(0) * xs).sum() / total), float((weight.sum(1) * ys).sum() / total), radius


def carried_latents(latent: torch.Tensor, path: torch.Tensor, centre: tuple[float, float]) -> torch.Tensor:
    """(C, frames, h, w): a (C, h, w) latent carried along `path` (`trajectory`'s rows): frame f is
    the latent displaced by path[f, :2] and zoomed by path[f, 2] about `centre` (fractions of the
    side). Bilinear; what comes into view from outside repeats the border (the background)."""
    channels, height, width = latent.shape
    u = (torch.arange(width, dtype=latent.dtype) + 0.5) / width
    v = (torch.arange(height, dtype=latent.dtype) + 0.5) / height
    cx, cy = centre
    frames = []
    for dx, dy, zoom in path.tolist():
        # the source of each output pixel, in grid_sample's [-1, 1] coordinates
        sx = source_position(u, dx, cx, zoom) * 2 - 1
        sy = source_position(v, dy, cy, zoom) * 2 - 1
        grid = torch.stack(torch.meshgrid(sy, sx, indexing="ij")[::-1], dim=-1)[None]
        frames.append(
            torch.nn.functional.grid_sample(
                latent[None], grid, mode="bilinear", padding_mode="border", align_corners=False
            )[0]
        )
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
    """An `AnimateDiffPipeline` whose clips move the way each prompt says.

    Two ways, both from the prompt's motion (`motion_of_prompt`) and its trajectory (`trajectory`):

    - **Warped noise** (`prompt_noise`): every frame's initial noise is the first frame's, carried
      along the trajectory; the motion adapter was trained to move the shape with its noise.
    - **Trajectory start**, when `first_frame` (genserve-shapes itself, a `StableDiffusionPipeline`)
      is set and every clip of the call names a motion: the image model draws the first frame
      (`without_motion(prompt)`), its latent is carried along the trajectory (`carried_latents`,
      `framed_trajectory`, about the subject's centre, `foreground_extent`), noised with the warped noise to
      `trajectory_strength` of the schedule, and the motion model denoises the rest of the way (an
      `AnimateDiffVideoToVideoPipeline` over the same modules). The trajectory then sets where the
      subject goes; the motion model makes each frame a clean picture of it and the frames one clip.

    Given `latents`, or with FreeNoise enabled, it is the plain pipeline. A single generator serves
    every clip of the batch in turn; a list gives one per clip, as in diffusers.

    It runs under the precision genserve-shapes-motion was trained and evaluated in
    (`train.mixed_precision`: bf16 autocast where this CPU computes bf16 faster, and on CUDA), whoever
    calls it: `genserve video` (the engine) called it outside any autocast, in fp32, and a clip took
    9.0 s instead of `generate_clip`'s 5.4 s (same process, one thread)."""

    first_frame: StableDiffusionPipeline | None = None
    trajectory_strength: float = TRAJECTORY_STRENGTH

    def __call__(self, prompt: str | list[str] | None = None, *args: Any, **kwargs: Any) -> Any:
        from genserve.toymodel.train import mixed_precision

        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        self._noise_prompts = [p for p in prompts for _ in range(kwargs.get("num_videos_per_prompt") or 1)]
        try:
            with mixed_precision(self.device.type):
                if self._starts_from_trajectory(args, kwargs):
                    return self._from_trajectory(**kwargs)
                return super().__call__(prompt, *args, **kwargs)
        finally:
            self._noise_prompts = []

    def to(self, *args: Any, **kwargs: Any) -> WarpedNoiseAnimateDiffPipeline:
        if self.first_frame is not None:
            self.first_frame.to(*args, **kwargs)
        return super().to(*args, **kwargs)

    def _starts_from_trajectory(self, args: tuple, kwargs: dict[str, Any]) -> bool:
        return (
            self.first_frame is not None
            and self.trajectory_strength < 1.0
            and not args
            and kwargs.get("latents") is None
            and kwargs.get("prompt_embeds") is None
            and not self.free_noise_enabled
            and bool(self._noise_prompts)
            and all(motion_of_prompt(p) is not None for p in self._noise_prompts)
        )

    def _from_trajectory(
        self,
        num_frames: int = 16,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_videos_per_prompt: int | None = 1,
        **kwargs: Any,
    ) -> Any:
        assert self.first_frame is not None
        prompts = self._noise_prompts
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        generators = generator if isinstance(generator, list) else [generator] * len(prompts)
        negatives = None
        if negative_prompt is not None:
            per_prompt = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
            negatives = [n for n in per_prompt for _ in range(num_videos_per_prompt or 1)]
        clean, noise = self.rough_clips(
            prompts, generators, num_frames, height, width, num_inference_steps, guidance_scale, negatives
        )
        # 3. Noised to the start step, then denoised by the motion model from there (at least one step).
        video_to_video = self._video_to_video()
        scheduler = video_to_video.scheduler
        scheduler.set_timesteps(num_inference_steps)
        motion_steps = min(max(1, int(num_inference_steps * self.trajectory_strength)), num_inference_steps)
        start = num_inference_steps - motion_steps
        timestep = scheduler.timesteps[start * scheduler.order].repeat(len(prompts))
        latents = scheduler.add_noise(clean, noise, timestep)
        callback = kwargs.pop("callback_on_step_end", None)
        if callback is not None:
            # The caller asked for num_inference_steps: the first frame stands for the first `start`
            # of them, so the motion model's steps are reported as start+1 .. num_inference_steps.
            def on_step_end(pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> Any:
                pipe._num_timesteps = num_inference_steps
                return callback(pipe, start + i, t, tensors)

            kwargs["callback_on_step_end"] = on_step_end
        return video_to_video(
            prompt=prompts,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            # the same cut as `start`: video_to_video keeps int(steps * strength) steps
            strength=min(1.0, (motion_steps + 0.5) / num_inference_steps),
            guidance_scale=guidance_scale,
            negative_prompt=negatives,
            generator=generators,
            latents=latents.to(device=self.device, dtype=self.unet.dtype),
            **kwargs,
        )

    def rough_clips(
        self,
        prompts: Sequence[str],
        generators: Sequence[torch.Generator | None],
        num_frames: int,
        height: int,
        width: int,
        steps: int,
        guidance_scale: float,
        negative_prompts: list[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The trajectory start's rough clips and their noise, both (batch, C, frames, h, w) on the CPU:
        each prompt's first frame drawn by `first_frame` and carried along its framed trajectory, and
        that clip's warped noise (drawn from its generator after the first frame's)."""
        assert self.first_frame is not None
        firsts = self.first_frame(
            [without_motion(p) for p in prompts],
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompts,
            generator=list(generators),
            output_type="latent",
        ).images
        clean, noise = [], []
        for prompt, first, gen in zip(prompts, firsts.float().cpu(), generators, strict=True):
            subject = foreground_extent(first)
            path = framed_trajectory(motion_of_prompt(prompt) or "still", num_frames, subject)
            centre = subject[:2]
            clean.append(carried_latents(first, path, centre))
            noise.append(warped_noise(first.shape[0], first.shape[1], first.shape[2], path, gen, centre))
        return torch.stack(clean), torch.stack(noise)

    def _video_to_video(self) -> AnimateDiffVideoToVideoPipeline:
        """This pipeline's modules as an `AnimateDiffVideoToVideoPipeline` (built once)."""
        if getattr(self, "_video_to_video_pipe", None) is None:
            expected, optional = AnimateDiffVideoToVideoPipeline._get_signature_keys(
                AnimateDiffVideoToVideoPipeline
            )
            modules = {k: v for k, v in self.components.items() if k in expected or k in optional}
            self._video_to_video_pipe = AnimateDiffVideoToVideoPipeline(**modules)
            self._video_to_video_pipe.set_progress_bar_config(disable=True)
        return self._video_to_video_pipe

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

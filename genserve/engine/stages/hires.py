"""Hires fix, the second pass: the first pass's rows, upscaled, run an img2img pass at the larger size.

Upscaling: latent upscalers interpolate the first pass's latents; pixel upscalers decode them,
resample the picture and encode it again, sampling the VAE with the row's generator. Then each row
is noised with its own generator to where the second schedule starts (stages/plan.py), and joins
the loop there. The row keeps its generator from the first pass, so the second pass draws what it
would draw alone.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline

from genserve.engine.conditioning.latents import decode_latents, to_model_space
from genserve.engine.conditioning.text import Conditioning, sdxl_time_ids
from genserve.engine.loop.row import Row, renoise
from genserve.engine.models.registry import Family
from genserve.engine.stages.plan import is_latent_upscaler
from genserve.engine.stages.rows import Encode
from genserve.engine.stages.upscale import upscale_latents, upscale_picture
from genserve.schemas.generation import GenerationParams


def hires_rows(
    pipe: DiffusionPipeline,
    family: Family,
    rows: list[Row],
    scheduler: Any,
    timesteps: torch.Tensor,
    start: int,
    size: tuple[int, int],
    upscaler: str,
    encode: Encode,
    *,
    device: str,
    dtype: torch.dtype,
) -> list[Row]:
    """The second pass's rows, one per first-pass row, at `size` = (width, height) in pixels.

    `scheduler` has the second schedule's timesteps set; each row's copy begins at `start`.
    """
    width, height = size
    factor = pipe.vae_scale_factor
    denoiser = pipe.transformer if family == "sd3" else pipe.unet
    extra = None
    if denoiser.config.in_channels > pipe.vae.config.latent_channels:  # 9-channel inpainting UNet
        extra = _blank_inpaint_channels(pipe, family, encode, width, height).to(device=device, dtype=dtype)
    out = []
    for row in rows:
        if is_latent_upscaler(upscaler):
            clean = upscale_latents(row.latents, width // factor, height // factor, upscaler).cpu()
        else:
            [picture] = decode_latents(pipe, family, row.latents)
            larger = np.asarray(upscale_picture(picture, width, height, upscaler).convert("RGB"))
            clean = to_model_space(pipe.vae.config, family, encode(larger).sample(row.generator)).cpu()
        row_scheduler = copy.deepcopy(scheduler)
        if hasattr(row_scheduler, "set_begin_index"):
            row_scheduler.set_begin_index(start)
        noise = torch.randn(clean.shape, generator=row.generator, dtype=torch.float32)
        latents = renoise(row_scheduler, clean.float(), noise, timesteps[start])
        out.append(
            Row(
                item=row.item,
                seed=row.seed,
                scheduler=row_scheduler,
                generator=row.generator,
                start=start,
                latents=latents.to(device=device, dtype=dtype),
                extra=extra,
                image_embeds=row.image_embeds,  # the IP-Adapter stays loaded for the second pass
                ip_scale=row.ip_scale,
            )
        )
    return out


def hires_conditioning(
    pipe: DiffusionPipeline, family: Family, cond: Conditioning, params: GenerationParams
) -> Conditioning:
    """The first pass's conditioning for the second; SDXL's size micro-conditioning at its size."""
    if family != "sdxl" or cond.time_ids is None:
        return cond
    ids = sdxl_time_ids(pipe, params, cond.cond.dtype, cond.pooled)
    resized = copy.copy(cond)
    resized.time_ids = ids.to(cond.time_ids.device).repeat(len(cond.cond), 1)
    return resized


def _blank_inpaint_channels(
    pipe: DiffusionPipeline, family: Family, encode: Encode, width: int, height: int
) -> torch.Tensor:
    """A 9-channel UNet's extra input for a text-only row at the second pass's size: repaint
    everything (mask 1) from a blank mid-grey picture, as the first pass conditioned it."""
    factor = pipe.vae_scale_factor
    blank = np.full((height, width, 3), 127, np.uint8)
    masked = to_model_space(pipe.vae.config, family, encode(blank).mode()).cpu()
    return torch.cat([torch.ones(1, 1, height // factor, width // factor), masked], dim=1)

"""Rows from requests: text-only rows start from noise at index 0; img2img, inpaint and outpaint rows
start from their picture's latents, noised to the timestep where they join.

Per row and in this order, the row's generator draws: the VAE sample of its picture, the masked-area
noise ("latent_noise" fill), then the noise that takes it to its first timestep (the order diffusers'
img2img pipeline draws in, so a lone row reproduces it). A text-only row draws its initial noise only.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from genserve.engine.conditioning.latents import LatentDist, to_model_space
from genserve.engine.loop.denoise import BatchItem
from genserve.engine.loop.row import Blend, Row, renoise, start_index
from genserve.engine.models.registry import Family
from genserve.engine.stages.masks import latent_mask
from genserve.engine.stages.prepare import Picture

Encode = Callable[[np.ndarray], LatentDist]  # uint8 (H, W, 3) → the VAE's latent distribution


def build_rows(
    family: Family,
    vae_config: Any,
    scheduler: Any,
    timesteps: torch.Tensor,
    items: list[BatchItem],
    pictures: list[Picture | None],
    encode: Encode,
    *,
    latent_shape: tuple[int, int, int],
    pixel_size: tuple[int, int],
    model_channels: int,
    device: str,
    dtype: torch.dtype,
) -> list[Row]:
    """One row per image of every item; image k of item i uses seed seed_i + k.

    `scheduler` must already have its timesteps set (its copies keep them). `latent_shape` is
    (channels, h, w), `pixel_size` (height, width). `model_channels` is the denoiser's input
    channels: more than the latents' (9 = 4 + mask + masked picture) marks an inpainting UNet.
    """
    steps = len(timesteps)
    inpainting_model = model_channels > latent_shape[0]
    rows: list[Row] = []
    for i, (item, picture) in enumerate(zip(items, pictures, strict=True)):
        p = item.params
        start = 0 if picture is None else start_index(steps, p.strength)
        dist = None if picture is None else encode(picture.image)
        extra = (
            _inpaint_channels(family, vae_config, picture, dist, encode, latent_shape, pixel_size)
            if inpainting_model
            else None
        )
        for k in range(p.num_images):
            row_scheduler = copy.deepcopy(scheduler)
            if hasattr(row_scheduler, "set_begin_index"):
                row_scheduler.set_begin_index(start)
            generator = torch.Generator("cpu").manual_seed(p.seed + k)
            if picture is None or dist is None:
                noise = torch.randn((1, *latent_shape), generator=generator, dtype=torch.float32)
                # SD/SDXL samplers start at sigma_max; flow-matching schedulers from unit noise.
                latents, blend = noise * getattr(row_scheduler, "init_noise_sigma", 1.0), None
            else:
                latents, blend = _picture_start(
                    family,
                    vae_config,
                    row_scheduler,
                    timesteps[start],
                    picture,
                    dist,
                    generator,
                    blend=not inpainting_model,
                )
            rows.append(
                Row(
                    item=i,
                    seed=p.seed + k,
                    scheduler=row_scheduler,
                    generator=generator,
                    start=start,
                    latents=latents.to(device=device, dtype=dtype),
                    blend=None if blend is None else _to(blend, device, dtype),
                    extra=None if extra is None else extra.to(device=device, dtype=dtype),
                )
            )
    return rows


def _picture_start(
    family: Family,
    vae_config: Any,
    scheduler: Any,
    t: torch.Tensor,
    picture: Picture,
    dist: LatentDist,
    generator: torch.Generator,
    *,
    blend: bool,
) -> tuple[torch.Tensor, Blend | None]:
    clean = to_model_space(vae_config, family, dist.sample(generator)).cpu()
    mask = None
    if picture.mask is not None:
        mask = latent_mask(picture.mask, clean.shape[-2], clean.shape[-1])
        if picture.fill == "latent_noise":
            clean = (1 - mask) * clean + mask * torch.randn(
                clean.shape, generator=generator, dtype=torch.float32
            )
        elif picture.fill == "latent_nothing":
            clean = (1 - mask) * clean
    noise = torch.randn(clean.shape, generator=generator, dtype=torch.float32)
    latents = renoise(scheduler, clean, noise, t)
    if mask is None or not blend:
        return latents, None
    return latents, Blend(mask=mask, original=clean, noise=noise)


def _inpaint_channels(
    family: Family,
    vae_config: Any,
    picture: Picture | None,
    dist: LatentDist | None,
    encode: Encode,
    latent_shape: tuple[int, int, int],
    pixel_size: tuple[int, int],
) -> torch.Tensor:
    """A 9-channel UNet's extra input: the mask at latent size and the masked picture's latents.

    Without a mask the whole picture is repainted from a blank one (mask 1, mid-grey), as
    AUTOMATIC1111 conditions text-only rows; plain img2img keeps the picture (mask 0).
    """
    _, h, w = latent_shape
    if picture is None:
        blank = np.full((*pixel_size, 3), 127, np.uint8)
        mask = torch.ones(1, 1, h, w)
        masked = encode(blank).mode()
    elif picture.mask is None:
        mask = torch.zeros(1, 1, h, w)
        masked = dist.mode() if dist is not None else encode(picture.image).mode()
    else:
        mask = latent_mask(picture.mask, h, w)
        keep = (picture.mask < 0.5)[..., None]
        # diffusers grey-outs masked pixels (0 in [-1, 1]); 127.5 rounds to the nearest uint8.
        masked = encode(np.where(keep, picture.image, 127).astype(np.uint8)).mode()
    return torch.cat([mask, to_model_space(vae_config, family, masked).cpu()], dim=1)


def _to(blend: Blend, device: str, dtype: torch.dtype) -> Blend:
    move = lambda tensor: tensor.to(device=device, dtype=dtype)  # noqa: E731
    return Blend(mask=move(blend.mask), original=move(blend.original), noise=move(blend.noise))

"""One batch, in numbered phases as diffusers' pipelines read, on the pipeline's own components:

0. pictures in: fit, mask, outpaint canvas, crop (stages/prepare.py)
1. text conditioning per request (conditioning/text.py)
2. the shared timesteps
3. rows: per-row scheduler, generator, start index, starting latents, blend (stages/rows.py)
4. the loop: one model call per step for the rows that have joined (loop/denoise.py)
5. decode the rows that finished, and paste each back into its picture (stages/prepare.py)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline

from genserve.engine.conditioning.latents import LatentDist, decode_latents, encode_pixels, pixels_to_tensor
from genserve.engine.conditioning.text import encode_conditioning
from genserve.engine.loop.denoise import BatchItem, BatchStepCallback, ItemOutcome, run_rows
from genserve.engine.loop.previews import LatentRgbMap
from genserve.engine.loop.schedule import prepare_schedulers
from genserve.engine.models.registry import Family
from genserve.engine.stages.prepare import paste_back, prepare_picture
from genserve.engine.stages.rows import Encode, build_rows


def denoise_batch(
    pipe: DiffusionPipeline,
    family: Family,
    scheduler: Any,
    items: list[BatchItem],
    *,
    device: str,
    dtype: torch.dtype,
    rgb_map: LatentRgbMap,
    on_batch_step: BatchStepCallback | None = None,
    encode: Encode | None = None,
) -> list[ItemOutcome]:
    """Run compatible requests as one batch. Item i's images use seeds seed_i, seed_i + 1, ...

    `encode` turns a picture into its VAE latent distribution (the Engine passes its cache).
    """
    params = items[0].params
    if any(item.params.cfg_scale is None for item in items):
        raise ValueError("denoise_batch needs resolved params: cfg_scale is unset (Engine fills the model's)")
    outcomes = [ItemOutcome() for _ in items]
    if encode is None:
        encode = lambda image: uncached_encode(pipe, image, device)  # noqa: E731

    # 0. Pictures in
    pictures = [prepare_picture(item.params, item.init_image, item.mask) for item in items]

    # 1. Text conditioning
    cond = encode_conditioning(pipe, family, [item.params for item in items], device)

    # 2. Timesteps (each row gets its own copy of the scheduler in phase 3)
    [timed_scheduler], timesteps = prepare_schedulers(pipe, family, scheduler, 1, params, device)

    # 3. Rows
    denoiser = pipe.transformer if family == "sd3" else pipe.unet
    factor = pipe.vae_scale_factor
    rows = build_rows(
        family,
        pipe.vae.config,
        timed_scheduler,
        timesteps,
        items,
        pictures,
        encode,
        latent_shape=(pipe.vae.config.latent_channels, params.height // factor, params.width // factor),
        pixel_size=(params.height, params.width),
        model_channels=denoiser.config.in_channels,
        device=device,
        dtype=dtype,
    )

    # 4. The loop
    finished = run_rows(
        pipe,
        family,
        items,
        rows,
        cond,
        timesteps,
        rgb_map=rgb_map,
        outcomes=outcomes,
        on_batch_step=on_batch_step,
    )

    # 5. Decode what finished, paste it back, and hand each request its images
    if finished:
        images = decode_latents(pipe, family, torch.cat([row.latents for row in finished]))
        for row, image in zip(finished, images, strict=True):
            outcomes[row.item].images.append(paste_back(pictures[row.item], image))
    return outcomes


def uncached_encode(pipe: DiffusionPipeline, image: np.ndarray, device: str) -> LatentDist:
    return encode_pixels(pipe, pixels_to_tensor(image, device, pipe.vae.dtype))

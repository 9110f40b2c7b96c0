"""The denoising loop: several requests, one model call per step.

Requests that share a model, size, step count and sampler run as one batch. Each request keeps its
own prompt, negative prompt, seed and CFG scale, and each image ("row") its own scheduler instance
and noise generator, so a row follows exactly the arithmetic it would follow alone. When a request's
callback raises (cancellation), its rows leave the batch before the next step and stop costing compute.

The phases follow diffusers' pipelines, on the pipeline's own components:
  1. encode prompts per request      2. timesteps and per-row schedulers     3. initial noise
  4. denoising loop with per-row CFG  5. decode the surviving rows
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import PIL.Image
import torch
from diffusers import DiffusionPipeline

from genserve.engine.conditioning.latents import decode_latents
from genserve.engine.conditioning.text import encode_conditioning
from genserve.engine.loop.guidance import apply_guidance, predict_noise
from genserve.engine.loop.previews import LatentRgbMap, preview_images
from genserve.engine.loop.schedule import prepare_schedulers, scale_model_input, step_kwargs
from genserve.engine.models.registry import Family
from genserve.engine.speed.deepcache import begin_run
from genserve.schemas.generation import GenerationParams

StepCallback = Callable[[int, int], None]
PreviewCallback = Callable[[int, int, list[PIL.Image.Image]], None]
BatchStepCallback = Callable[[int, int, int], None]  # (step, total, rows computed), after item callbacks


@dataclass
class BatchItem:
    """One request in a batch, with its own callbacks.

    `init_image` and `mask` are the decoded pictures behind `params.init_image` / `params.mask`
    (the job keeps only their content hashes; the worker loads them from the artifact store).
    """

    params: GenerationParams
    on_step: StepCallback | None = None
    on_preview: PreviewCallback | None = None
    init_image: PIL.Image.Image | None = None
    mask: PIL.Image.Image | None = None


@dataclass
class ItemOutcome:
    images: list[PIL.Image.Image] = field(default_factory=list)
    error: BaseException | None = None  # what the item's callback raised; its rows were dropped


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
) -> list[ItemOutcome]:
    """Run compatible requests as one batch. Item i's images use seeds seed_i, seed_i + 1, ..."""
    params = items[0].params
    if any(item.params.cfg_scale is None for item in items):
        raise ValueError("denoise_batch needs resolved params: cfg_scale is unset (Engine fills the model's)")
    outcomes = [ItemOutcome() for _ in items]

    # 0. Rows: one per image, remembering which item each belongs to
    row_item = torch.tensor([i for i, item in enumerate(items) for _ in range(item.params.num_images)])
    seeds = [item.params.seed + k for item in items for k in range(item.params.num_images)]
    scales = torch.tensor([item.params.cfg_scale for item in items])[row_item]
    use_cfg = bool((scales > 1).any())

    # 1. Text conditioning
    cond = encode_conditioning(pipe, family, [item.params for item in items], device)

    # 2. Timesteps, one scheduler per row
    schedulers, timesteps = prepare_schedulers(pipe, family, scheduler, len(seeds), params, device)
    total = len(timesteps)

    # 3. Initial noise, drawn on the CPU per row so it is the same on every GPU
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    denoiser = pipe.transformer if family == "sd3" else pipe.unet
    begin_run(denoiser)  # DeepCache (opt-in) starts each run with a full step; a no-op otherwise
    shape = (
        denoiser.config.in_channels,
        params.height // pipe.vae_scale_factor,
        params.width // pipe.vae_scale_factor,
    )
    noise = torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators])
    # SD/SDXL samplers start at sigma_max; flow-matching schedulers start from unit noise.
    latents = (noise * getattr(schedulers[0], "init_noise_sigma", 1.0)).to(device=device, dtype=dtype)

    # 4. Denoising loop
    alive = list(range(len(items)))  # items still running
    for index, t in enumerate(timesteps):
        step = index + 1
        model_input = scale_model_input(schedulers, latents, t)
        noise_uncond, noise_cond = predict_noise(pipe, family, model_input, t, cond, use_cfg)
        noise_pred = apply_guidance(noise_uncond, noise_cond, scales)
        latents = torch.cat(
            [
                s.step(
                    noise_pred[r : r + 1],
                    t,
                    latents[r : r + 1],
                    return_dict=False,
                    **step_kwargs(s, generators[r]),
                )[0]
                for r, s in enumerate(schedulers)
            ]
        )
        rows_this_step = len(schedulers)
        # Per-request callbacks; a request whose callback raises leaves the batch now.
        dropped = set()
        for i in alive:
            item = items[i]
            try:
                if item.on_step is not None:
                    item.on_step(step, total)
                every = item.params.preview_every or 0
                if item.on_preview is not None and every and step % every == 0 and step < total:
                    rows = (row_item == i).nonzero().flatten()
                    item.on_preview(
                        step, total, preview_images(latents.index_select(0, rows.to(device)), rgb_map)
                    )
            except BaseException as error:  # noqa: BLE001 - handed back to the caller per item
                outcomes[i].error = error
                dropped.add(i)
        if dropped:
            alive = [i for i in alive if i not in dropped]
            keep = torch.tensor(
                [r for r, i in enumerate(row_item.tolist()) if i not in dropped], dtype=torch.long
            )
            if len(keep) == 0:
                if on_batch_step is not None:
                    on_batch_step(step, total, rows_this_step)
                return outcomes
            latents = latents.index_select(0, keep.to(device))
            cond = cond.select(keep.to(device))
            scales = scales.index_select(0, keep)
            schedulers = [schedulers[r] for r in keep.tolist()]
            generators = [generators[r] for r in keep.tolist()]
            row_item = row_item.index_select(0, keep)
            use_cfg = bool((scales > 1).any())
        if on_batch_step is not None:
            on_batch_step(step, total, rows_this_step)

    # 5. Decode what survived, and hand each request its images
    images = decode_latents(pipe, family, latents)
    for row, image in zip(row_item.tolist(), images, strict=True):
        outcomes[row].images.append(image)
    return outcomes

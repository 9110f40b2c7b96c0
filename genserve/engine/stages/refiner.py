"""SDXL base + refiner: the base runs the schedule down to a request's switch point and hands its
latents, undecoded, to the refiner, which runs the rest of the same schedule.

diffusers' semantics (StableDiffusionXLPipeline's denoising_end, StableDiffusionXLImg2ImgPipeline's
denoising_start): switch_at is a fraction of the *training* timesteps. The base keeps the timesteps
t >= round(1000 - switch_at × 1000), the refiner takes the ones below. With Karras sigmas that is
not switch_at of the steps (diffusers#14382). Each row leaves the base at its request's switch
index and joins the refiner there (an img2img row that starts later joins at its own start), so
requests with different switch_at share both batches.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from genserve.engine.loop.row import Row


def switch_index(timesteps: torch.Tensor, switch_at: float, num_train_timesteps: int) -> int:
    """How many of `timesteps` (descending) the base runs: those at or above the cutoff."""
    cutoff = int(round(num_train_timesteps - switch_at * num_train_timesteps))
    return int((timesteps >= cutoff).sum())


def refiner_rows(rows: list[Row], scheduler: Any, *, device: str, dtype: torch.dtype) -> list[Row]:
    """The refiner's rows: each base row's latents as they are, joining where the row left the base.

    `scheduler` is the refiner's, with the same timesteps set. A 4-channel inpainting row keeps
    its blend (it works in latent space, which base and refiner share).
    """
    out = []
    for row in rows:
        join = row.start if row.end is None else max(row.start, row.end)
        row_scheduler = copy.deepcopy(scheduler)
        if hasattr(row_scheduler, "set_begin_index"):
            row_scheduler.set_begin_index(join)
        out.append(
            Row(
                item=row.item,
                seed=row.seed,
                scheduler=row_scheduler,
                generator=row.generator,  # ancestral samplers go on drawing from the row's own seed
                start=join,
                latents=row.latents.to(device=device, dtype=dtype),
                blend=row.blend,
            )
        )
    return out

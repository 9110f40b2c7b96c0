"""One model call for all rows, and classifier-free guidance per row."""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline

from genserve.engine.conditioning.control import ExtrasFn
from genserve.engine.conditioning.ip_adapter import set_row_scales
from genserve.engine.conditioning.text import Conditioning
from genserve.engine.models.registry import Family


def apply_guidance(
    noise_uncond: torch.Tensor, noise_cond: torch.Tensor, scales: torch.Tensor
) -> torch.Tensor:
    """Classifier-free guidance per row (Ho & Salimans 2022, eq. 6): ε̃ = ε_u + s·(ε_c − ε_u).

    Rows with s ≤ 1 use ε_c unchanged, as diffusers does when guidance is off for a request.
    """
    scales = scales.to(device=noise_cond.device, dtype=noise_cond.dtype).view(
        -1, *([1] * (noise_cond.ndim - 1))
    )
    guided = noise_uncond + scales * (noise_cond - noise_uncond)
    return torch.where(scales > 1, guided, noise_cond)


def predict_noise(
    pipe: DiffusionPipeline,
    family: Family,
    latents: torch.Tensor,
    t: torch.Tensor,
    cond: Conditioning,
    cfg: bool,
    extras: ExtrasFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One model call for all rows (doubled for CFG). Returns (ε_uncond, ε_cond); ε_uncond = ε_cond without CFG.

    `extras` gives what the rows add to the model call (control residuals, IP-Adapter embeddings)."""
    model_input = torch.cat([latents, latents]) if cfg else latents
    embeds = torch.cat([cond.uncond, cond.cond]) if cfg else cond.cond
    if family == "sd3":
        pooled = torch.cat([cond.uncond_pooled, cond.pooled]) if cfg else cond.pooled
        control = (
            {} if extras is None else extras(model_input, t, embeds, {"pooled_projections": pooled}).kwargs
        )
        output = pipe.transformer(
            hidden_states=model_input,
            timestep=t.expand(model_input.shape[0]),
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
            **control,
        )[0]
    else:
        added = None
        if family == "sdxl":
            pooled = torch.cat([cond.uncond_pooled, cond.pooled]) if cfg else cond.pooled
            uncond_ids = cond.time_ids if cond.uncond_time_ids is None else cond.uncond_time_ids
            time_ids = torch.cat([uncond_ids, cond.time_ids]) if cfg else cond.time_ids
            added = {"text_embeds": pooled, "time_ids": time_ids}
        kwargs = {}
        if extras is not None:
            step = extras(model_input, t, embeds, added)
            kwargs = step.kwargs
            added = {**(added or {}), **step.added} or None
            if step.ip_scales is not None:
                set_row_scales(pipe.unet, step.ip_scales)
        if cond.mask is not None:  # rows padded to a longer prompt: the padding is hidden from them
            kwargs = {
                **kwargs,
                "encoder_attention_mask": torch.cat([cond.mask, cond.mask]) if cfg else cond.mask,
            }
        output = pipe.unet(
            model_input, t, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False, **kwargs
        )[0]
    if cfg:
        uncond, conditioned = output.chunk(2)
        return uncond, conditioned
    return output, output

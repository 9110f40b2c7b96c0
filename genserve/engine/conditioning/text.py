"""Text conditioning: each request's prompts encoded as it would be alone, repeated per image (row)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline

from genserve.engine.models.registry import Family
from genserve.schemas.generation import GenerationParams


@dataclass
class Conditioning:
    """Per-row text conditioning; every tensor's first dimension is the row."""

    cond: torch.Tensor
    uncond: torch.Tensor
    pooled: torch.Tensor | None = None  # SDXL text_embeds / SD3 pooled_projections
    uncond_pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None  # SDXL micro-conditioning
    # An SDXL refiner's unconditional time ids carry another aesthetic score; None: the same as time_ids
    uncond_time_ids: torch.Tensor | None = None

    def select(self, keep: torch.Tensor) -> Conditioning:
        pick = lambda tensor: None if tensor is None else tensor.index_select(0, keep)  # noqa: E731
        return Conditioning(*(pick(getattr(self, name)) for name in self.__dataclass_fields__))


def encode_conditioning(
    pipe: DiffusionPipeline, family: Family, params: list[GenerationParams], device: str
) -> Conditioning:
    """Phase 1: each request encoded on its own (as it would be alone), repeated per image."""
    parts = []
    for p in params:
        negative = p.negative_prompt or None
        common = {
            "device": device,
            "num_images_per_prompt": p.num_images,
            "do_classifier_free_guidance": True,
        }
        if family == "sd15":
            cond, uncond = pipe.encode_prompt(p.prompt, negative_prompt=negative, **common)
            parts.append((cond, uncond, None, None))
        elif family == "sdxl":
            cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
                p.prompt, negative_prompt=negative, **common
            )
            parts.append((cond, uncond, pooled, uncond_pooled))
        else:
            cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
                p.prompt, None, None, negative_prompt=negative, **common
            )
            parts.append((cond, uncond, pooled, uncond_pooled))
    columns = list(zip(*parts, strict=True))
    cat = lambda tensors: None if tensors[0] is None else torch.cat(tensors)  # noqa: E731
    conditioning = Conditioning(cat(columns[0]), cat(columns[1]), cat(columns[2]), cat(columns[3]))
    rows = len(conditioning.cond)
    if family == "sdxl" and is_refiner(pipe):
        cond_ids, uncond_ids = refiner_time_ids(pipe, params[0], conditioning.cond.dtype, conditioning.pooled)
        conditioning.time_ids = cond_ids.to(device).repeat(rows, 1)
        conditioning.uncond_time_ids = uncond_ids.to(device).repeat(rows, 1)
    elif family == "sdxl":
        conditioning.time_ids = sdxl_time_ids(pipe, params[0], conditioning.cond.dtype, conditioning.pooled)
        conditioning.time_ids = conditioning.time_ids.to(device).repeat(rows, 1)
    return conditioning


def sdxl_time_ids(
    pipe: DiffusionPipeline, params: GenerationParams, dtype: torch.dtype, pooled: torch.Tensor
) -> torch.Tensor:
    """SDXL's size micro-conditioning: original = target = requested size, no crop."""
    size = (params.height, params.width)
    projection_dim = (
        int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
    )
    return pipe._get_add_time_ids(size, (0, 0), size, dtype=dtype, text_encoder_projection_dim=projection_dim)


# The aesthetic scores diffusers' SDXL img2img pipeline conditions a refiner on by default.
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5


def is_refiner(pipe: DiffusionPipeline) -> bool:
    """An SDXL refiner pipeline: its time ids carry an aesthetic score instead of the target size."""
    return bool(pipe.config.get("requires_aesthetics_score", False))


def refiner_time_ids(
    pipe: DiffusionPipeline, params: GenerationParams, dtype: torch.dtype, pooled: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(conditional, unconditional) refiner time ids: original size and crop, then the aesthetic
    score, 6.0 for the prompt and 2.5 for the negative (they differ, unlike the base's)."""
    size = (params.height, params.width)
    return pipe._get_add_time_ids(
        size,
        (0, 0),
        size,
        AESTHETIC_SCORE,
        NEGATIVE_AESTHETIC_SCORE,
        size,
        (0, 0),
        size,
        dtype=dtype,
        text_encoder_projection_dim=int(pooled.shape[-1]),
    )

"""The two paths `genserve bench` compares, on the same inputs: plain diffusers and genserve's engine."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from diffusers import DiffusionPipeline

import genserve.engine.batch as batch_module
from genserve.engine.batch import denoise_batch
from genserve.engine.loop.denoise import BatchItem
from genserve.engine.loop.previews import LatentRgbMap
from genserve.engine.models.registry import Family
from genserve.engine.models.samplers import build_scheduler
from genserve.engine.speed.deepcache import begin_run
from genserve.schemas.generation import GenerationParams

ACCURACY_LIMIT = 2e-2  # relative L2 of the final latents, optimized against eager, in fp16/bf16


def clone_pipeline(pipe: DiffusionPipeline, family: Family) -> DiffusionPipeline:
    """The same pipeline with its own denoiser and VAE (deep copies); text encoders are shared."""
    components = dict(pipe.components)
    denoiser = "transformer" if family == "sd3" else "unet"
    components[denoiser] = copy.deepcopy(components[denoiser])
    components["vae"] = copy.deepcopy(components["vae"])
    extra = {"requires_safety_checker": False} if family == "sd15" else {}
    clone = type(pipe)(**{k: v for k, v in components.items() if k != "requires_safety_checker"}, **extra)
    clone.set_progress_bar_config(disable=True)
    return clone


def initial_noise(pipe: DiffusionPipeline, family: Family, params: GenerationParams) -> torch.Tensor:
    """The engine's initial noise (stages/rows.py): per image from a CPU generator seeded seed + i."""
    denoiser = pipe.transformer if family == "sd3" else pipe.unet
    shape = (
        denoiser.config.in_channels,
        params.height // pipe.vae_scale_factor,
        params.width // pipe.vae_scale_factor,
    )
    generators = [torch.Generator("cpu").manual_seed(params.seed + i) for i in range(params.num_images)]
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators])


def run_diffusers(
    pipe: DiffusionPipeline,
    family: Family,
    params: GenerationParams,
    noise: torch.Tensor,
    device: str,
    dtype: torch.dtype,
    *,
    output_type: str = "pil",
) -> Any:
    """Plain diffusers: `pipe(...)`, given the engine's initial noise (it applies init_noise_sigma itself)."""
    output = pipe(
        prompt=params.prompt,
        negative_prompt=params.negative_prompt or None,
        num_images_per_prompt=params.num_images,
        num_inference_steps=params.steps,
        guidance_scale=params.cfg_scale,
        width=params.width,
        height=params.height,
        latents=noise.to(device=device, dtype=dtype),
        output_type=output_type,
    )
    return output.images


def run_engine(
    pipe: DiffusionPipeline,
    family: Family,
    params: GenerationParams,
    device: str,
    dtype: torch.dtype,
    rgb_map: LatentRgbMap,
) -> list[Any]:
    """genserve's engine path, as Engine.generate_batch runs it."""
    scheduler = build_scheduler(family, params.sampler, pipe.scheduler.config)
    begin_run(pipe.transformer if family == "sd3" else pipe.unet)  # DeepCache, when it is on
    with torch.inference_mode():
        [outcome] = denoise_batch(
            pipe, family, scheduler, [BatchItem(params)], device=device, dtype=dtype, rgb_map=rgb_map
        )
    if outcome.error is not None:
        raise outcome.error
    return outcome.images


@contextlib.contextmanager
def capture_final_latents() -> Iterator[list[torch.Tensor]]:
    """Record the latents denoise_batch hands to its VAE decode (benchmark instrumentation)."""
    captured: list[torch.Tensor] = []
    original = batch_module.decode_latents

    def decode(pipe: DiffusionPipeline, family: Family, latents: torch.Tensor) -> Any:
        captured.append(latents.float().cpu())
        return original(pipe, family, latents)

    batch_module.decode_latents = decode
    try:
        yield captured
    finally:
        batch_module.decode_latents = original


def engine_latents(
    pipe: DiffusionPipeline,
    family: Family,
    params: GenerationParams,
    device: str,
    dtype: torch.dtype,
    rgb_map: LatentRgbMap,
) -> torch.Tensor:
    """The final latents (float32, CPU) of the engine path on `pipe`."""
    with capture_final_latents() as captured:
        run_engine(pipe, family, params, device, dtype, rgb_map)
    return captured[-1]


def relative_l2(value: torch.Tensor, reference: torch.Tensor) -> float:
    """||value - reference|| / ||reference||; inf when either is not finite."""
    value, reference = value.double(), reference.double()
    if not (torch.isfinite(value).all() and torch.isfinite(reference).all()):
        return float("inf")
    return float((value - reference).norm() / reference.norm().clamp_min(1e-30))

"""Between pixels and latents: the VAE, with each family's latent normalisation."""

from __future__ import annotations

import PIL.Image
import torch
from diffusers import DiffusionPipeline

from genserve.engine.models.registry import Family


def decode_latents(pipe: DiffusionPipeline, family: Family, latents: torch.Tensor) -> list[PIL.Image.Image]:
    """Phase 5: latents → PIL images, with the family's latent normalisation."""
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:  # the stock SDXL VAE overflows in fp16, as diffusers' pipeline also handles
        vae.to(dtype=torch.float32)
    try:
        latents = latents.to(
            next(vae.post_quant_conv.parameters()).dtype if vae.post_quant_conv else vae.dtype
        )
        config = vae.config
        if family == "sd3":
            latents = latents / config.scaling_factor + config.shift_factor
        elif (
            getattr(config, "latents_mean", None) is not None
            and getattr(config, "latents_std", None) is not None
        ):
            channels = latents.shape[1]
            mean = torch.tensor(config.latents_mean).view(1, channels, 1, 1).to(latents)
            std = torch.tensor(config.latents_std).view(1, channels, 1, 1).to(latents)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        decoded = vae.decode(latents, return_dict=False)[0]
    finally:
        if upcast:
            vae.to(dtype=torch.float16)
    return pipe.image_processor.postprocess(decoded, output_type="pil")

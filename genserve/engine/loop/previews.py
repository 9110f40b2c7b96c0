"""Cheap live previews: a linear map from latent channels to RGB, fitted from the model's own VAE.

Decoding with the VAE every few steps would cost as much as a denoising step. Instead, once per
loaded model, we encode a few calibration images (flat colours and smooth gradients) with the VAE and
solve a least-squares problem  rgb ≈ W · z + b  per latent pixel. Applying it is a 1×1 "convolution":
microseconds. This works for any family and any VAE (including trained toy models), with no
hand-copied constants.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import PIL.Image
import torch


@dataclass(frozen=True)
class LatentRgbMap:
    weight: torch.Tensor  # (3, C), float32, CPU
    bias: torch.Tensor  # (3,), float32, CPU


def calibration_images(size: int, generator: torch.Generator) -> torch.Tensor:
    """(N, 3, size, size) images in [-1, 1]: flat colours, gradients and blurred colour noise."""
    flats = torch.rand(12, 3, 1, 1, generator=generator).expand(-1, -1, size, size)
    ramp = torch.linspace(0, 1, size)
    start = torch.rand(6, 3, 1, 1, generator=generator)
    end = torch.rand(6, 3, 1, 1, generator=generator)
    horizontal = start + (end - start) * ramp.view(1, 1, 1, size)
    vertical = start + (end - start) * ramp.view(1, 1, size, 1)
    coarse = torch.rand(8, 3, 4, 4, generator=generator)
    blobs = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    images = torch.cat([flats, horizontal.expand(-1, -1, size, -1), vertical.expand(-1, -1, -1, size), blobs])
    return images * 2 - 1


def fit_latent_rgb_map(vae: torch.nn.Module, vae_scale_factor: int, latent_size: int = 8) -> LatentRgbMap:
    """Least-squares fit of RGB (in [-1, 1]) on the VAE's scaled latents, pixel by pixel."""
    parameter = next(vae.parameters())
    generator = torch.Generator("cpu").manual_seed(0)
    images = calibration_images(latent_size * vae_scale_factor, generator)
    with torch.inference_mode():
        latents = vae.encode(images.to(parameter.device, parameter.dtype)).latent_dist.mean.float().cpu()
        if not torch.isfinite(latents).all():
            # fp16 VAEs can overflow (SDXL's stock VAE does); fit on a float32 copy instead.
            vae32 = copy.deepcopy(vae).float()
            latents = vae32.encode(images.to(parameter.device)).latent_dist.mean.cpu()
            del vae32
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    latents = (latents - shift) * vae.config.scaling_factor  # the space the denoiser works in
    # Average each latent pixel's footprint in the image: the colour that latent stands for.
    targets = torch.nn.functional.avg_pool2d(images, vae_scale_factor)
    z = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    rgb = targets.permute(0, 2, 3, 1).reshape(-1, 3)
    design = torch.cat([z, torch.ones(len(z), 1)], dim=1)
    solution = torch.linalg.lstsq(design, rgb).solution  # (C + 1, 3)
    return LatentRgbMap(weight=solution[:-1].T.contiguous(), bias=solution[-1].contiguous())


def latents_to_rgb(latents: torch.Tensor, rgb_map: LatentRgbMap) -> torch.Tensor:
    """(B, C, H, W) latents → (B, H, W, 3) uint8 on the CPU."""
    z = latents.detach().float().cpu()
    rgb = torch.einsum("bchw,rc->bhwr", z, rgb_map.weight) + rgb_map.bias
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def preview_images(
    latents: torch.Tensor, rgb_map: LatentRgbMap, min_side: int = 128
) -> list[PIL.Image.Image]:
    """Preview pictures for a batch of latents, enlarged (bilinear) so tiny latents stay visible."""
    pictures = []
    for array in latents_to_rgb(latents, rgb_map).numpy():
        picture = PIL.Image.fromarray(array)
        scale = max(1, -(-min_side // max(picture.size)))
        if scale > 1:
            picture = picture.resize((picture.width * scale, picture.height * scale), PIL.Image.BILINEAR)
        pictures.append(picture)
    return pictures

"""Video previews: latents → small RGB frames without running the VAE.

The image engine's idea (`engine/loop/previews.py`) carries over: once per loaded model, encode
calibration pictures with the model's own VAE, bring the latents into the space the denoiser works
in (each family normalises differently), and fit  rgb ≈ W · z + b  per latent pixel. Video VAEs
encode a single picture as a one-frame clip, so the same calibration pictures work.

Latent layouts in `callback_on_step_end` differ per family, and `video_latent_frames` puts them all
in one (F, C, H, W) layout first:

- Wan and AnimateDiff: [B, C, F, H, W];
- SVD: [B, F, C, H, W];
- LTX: packed tokens [B, F·H·W (+ appended keyframe tokens), C], patch size 1.

A preview has one frame per *latent* frame (Wan and LTX compress time 4–8×), at the latent size.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from genserve.engine.loop.previews import LatentRgbMap, calibration_images, latents_to_rgb


def fit_video_rgb_map(pipe: Any, family: str, latent_size: int = 8) -> LatentRgbMap:
    """Least-squares latent→RGB map for a loaded video pipeline of `family`."""
    vae = pipe.vae
    factor = spatial_factor(pipe, family)
    parameter = next(vae.parameters())
    images = calibration_images(latent_size * factor, torch.Generator("cpu").manual_seed(0))
    pixels = images.to(parameter.device, parameter.dtype)
    with torch.inference_mode():
        if family in ("wan", "ltx"):
            z = vae.encode(pixels.unsqueeze(2)).latent_dist.mean[:, :, 0]  # a one-frame clip
        else:
            z = vae.encode(pixels).latent_dist.mean
    z = _to_denoiser_space(z.float().cpu(), vae, family)
    targets = torch.nn.functional.avg_pool2d(images, factor)
    flat_z = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    rgb = targets.permute(0, 2, 3, 1).reshape(-1, 3)
    design = torch.cat([flat_z, torch.ones(len(flat_z), 1)], dim=1)
    solution = torch.linalg.lstsq(design, rgb).solution
    return LatentRgbMap(weight=solution[:-1].T.contiguous(), bias=solution[-1].contiguous())


def spatial_factor(pipe: Any, family: str) -> int:
    if family == "wan":
        return int(pipe.vae_scale_factor_spatial)
    if family == "ltx":
        return int(pipe.vae_spatial_compression_ratio)
    return int(pipe.vae_scale_factor)


def temporal_factor(pipe: Any, family: str) -> int:
    if family == "wan":
        return int(pipe.vae_scale_factor_temporal)
    if family == "ltx":
        return int(pipe.vae_temporal_compression_ratio)
    return 1


def video_latent_frames(
    latents: torch.Tensor, family: str, *, num_frames: int, height: int, width: int, pipe: Any
) -> torch.Tensor:
    """The first clip's latents as (F, C, H, W), whatever the family's layout."""
    if family == "ltx":
        frames = (num_frames - 1) // temporal_factor(pipe, family) + 1
        h, w = height // spatial_factor(pipe, family), width // spatial_factor(pipe, family)
        tokens = latents[0, : frames * h * w]  # keyframe conditions may append tokens after the clip
        return tokens.reshape(frames, h, w, -1).permute(0, 3, 1, 2)
    if family == "svd":
        return latents[0]
    return latents[0].permute(1, 0, 2, 3)


def preview_frames(frames: torch.Tensor, rgb_map: LatentRgbMap) -> np.ndarray:
    """(F, C, H, W) latents → (F, H, W, 3) uint8."""
    return latents_to_rgb(frames, rgb_map).numpy()


def _to_denoiser_space(z: torch.Tensor, vae: Any, family: str) -> torch.Tensor:
    channels = z.shape[1]
    if family == "wan":
        mean = torch.tensor(vae.config.latents_mean).view(1, channels, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, channels, 1, 1)
        return (z - mean) / std
    if family == "ltx":
        mean = vae.latents_mean.float().cpu().view(1, channels, 1, 1)
        std = vae.latents_std.float().cpu().view(1, channels, 1, 1)
        return (z - mean) * vae.config.scaling_factor / std
    return z * vae.config.scaling_factor

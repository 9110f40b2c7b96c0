"""Between pixels and latents: the VAE, with each family's latent normalisation.

Encoding keeps the VAE's latent distribution (mean, std) rather than one sample: a row samples it
with its own generator, so img2img is reproducible per seed, and one cached encoding serves every
seed. `EncodingCache` keeps the last few encodings by (model, pixels).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline

from genserve.engine.models.registry import Family

# Above this many pixels the VAE encodes in overlapping tiles (diffusers' tiled encode): the
# untiled encoder's activations grow with the square of the side. The same default as the decode's.
TILE_ENCODE_ABOVE_PIXELS = 1536 * 1536


@dataclass(frozen=True)
class LatentDist:
    """The VAE encoder's diagonal Gaussian for one picture, in the VAE's own (unnormalised) space."""

    mean: torch.Tensor  # (1, C, h, w)
    std: torch.Tensor

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        """mean + std·ε with ε from the row's CPU generator (the draw diffusers makes in fp32 on CPU)."""
        eps = torch.randn(self.mean.shape, generator=generator, dtype=torch.float32)
        return self.mean + self.std * eps.to(self.mean)

    def mode(self) -> torch.Tensor:
        return self.mean


def to_model_space(vae_config: object, family: Family, z: torch.Tensor) -> torch.Tensor:
    """VAE latents → the denoiser's latents (the inverse of what `decode_latents` undoes)."""
    config = vae_config
    if family == "sd3":
        return (z - config.shift_factor) * config.scaling_factor
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        channels = z.shape[1]
        mean = torch.tensor(config.latents_mean).view(1, channels, 1, 1).to(z)
        std = torch.tensor(config.latents_std).view(1, channels, 1, 1).to(z)
        return (z - mean) * config.scaling_factor / std
    return z * config.scaling_factor


def pixels_to_tensor(image: np.ndarray, device: str, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (H, W, 3) → (1, 3, H, W) in [-1, 1], as diffusers' image processor normalises."""
    tensor = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 127.5 - 1
    return tensor.to(device=device, dtype=dtype)


def encode_pixels(
    pipe: DiffusionPipeline, pixels: torch.Tensor, *, tile_above: int = TILE_ENCODE_ABOVE_PIXELS
) -> LatentDist:
    """(1, 3, H, W) in [-1, 1] → the VAE's latent distribution; tiled above `tile_above` pixels."""
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    with _vae_mode(vae, upcast, tiled=pixels.shape[-1] * pixels.shape[-2] > tile_above):
        dist = vae.encode(pixels.to(vae.dtype), return_dict=False)[0]
    return LatentDist(dist.mean.float(), dist.std.float())


@contextmanager
def _vae_mode(vae: torch.nn.Module, upcast: bool, tiled: bool) -> Iterator[None]:
    if upcast:  # the stock SDXL VAE overflows in fp16, encoding as well as decoding
        vae.to(dtype=torch.float32)
    was_tiled = vae.use_tiling
    vae.use_tiling = tiled
    try:
        yield
    finally:
        vae.use_tiling = was_tiled
        if upcast:
            vae.to(dtype=torch.float16)


def pixel_digest(image: np.ndarray) -> str:
    """What an encoding is cached by: the exact pixels handed to the VAE (after resizing and fills)."""
    return hashlib.sha256(repr(image.shape).encode() + np.ascontiguousarray(image).tobytes()).hexdigest()


class EncodingCache:
    """A small LRU of VAE encodings, by (model name, pixel digest, tiled)."""

    def __init__(self, capacity: int = 32) -> None:
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[str, str, bool], LatentDist] = OrderedDict()

    def encode(
        self,
        model: str,
        pipe: DiffusionPipeline,
        image: np.ndarray,
        *,
        device: str,
        tile_above: int = TILE_ENCODE_ABOVE_PIXELS,
    ) -> LatentDist:
        tiled = image.shape[0] * image.shape[1] > tile_above
        key = (model, pixel_digest(image), tiled)
        if key in self._entries:
            self.hits += 1
            self._entries.move_to_end(key)
            return self._entries[key]
        self.misses += 1
        pixels = pixels_to_tensor(image, device, pipe.vae.dtype)
        dist = encode_pixels(pipe, pixels, tile_above=tile_above)
        self._entries[key] = dist
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return dist

    def forget(self, model: str) -> None:
        """Drop a model's encodings (it was unloaded or replaced)."""
        for key in [key for key in self._entries if key[0] == model]:
            del self._entries[key]


def decode_latents(pipe: DiffusionPipeline, family: Family, latents: torch.Tensor) -> list[PIL.Image.Image]:
    """Latents → PIL images, with the family's latent normalisation."""
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

"""Upscalers for the hires fix: in latent space (interpolation) or in pixels (resampling).

A target with another aspect ratio than the source is covered and centre-cropped, as
AUTOMATIC1111 crops ("truncates") a hires latent whose hr_resize_x/y do not match the first pass.

Model upscalers (ESRGAN and the like, through spandrel) plug in as entries of `PIXEL_UPSCALERS`
taking (picture, width, height): run the model, then resample to the exact size. None is built yet;
HiresOptions.upscaler only accepts the names below.
"""

from __future__ import annotations

from collections.abc import Callable

import PIL.Image
import torch
import torch.nn.functional as F

from genserve.engine.stages.plan import LATENT_UPSCALERS

PixelUpscaler = Callable[[PIL.Image.Image, int, int], PIL.Image.Image]


def cover(src: tuple[int, int], dst: tuple[int, int]) -> tuple[int, int]:
    """The smallest (w, h) of src's aspect ratio that covers dst (whole units, at least dst)."""
    (sw, sh), (dw, dh) = src, dst
    scale = max(dw / sw, dh / sh)
    return max(dw, round(sw * scale)), max(dh, round(sh * scale))


def centre_box(size: tuple[int, int], crop: tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a `crop`-sized box in the middle of `size`."""
    (w, h), (cw, ch) = size, crop
    left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch


def upscale_latents(latents: torch.Tensor, width: int, height: int, upscaler: str) -> torch.Tensor:
    """(B, C, h, w) latents resized to (height, width) latent units, in float32."""
    mode, antialias = LATENT_UPSCALERS[upscaler]
    src = (latents.shape[-1], latents.shape[-2])
    cw, ch = cover(src, (width, height))
    scaled = F.interpolate(latents.float(), size=(ch, cw), mode=mode, antialias=antialias)
    left, top, right, bottom = centre_box((cw, ch), (width, height))
    return scaled[..., top:bottom, left:right]


def _resampler(method: PIL.Image.Resampling) -> PixelUpscaler:
    def upscale(picture: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
        size = cover(picture.size, (width, height))
        return picture.resize(size, method).crop(centre_box(size, (width, height)))

    return upscale


PIXEL_UPSCALERS: dict[str, PixelUpscaler] = {
    "lanczos": _resampler(PIL.Image.Resampling.LANCZOS),
    "nearest": _resampler(PIL.Image.Resampling.NEAREST),
}


def upscale_picture(picture: PIL.Image.Image, width: int, height: int, upscaler: str) -> PIL.Image.Image:
    if upscaler not in PIXEL_UPSCALERS:
        raise ValueError(f"unknown pixel upscaler {upscaler!r}; known: {', '.join(sorted(PIXEL_UPSCALERS))}")
    return PIXEL_UPSCALERS[upscaler](picture, width, height)

"""Masks: reading one, blurring its edge, filling what it covers, and pasting a result back.

A mask is a float array (H, W) in [0, 1]; 1 means repaint. Pictures are uint8 arrays (H, W, 3).
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import PIL.ImageFilter
import torch
import torch.nn.functional as F


def read_mask(mask: PIL.Image.Image) -> np.ndarray:
    """White, or opaque where the mask has transparency, means repaint (AUTOMATIC1111's convention;
    the API turns OpenAI's transparent-means-edit masks into this). Binarised at half."""
    if mask.mode in ("RGBA", "LA") or (mask.mode == "P" and "transparency" in mask.info):
        alpha = np.asarray(mask.convert("RGBA"))[..., 3]
        if alpha.min() < 255:  # a real alpha channel decides; an all-opaque one falls back to grey
            return (alpha > 128).astype(np.float32)
    return (np.asarray(mask.convert("L")) > 128).astype(np.float32)


def blur_mask(mask: np.ndarray, radius: int) -> np.ndarray:
    """Gaussian blur of the mask's edge (`radius` ≈ σ in pixels). Far from the edge it stays exactly 0
    or 1, so the pixels there stay exactly the original's after the paste-back."""
    if radius <= 0:
        return mask
    image = PIL.Image.fromarray(np.round(mask * 255).astype(np.uint8), mode="L")
    return np.asarray(image.filter(PIL.ImageFilter.GaussianBlur(radius)), dtype=np.float32) / 255.0


def fill_masked(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """AUTOMATIC1111's "fill": repaint the masked area with the colours around it before encoding.

    Normalised averaging over a pyramid, coarse to fine: each masked pixel takes the mean colour of
    the unmasked pixels in a window around it, the smallest window that holds any.
    """
    keep = torch.from_numpy((mask < 0.5).astype(np.float32))[None, None]
    pixels = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]
    h, w = mask.shape
    filled = pixels.clone()
    factor = 2 ** int(np.ceil(np.log2(max(h, w))))
    while factor >= 1:
        size = (max(1, h // factor), max(1, w // factor))
        weight = F.interpolate(F.interpolate(keep, size=size, mode="area"), size=(h, w), mode="bilinear")
        colour = F.interpolate(
            F.interpolate(pixels * keep, size=size, mode="area"), size=(h, w), mode="bilinear"
        )
        found = weight > 1e-3
        filled = torch.where(found, colour / weight.clamp_min(1e-3), filled)
        factor //= 2
    out = torch.where(keep > 0, pixels, filled)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def composite(original: np.ndarray, generated: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """generated·m + original·(1 − m), rounded: where m = 0 the original's pixels come back exactly."""
    m = mask[..., None].astype(np.float32)
    out = generated.astype(np.float32) * m + original.astype(np.float32) * (1 - m)
    return np.where(m > 0, np.clip(np.round(out), 0, 255), original).astype(np.uint8)


def latent_mask(mask: np.ndarray, height: int, width: int) -> torch.Tensor:
    """The mask at latent size, (1, 1, h, w), binarised at half after area averaging (as AUTOMATIC1111
    rounds it): a latent is repainted when most of its pixels are."""
    tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
    return (F.interpolate(tensor, size=(height, width), mode="area") >= 0.5).float()

"""The VAE decode `apply_optimizations` installs: tiling and slicing by size, fp32 redo of overflowed rows."""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers.models.autoencoders.vae import DecoderOutput

from genserve.engine.speed.gated import sdpa_context

log = logging.getLogger(__name__)


class GuardedDecode:
    """Replaces `vae.decode`: tiling and slicing chosen per call by size; overflowed rows redone in fp32.

    Half precision can overflow in the VAE (the stock SDXL VAE does, which is why its config says
    force_upcast and diffusers decodes it in fp32, 2-3x slower). Overflow shows as inf/NaN in the
    decoded images, so each decoded row is checked with torch.isfinite (one device sync per batch) and
    only the rows that overflowed are decoded again in fp32.
    """

    def __init__(
        self,
        vae: torch.nn.Module,
        *,
        scale_factor: int,
        tiling: str = "auto",
        tile_above_pixels: int = 1536 * 1536,
        slicing: str = "auto",
        slice_above_pixels: int = 4 * 1024 * 1024,
        check_finite: bool,
        sdpa: list[Any] | None = None,
    ) -> None:
        self.vae = vae
        self.original = vae.decode
        self.scale_factor = scale_factor
        self.tiling = tiling  # auto | on | off
        self.tile_above = tile_above_pixels
        self.slicing = slicing  # auto | on | off
        self.slice_above = slice_above_pixels
        self.check_finite = check_finite
        self.sdpa = sdpa
        self.fp32_redos = 0  # rows decoded again in fp32

    def __call__(self, z: torch.Tensor, return_dict: bool = True, generator: Any = None) -> Any:
        pixels = z.shape[-1] * z.shape[-2] * self.scale_factor**2
        self.vae.use_tiling = _decide(self.tiling, pixels > self.tile_above)
        self.vae.use_slicing = _decide(self.slicing, z.shape[0] * pixels > self.slice_above)
        with sdpa_context(self.sdpa):
            decoded = self.original(z, return_dict=False)[0]
            if self.check_finite:
                decoded = self._redo_overflowed(z, decoded)
        return DecoderOutput(sample=decoded) if return_dict else (decoded,)

    def _redo_overflowed(self, z: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
        bad = ~torch.isfinite(decoded.flatten(1)).all(dim=1)
        if not bool(bad.any()):
            return decoded
        rows = bad.nonzero().flatten()
        self.fp32_redos += len(rows)
        log.warning(
            "VAE decode overflowed in %s for %d row(s); decoding them in fp32", decoded.dtype, len(rows)
        )
        dtype = next(self.vae.parameters()).dtype
        self.vae.to(torch.float32)
        try:
            redo = self.original(z.index_select(0, rows).float(), return_dict=False)[0]
        finally:
            self.vae.to(dtype)
        return decoded.index_copy(0, rows, redo.to(decoded.dtype))


def _decide(mode: str, auto: bool) -> bool:
    return auto if mode == "auto" else mode == "on"

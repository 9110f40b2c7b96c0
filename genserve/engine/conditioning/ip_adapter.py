"""IP-Adapter scale per row, so requests with different scales share a batch.

diffusers' IP-Adapter attention processor (`IPAdapterAttnProcessor2_0`) adds
`scale * softmax(Q K_ip^T) V_ip` to each cross-attention output, with one float `scale` per loaded
adapter for the whole batch. `RowScales` stands in for that float: `scale * x` multiplies row r of x
by its own scale (a (rows, 1, 1) tensor, the CFG halves included), and `scale == 0` (the processor's
test for skipping the image attention) holds only when every row's scale is 0. Row r then gets
exactly what a batch of its own at its scale gets: the processor's arithmetic is row-wise.

InstantStyle (style_only) keeps its block pattern: processors that the pattern turns off keep 0,
the others get the shared `RowScales`.

Why per row, not (adapter, scale) in the batch key: `benchmarks/ip_adapter_scale.py` (genserve-shapes'
UNet, 8 images, 10 CFG steps, CPU, 2026-12-04) ran per row at 1.04x the keyed time for one scale (the
same work, within noise), 0.93x for two and 0.78x for four distinct scales, with outputs within 1.3e-6.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch


class RowScales:
    """Per-row IP-Adapter scales, read by every IP-Adapter processor of one UNet at each call."""

    __hash__ = None  # type: ignore[assignment]  # compared to 0 by value, never hashed

    def __init__(self) -> None:
        self.values: torch.Tensor | None = None  # (rows of the model input, 1, 1)

    def set(self, scales: torch.Tensor) -> None:
        self.values = scales.view(-1, 1, 1)

    def __eq__(self, other: object) -> bool:
        if self.values is None:
            return other == 0
        return bool((self.values == other).all())

    def __mul__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.values is None:
            raise RuntimeError("IP-Adapter row scales were not set for this UNet call")
        return self.values.to(device=hidden.device, dtype=hidden.dtype) * hidden

    __rmul__ = __mul__


# The RowScales installed in a UNet's processors (looked up at every step without walking the UNet).
_installed: weakref.WeakKeyDictionary[Any, RowScales] = weakref.WeakKeyDictionary()


def install_row_scales(unet: Any) -> RowScales:
    """Replace the scale of every IP-Adapter processor that is on (nonzero after
    `set_ip_adapter_scale`) by one shared `RowScales`; returns it."""
    shared = RowScales()
    for processor in unet.attn_processors.values():
        scales = getattr(processor, "scale", None)
        if isinstance(scales, list) and hasattr(processor, "to_k_ip"):
            processor.scale = [shared if _on(s) else s for s in scales]
    _installed[unet] = shared
    return shared


def forget_row_scales(unet: Any) -> None:
    """After `unload_ip_adapter` (which restores the plain processors)."""
    _installed.pop(unet, None)


def set_row_scales(unet: Any, scales: torch.Tensor) -> None:
    """Each row's scale (the model input's rows, CFG halves included) for the next UNet call."""
    shared = _installed.get(unet)
    if shared is None:
        raise RuntimeError("rows carry IP-Adapter scales but no IP-Adapter is loaded in this UNet")
    shared.set(scales)


def _on(scale: Any) -> bool:
    return any(s != 0 for s in scale) if isinstance(scale, list) else scale != 0

"""ControlNet and T2I-Adapter residuals per row, added into one UNet call for the whole batch.

A ControlNet (Zhang, Rao and Agrawala 2023) and a T2I-Adapter (Mou et al. 2023) only add tensors to
the UNet's features. So every row may carry its own controls (`RowControl`), and at each step:

1. each control model runs once, on the rows whose window contains this step (`index_select`);
2. its residuals are multiplied per row by the unit's scale and, for A1111's "prompt" and "control"
   modes, by the soft-injection weights 0.825**(n-1-k) over the n residuals (lllyasviel's ControlNet
   `control_scales`, sd-webui-controlnet `soft_injection`; k = 0 is the shallowest, the mid block's
   is 1);
3. they are `index_add_`-ed into full-batch residual tensors, zeros for rows without control (adding
   zero leaves a row's features exactly as they are).

With CFG the model input is [uncond rows; cond rows]. A unit runs on both halves (diffusers), except
in "control" mode (ControlNet is more important: `cfg_injection`), where the unconditional half gets
no control. The window follows diffusers' `controlnet_keep`: a unit acts at the row's own step i of
N iff not (i/N < start or (i+1)/N > end). A T2I-Adapter's features do not depend on t: they are
computed once per request (`adapter_features`) and added as `down_intrablock_additional_residuals`
under the same window and scale.

An SD3 ControlNet (`SD3ControlNetModel`, kind "sd3_controlnet") follows diffusers'
StableDiffusion3ControlNetPipeline: its map is VAE-encoded (`sd3_control_latents`), it sees the
pooled projections (zeros for `force_zeros_for_pooled_projection` models) and gives one residual per
control block, passed to the transformer as `block_controlnet_hidden_states`; transformer block i
adds residual int(i / (blocks / k)). Units with different block counts k in one step are first
spread over the transformer's blocks by that rule, so they can be summed. Scale, window and modes
work as for a UNet ControlNet (the soft-injection weights run over the control blocks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch

SOFT_INJECTION_BASE = 0.825


@dataclass
class RowControl:
    """One unit of one row: a loaded model, its map and how it applies."""

    model: Any  # ControlNetModel, SD3ControlNetModel or T2IAdapter
    kind: str  # "controlnet", "sd3_controlnet" or "t2i_adapter"
    image: torch.Tensor  # (1, 3, H, W) in [0, 1]; an SD3 ControlNet's: its latents (1, C, h, w)
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str = "balanced"
    features: list[torch.Tensor] | None = None  # a T2I-Adapter's, computed once


@dataclass
class StepExtras:
    """What a step adds to the UNet call: residual kwargs, and extra added_cond_kwargs."""

    kwargs: dict[str, Any] = field(default_factory=dict)
    added: dict[str, Any] = field(default_factory=dict)
    ip_scales: torch.Tensor | None = None  # each model-input row's IP-Adapter scale (ip_adapter.py)


def in_window(step: int, steps: int, start: float, end: float) -> bool:
    """diffusers' controlnet_keep: the unit acts at step i of N unless i/N < start or (i+1)/N > end."""
    return not (step / steps < start or (step + 1) / steps > end)


def soft_weights(count: int, mode: str) -> list[float]:
    """Per-residual weights: 1 for "balanced", 0.825**(count-1-k) for "prompt" and "control"."""
    if mode == "balanced":
        return [1.0] * count
    return [SOFT_INJECTION_BASE ** float(count - 1 - k) for k in range(count)]


def control_map_tensor(image: np.ndarray | PIL.Image.Image, width: int, height: int) -> torch.Tensor:
    """A control map as diffusers' control image processor gives it: RGB at the output size
    (Lanczos), float in [0, 1] (no normalisation), shape (1, 3, height, width)."""
    picture = image if isinstance(image, PIL.Image.Image) else PIL.Image.fromarray(np.asarray(image))
    picture = picture.convert("RGB")
    if picture.size != (width, height):
        picture = picture.resize((width, height), PIL.Image.Resampling.LANCZOS)
    array = np.asarray(picture).astype(np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def sd3_control_latents(mean: torch.Tensor, vae_config: Any, model: Any) -> torch.Tensor:
    """An SD3 ControlNet's input from the VAE mean of its map (in [-1, 1]): (z - shift) * scale, with
    no shift for `force_zeros_for_pooled_projection` models (InstantX's; the pipeline's phase 3).

    diffusers draws `latent_dist.sample()` from the global RNG there; the mean keeps a row
    reproducible and independent of its batch."""
    shift = 0.0 if model.config.force_zeros_for_pooled_projection else vae_config.shift_factor
    return (mean - shift) * vae_config.scaling_factor


def adapter_features(adapter: Any, image: torch.Tensor) -> list[torch.Tensor]:
    """A T2I-Adapter's features for one map, once per generation (they do not depend on t)."""
    return [f.clone() for f in adapter(image.to(device=adapter.device, dtype=adapter.dtype))]


def step_extras(
    controls: list[list[RowControl]],
    own_steps: list[tuple[int, int]],
    cfg: bool,
    model_input: torch.Tensor,
    t: torch.Tensor,
    embeds: torch.Tensor,
    added: dict[str, torch.Tensor] | None,
    blocks: int = 0,
) -> StepExtras:
    """The residual kwargs of one model call over n active rows.

    `controls[j]` are active row j's units, `own_steps[j]` its (step, steps) on its own schedule;
    `model_input`, `embeds` and `added` are the model call's (2n rows with CFG: uncond first). For
    SD3, `added` holds the transformer's `pooled_projections` and `blocks` is its block count.
    """
    extras = StepExtras()
    down: list[torch.Tensor] | None = None
    mid: torch.Tensor | None = None
    intrablock: list[torch.Tensor] | None = None
    sd3: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
    rows = model_input.shape[0]
    for entries in _groups(controls, own_steps, cfg).values():
        unit0 = entries[0][1]
        positions = torch.tensor([p for p, _ in entries], device=model_input.device)
        if unit0.kind == "t2i_adapter":
            intrablock = _add_features(intrablock, entries, positions, rows)
            continue
        if unit0.kind == "sd3_controlnet":
            assert added is not None
            residuals = _sd3_residuals(
                entries, positions, model_input, t, embeds, added["pooled_projections"]
            )
            sd3.append((positions, _weighted(residuals, entries)))
            continue
        model = unit0.model
        sub_added = None if added is None else {k: v.index_select(0, positions) for k, v in added.items()}
        images = torch.cat([u.image for _, u in entries]).to(device=model_input.device, dtype=model.dtype)
        # A 9-channel inpainting UNet's input carries mask channels; the ControlNet sees the latents.
        latents = model_input[:, : model.config.in_channels]
        res_down, res_mid = model(
            latents.index_select(0, positions).to(model.dtype),
            t,
            encoder_hidden_states=embeds.index_select(0, positions).to(model.dtype),
            controlnet_cond=images,
            conditioning_scale=1.0,
            added_cond_kwargs=sub_added,
            return_dict=False,
        )
        scaled = _weighted([*res_down, res_mid], entries)
        if down is None:
            down = [_zeros(rows, r) for r in res_down]
            mid = _zeros(rows, res_mid)
        assert mid is not None
        for k, residual in enumerate(scaled):
            (down[k] if k < len(res_down) else mid).index_add_(0, positions, residual)
    if down is not None:
        extras.kwargs["down_block_additional_residuals"] = tuple(down)
        extras.kwargs["mid_block_additional_residual"] = mid
    if intrablock is not None:
        extras.kwargs["down_intrablock_additional_residuals"] = intrablock
    if sd3:
        extras.kwargs["block_controlnet_hidden_states"] = _sum_block_residuals(sd3, rows, blocks)
    return extras


def _groups(
    controls: list[list[RowControl]], own_steps: list[tuple[int, int]], cfg: bool
) -> dict[int, list[tuple[int, RowControl]]]:
    """(position in the model input, unit) of every unit acting now, by model: one call per model
    over the rows that use it. With CFG row j is at j (uncond) and n + j (cond)."""
    n = len(controls)
    groups: dict[int, list[tuple[int, RowControl]]] = {}
    for j, units in enumerate(controls):
        step, steps = own_steps[j]
        for unit in units:
            if unit.scale == 0 or not in_window(step, steps, unit.start, unit.end):
                continue
            halves = [n + j] if cfg and unit.mode == "control" else ([j, n + j] if cfg else [j])
            for position in halves:
                groups.setdefault(id(unit.model), []).append((position, unit))
    return groups


def _weighted(residuals: list[torch.Tensor], entries: list[tuple[int, RowControl]]) -> list[torch.Tensor]:
    """Each entry's residuals times its unit's scale and soft-injection weight (row by row)."""
    weights = torch.tensor(
        [[u.scale * w for w in soft_weights(len(residuals), u.mode)] for _, u in entries],
        dtype=torch.float32,
    )  # (entries, residuals)
    return [r * weights[:, k].to(r).view(-1, *([1] * (r.ndim - 1))) for k, r in enumerate(residuals)]


def _zeros(rows: int, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((rows, *like.shape[1:]), dtype=like.dtype, device=like.device)


def _sd3_residuals(
    entries: list[tuple[int, RowControl]],
    positions: torch.Tensor,
    model_input: torch.Tensor,
    t: torch.Tensor,
    embeds: torch.Tensor,
    pooled: torch.Tensor,
) -> list[torch.Tensor]:
    """One SD3 ControlNet's block residuals for the rows at `positions` (the pipeline's step 8)."""
    model = entries[0][1].model
    dtype = model.dtype
    pooled = pooled.index_select(0, positions).to(dtype)
    if model.config.force_zeros_for_pooled_projection:
        pooled = torch.zeros_like(pooled)
    # SD3.5's large ControlNet has no context embedder and takes no text
    text = embeds.index_select(0, positions).to(dtype) if model.context_embedder is not None else None
    latents = model_input[:, : model.config.in_channels].index_select(0, positions).to(dtype)
    images = torch.cat([u.image for _, u in entries]).to(device=model_input.device, dtype=dtype)
    (residuals,) = model(
        hidden_states=latents,
        timestep=t.expand(len(entries)),
        encoder_hidden_states=text,
        pooled_projections=pooled,
        controlnet_cond=images,
        conditioning_scale=1.0,
        return_dict=False,
    )
    return list(residuals)


def _sum_block_residuals(
    groups: list[tuple[torch.Tensor, list[torch.Tensor]]], rows: int, blocks: int
) -> list[torch.Tensor]:
    """The SD3 ControlNets' scaled residuals summed into full-batch tensors (zeros for rows
    without). Models with different block counts are spread over the transformer's `blocks` first,
    by the transformer's own rule: block i takes residual int(i / (blocks / k))."""
    counts = {len(residuals) for _, residuals in groups}
    length = counts.pop() if len(counts) == 1 else blocks
    total: list[torch.Tensor] | None = None
    for positions, residuals in groups:
        k = len(residuals)
        spread = residuals if k == length else [residuals[int(i / (length / k))] for i in range(length)]
        if total is None:
            total = [_zeros(rows, r) for r in spread]
        for target, residual in zip(total, spread, strict=True):
            target.index_add_(0, positions, residual)
    assert total is not None
    return total


def _add_features(
    intrablock: list[torch.Tensor] | None,
    entries: list[tuple[int, RowControl]],
    positions: torch.Tensor,
    rows: int,
) -> list[torch.Tensor]:
    features = [
        torch.cat([u.features[k] for _, u in entries]) for k in range(len(entries[0][1].features or []))
    ]
    if intrablock is None:
        intrablock = [torch.zeros((rows, *f.shape[1:]), dtype=f.dtype, device=f.device) for f in features]
    scales = torch.tensor([u.scale for _, u in entries], dtype=torch.float32)
    for k, f in enumerate(features):
        intrablock[k].index_add_(0, positions.to(f.device), f * scales.to(f).view(-1, 1, 1, 1))
    return intrablock


ExtrasFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None], StepExtras]


def rows_extras(rows: list[Any], index: int, total: int, cfg: bool, blocks: int = 0) -> ExtrasFn | None:
    """What the active `rows` (loop.row.Row) add to this step's model call; None when nothing.

    Rows carry `controls` (their units) and, with an IP-Adapter, `image_embeds` (1, images, D) and
    `ip_scale`: the unconditional half gets zero embeddings, as diffusers' plain IP-Adapter does, and
    the row's scale in both halves. `blocks`: an SD3 transformer's block count.
    """
    has_controls = any(row.controls for row in rows)
    embeds = [row.image_embeds for row in rows]
    ip_scales = [row.ip_scale for row in rows]
    if not has_controls and all(e is None for e in embeds):
        return None
    own_steps = [(index - row.start, total - row.start) for row in rows]

    def extras(
        model_input: torch.Tensor, t: torch.Tensor, text: torch.Tensor, added: dict[str, torch.Tensor] | None
    ) -> StepExtras:
        result = StepExtras()
        if any(e is not None for e in embeds):
            if any(e is None for e in embeds):
                raise ValueError("an IP-Adapter batch needs image embeddings for every row")
            positive = torch.cat(embeds).to(device=model_input.device, dtype=text.dtype)
            image_embeds = torch.cat([torch.zeros_like(positive), positive]) if cfg else positive
            result.added["image_embeds"] = [image_embeds]
            result.ip_scales = torch.tensor(ip_scales * (2 if cfg else 1), dtype=torch.float32)
        if has_controls:
            result.kwargs = step_extras(
                [row.controls for row in rows], own_steps, cfg, model_input, t, text, added, blocks
            ).kwargs
        return result

    return extras

"""Tiled upscaling: a picture too large for one model call, in overlapping tiles blended back.

Tiles are cut at input coordinates on a regular grid (every tile the same size, so they batch),
run through the model in batches, and accumulated at `scale ×` coordinates with feathered weights:
zero over the outer quarter of each overlap (pixels that saw the tile's zero padding), a linear
ramp over its middle half, and 1 at the picture's border (no neighbour to blend with). Dividing by
the summed weights makes the blend a partition of unity, so a convolutional model whose receptive
field is narrower than a quarter of the overlap gives the untiled result, up to float rounding
(tests/test_upscale_tiles.py); wider fields blend smoothly.

A batch of tiles that runs out of memory is halved and retried, down to one tile; one tile that
still does not fit makes the caller retry with a smaller tile (ComfyUI halves its tile the same
way, `comfy/utils.py tiled_scale`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# (done, total) after each batch of tiles
TileProgress = Callable[[int, int], None]
ModelCall = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Tile:
    """A tile's box at input coordinates: (left, top) and its side lengths."""

    left: int
    top: int
    width: int
    height: int


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering [0, length) with tiles of `tile` overlapping by at least `overlap`;
    the last tile is moved back to end at `length` (so every tile has the same size)."""
    if length <= tile:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, length - tile, stride)) + [length - tile]
    return sorted(set(starts))


def tile_grid(width: int, height: int, tile: int, overlap: int) -> list[Tile]:
    """Equal-size tiles (at most `tile` per side, the picture's side when smaller) covering the picture."""
    tw, th = min(tile, width), min(tile, height)
    return [
        Tile(left, top, tw, th)
        for top in _starts(height, th, overlap)
        for left in _starts(width, tw, overlap)
    ]


def _ramp(length: int, before: int, after: int, margin: int) -> torch.Tensor:
    """1-D weights: 0 over the first `margin` samples, rising linearly to 1 by `before`, 1 in the
    middle, and the mirror image over the last `after` samples (no ramp where 0 is given)."""
    weights = torch.ones(length)
    for ramp, flip in ((before, False), (after, True)):
        if ramp <= 0:
            continue
        edge, zero = torch.zeros(ramp), min(margin, ramp // 2)
        edge[zero:] = torch.linspace(0.0, 1.0, ramp - zero + 2)[1:-1]
        if flip:
            weights[length - ramp :] = torch.minimum(weights[length - ramp :], edge.flip(0))
        else:
            weights[:ramp] = torch.minimum(weights[:ramp], edge)
    return weights


def feather(tile: Tile, width: int, height: int, overlap: int, scale: int) -> torch.Tensor:
    """(H·scale, W·scale) blend weights of `tile` in a `width`×`height` picture.

    On a side with a neighbour, the outer quarter of the overlap gets weight 0 (those output pixels
    saw the tile's zero padding within the model's receptive field) and the middle half ramps
    linearly to 1; the neighbour's weights mirror it over the same pixels. On the picture's border
    the weight stays 1. A model whose receptive field reaches less than overlap/4 input pixels
    gives the untiled result exactly.
    """
    ramp, margin = overlap * scale, (overlap // 4) * scale
    sides = (tile.left > 0, tile.left + tile.width < width, tile.top > 0, tile.top + tile.height < height)
    w, h = tile.width * scale, tile.height * scale
    left, right, top, bottom = (
        min(ramp, half) if has else 0
        for has, half in zip(sides, (w // 2, w // 2, h // 2, h // 2), strict=True)
    )
    return _ramp(h, top, bottom, margin)[:, None] * _ramp(w, left, right, margin)[None, :]


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def run_batched(model: ModelCall, tiles: torch.Tensor, batch: int) -> tuple[torch.Tensor, int]:
    """`model` over the tiles, `batch` at a time; a batch that runs out of memory is halved and
    retried (down to 1, then the error propagates). Returns the outputs and the batch size that fit."""
    outputs: list[torch.Tensor] = []
    index = 0
    while index < len(tiles):
        chunk = tiles[index : index + batch]
        try:
            outputs.append(model(chunk))
        except Exception as error:
            if not is_out_of_memory(error) or batch == 1:
                raise
            batch = max(1, batch // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        index += len(chunk)
    return torch.cat(outputs), batch


def upscale_tiled(
    model: ModelCall,
    image: torch.Tensor,
    scale: int,
    *,
    tile: int = 256,
    overlap: int = 16,
    batch: int = 4,
    on_progress: TileProgress | None = None,
) -> torch.Tensor:
    """(1, C, H, W) → (1, C, H·scale, W·scale): `model` on overlapping tiles, feather-blended.

    Tiles are equal-size so `batch` of them run as one call. The output accumulates in float32 on
    the image's device.
    """
    _, channels, height, width = image.shape
    grid = tile_grid(width, height, tile, overlap)
    out = torch.zeros(1, channels, height * scale, width * scale, dtype=torch.float32, device=image.device)
    weight = torch.zeros(1, 1, height * scale, width * scale, dtype=torch.float32, device=image.device)
    done, step = 0, max(1, batch)
    while done < len(grid):
        group = grid[done : done + step]
        crops = torch.cat([image[:, :, t.top : t.top + t.height, t.left : t.left + t.width] for t in group])
        results, step = run_batched(model, crops, step)
        for t, result in zip(group, results, strict=True):
            w = feather(t, width, height, overlap, scale).to(out.device)
            box = (slice(None), slice(None), slice(t.top * scale, (t.top + t.height) * scale),
                   slice(t.left * scale, (t.left + t.width) * scale))  # fmt: skip
            out[box] += result.float() * w
            weight[box] += w
        done += len(group)
        if on_progress is not None:
            on_progress(done, len(grid))
    return out / weight.clamp_min(1e-12)

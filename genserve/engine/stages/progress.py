"""A job's steps across stages: a hires pass or a refiner runs its own loop, but a request's
`on_step(step, total)` and the batch's step callback count one job (total = both stages), so
progress only ever goes up and reaches the total once."""

from __future__ import annotations

import dataclasses

from genserve.engine.loop.denoise import BatchItem, BatchStepCallback


def shifted_items(items: list[BatchItem], before: list[int], totals: list[int]) -> list[BatchItem]:
    """Items whose callbacks report a stage's step s as step before[i] + s of totals[i]."""
    return [_shifted(item, b, t) for item, b, t in zip(items, before, totals, strict=True)]


def _shifted(item: BatchItem, before: int, total: int) -> BatchItem:
    on_step, on_preview = item.on_step, item.on_preview
    return dataclasses.replace(
        item,
        on_step=None if on_step is None else lambda step, _: on_step(before + step, total),
        on_preview=None
        if on_preview is None
        else lambda step, _, images: on_preview(before + step, total, images),
    )


def shifted_batch_step(
    on_batch_step: BatchStepCallback | None, before: int, first: int, total: int
) -> BatchStepCallback | None:
    """The batch callback for a stage whose loop starts at index `first`: its step s (1-based loop
    index) is step before + s - first of `total`."""
    if on_batch_step is None:
        return None
    return lambda step, _, rows: on_batch_step(before + step - first, total, rows)

"""The denoising loop: several requests, one model call per step.

Requests that share a model, size, step count and sampler run as one batch (`engine/batch.py` sets
it up). Each request keeps its own prompt, negative prompt, seed and CFG scale, and each image (a
`Row`) its own scheduler, generator, start index and blend, so a row follows exactly the arithmetic
it would follow alone. A row joins the loop at its start index (img2img runs the end of the
schedule) and costs nothing before. When a request's callback raises (cancellation), its rows leave
the batch before the next step and stop costing compute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import PIL.Image
import torch
from diffusers import DiffusionPipeline

from genserve.engine.conditioning.control import rows_extras
from genserve.engine.conditioning.text import Conditioning
from genserve.engine.loop.guidance import apply_guidance, predict_noise
from genserve.engine.loop.previews import LatentRgbMap, preview_images
from genserve.engine.loop.row import Row
from genserve.engine.loop.schedule import step_kwargs
from genserve.engine.models.registry import Family
from genserve.engine.speed.deepcache import begin_run
from genserve.schemas.generation import GenerationParams

StepCallback = Callable[[int, int], None]
PreviewCallback = Callable[[int, int, list[PIL.Image.Image]], None]
BatchStepCallback = Callable[[int, int, int], None]  # (step, total, rows computed), after item callbacks


@dataclass
class BatchItem:
    """One request in a batch, with its own callbacks.

    `init_image` and `mask` are the decoded pictures behind `params.init_image` / `params.mask`
    (the job keeps only their content hashes; the worker loads them from the artifact store).
    """

    params: GenerationParams
    on_step: StepCallback | None = None
    on_preview: PreviewCallback | None = None
    init_image: PIL.Image.Image | None = None
    mask: PIL.Image.Image | None = None
    # The pictures named inside controlnets / ip_adapter, decoded, by their id in params.
    control_images: dict[str, PIL.Image.Image] = field(default_factory=dict)


@dataclass
class ItemOutcome:
    images: list[PIL.Image.Image] = field(default_factory=list)
    error: BaseException | None = None  # what the item's callback raised; its rows were dropped


def run_rows(
    pipe: DiffusionPipeline,
    family: Family,
    items: list[BatchItem],
    rows: list[Row],
    cond: Conditioning,
    timesteps: torch.Tensor,
    *,
    rgb_map: LatentRgbMap,
    outcomes: list[ItemOutcome],
    on_batch_step: BatchStepCallback | None = None,
    span: range | None = None,
) -> list[Row]:
    """Denoise `rows` over the shared `timesteps`; returns the rows that finished (in order).

    Row r is computed from loop index `rows[r].start` on, up to `rows[r].end` if it has one.
    `cond` and the CFG scales are per row. A request's `on_step(step, total)` counts its own steps
    (img2img at strength 0.5 of 20: 1..10) and runs once its rows have joined. An exception it
    raises is stored in `outcomes` and the request's rows leave the batch. `span` limits the loop
    to those indices (a second stage that starts part-way down its schedule); it stops early once
    every row has reached its end.
    """
    total = len(timesteps)
    scales = torch.tensor([items[row.item].params.cfg_scale for row in rows])
    alive = set(range(len(rows)))
    denoiser = pipe.transformer if family == "sd3" else pipe.unet
    computed: list[int] = []
    for index in span if span is not None else range(total):
        if all(rows[r].done(index) for r in alive):
            break  # every row handed over (to a refiner) already
        active = [r for r in sorted(alive) if rows[r].active(index)]
        if active != computed or any(rows[r].controls for r in active):
            # DeepCache (opt-in): a new set of rows needs a full step, and so does every step with
            # control residuals (its shallow steps would drop the deep blocks'); else a no-op
            begin_run(denoiser)
            computed = active
        if active:
            _step(pipe, family, rows, active, cond, scales, timesteps, index)
        # Per-request callbacks; a request whose callback raises leaves the batch now.
        for i in sorted({rows[r].item for r in active}):
            try:
                _report(items[i], [rows[r] for r in active if rows[r].item == i], index, total, rgb_map)
            except BaseException as error:  # noqa: BLE001 - handed back to the caller per item
                outcomes[i].error = error
                alive -= {r for r in alive if rows[r].item == i}
        if on_batch_step is not None:
            on_batch_step(index + 1, total, len(active))
        if not alive:
            break
    return [rows[r] for r in sorted(alive)]


def _step(
    pipe: DiffusionPipeline,
    family: Family,
    rows: list[Row],
    active: list[int],
    cond: Conditioning,
    scales: torch.Tensor,
    timesteps: torch.Tensor,
    index: int,
) -> None:
    """One model call for the active rows, then each row's own scheduler step and blend."""
    t = timesteps[index]
    picked = torch.tensor(active, dtype=torch.long)
    row_scales = scales.index_select(0, picked)
    model_input = torch.cat([_scaled(rows[r], t) for r in active])
    if rows[active[0]].extra is not None:  # 9-channel inpainting: every row carries its channels
        model_input = torch.cat([model_input, torch.cat([rows[r].extra for r in active])], dim=1)
    use_cfg = bool((row_scales > 1).any())
    blocks = pipe.transformer.config.num_layers if family == "sd3" else 0
    extras = rows_extras([rows[r] for r in active], index, len(timesteps), use_cfg, blocks)
    noise_uncond, noise_cond = predict_noise(
        pipe, family, model_input, t, cond.select(picked.to(model_input.device)), use_cfg, extras
    )
    noise_pred = apply_guidance(noise_uncond, noise_cond, row_scales)
    next_t = timesteps[index + 1] if index + 1 < len(timesteps) else None
    for j, r in enumerate(active):
        row = rows[r]
        row.latents = row.scheduler.step(
            noise_pred[j : j + 1],
            t,
            row.latents,
            return_dict=False,
            **step_kwargs(row.scheduler, row.generator),
        )[0]
        if row.blend is not None:
            row.latents = row.blend.apply(row.scheduler, row.latents, next_t)


def _scaled(row: Row, t: torch.Tensor) -> torch.Tensor:
    """The row scaled by its own scheduler; flow-matching schedulers take latents as they are."""
    if not hasattr(row.scheduler, "scale_model_input"):
        return row.latents
    return row.scheduler.scale_model_input(row.latents, t)


def _report(item: BatchItem, rows: list[Row], index: int, total: int, rgb_map: LatentRgbMap) -> None:
    """The request's progress in its own steps, and a preview every `preview_every` of them."""
    start = rows[0].start
    step, steps = index + 1 - start, total - start
    if item.on_step is not None:
        item.on_step(step, steps)
    every = item.params.preview_every or 0
    if item.on_preview is not None and every and step % every == 0 and step < steps:
        item.on_preview(step, steps, preview_images(torch.cat([row.latents for row in rows]), rgb_map))

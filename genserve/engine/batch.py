"""One batch, in numbered phases as diffusers' pipelines read, on the pipeline's own components:

0. pictures in: fit, mask, outpaint canvas, crop (stages/prepare.py)
1. text conditioning per request (conditioning/text.py)
2. the shared timesteps
3. rows: per-row scheduler, generator, start index, starting latents, blend (stages/rows.py), and
   what each row adds to the model call: control units, IP-Adapter embeddings (stages/controls.py)
4. the loop: one model call per step for the rows that have joined (loop/denoise.py)
5. second stages, each a loop of its own: the SDXL refiner takes over the base's latents
   (stages/refiner.py), or the hires fix upscales them and runs an img2img pass (stages/plan.py)
6. decode the rows that finished, and paste each back into its picture (stages/prepare.py)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline

from genserve.engine.conditioning.latents import LatentDist, decode_latents, encode_pixels, pixels_to_tensor
from genserve.engine.conditioning.text import Conditioning, encode_conditioning
from genserve.engine.loop.denoise import BatchItem, BatchStepCallback, ItemOutcome, run_rows
from genserve.engine.loop.previews import LatentRgbMap
from genserve.engine.loop.row import Row
from genserve.engine.loop.schedule import prepare_schedulers
from genserve.engine.models.registry import Family
from genserve.engine.models.samplers import build_scheduler
from genserve.engine.stages.controls import (
    Annotate,
    EncodeImages,
    LoadControl,
    attach_controls,
    attach_image_embeds,
    sd3_map_encoder,
)
from genserve.engine.stages.hires import hires_conditioning, hires_rows
from genserve.engine.stages.plan import second_pass_schedule, second_pass_steps, size_multiple, target_size
from genserve.engine.stages.prepare import paste_back, prepare_picture
from genserve.engine.stages.progress import shifted_batch_step, shifted_items
from genserve.engine.stages.refiner import refiner_rows, switch_index
from genserve.engine.stages.rows import Encode, build_rows

# The refiner of a batch: its pipeline and the batch's sampler built on its scheduler config. Called
# once the base's part is done (loading it may move the base off the device).
LoadRefiner = Callable[[], tuple[DiffusionPipeline, Any]]
# Gives rows their requests' control units, with the maps at (width, height)
AttachControls = Callable[[list[Row], int, int], None]


def denoise_batch(
    pipe: DiffusionPipeline,
    family: Family,
    scheduler: Any,
    items: list[BatchItem],
    *,
    device: str,
    dtype: torch.dtype,
    rgb_map: LatentRgbMap,
    on_batch_step: BatchStepCallback | None = None,
    encode: Encode | None = None,
    encode_upscaled: Encode | None = None,
    load_refiner: LoadRefiner | None = None,
    load_control: LoadControl | None = None,
    annotate: Annotate | None = None,
    encode_images: EncodeImages | None = None,
) -> list[ItemOutcome]:
    """Run compatible requests as one batch. Item i's images use seeds seed_i, seed_i + 1, ...

    `encode` turns a picture into its VAE latent distribution (the Engine passes its cache);
    `encode_upscaled` does it for the hires fix's pixel upscalers (pictures seen once: not cached).
    `load_refiner` is needed when the requests name a refiner, `load_control` (and `annotate` for
    weight-based preprocessors) when they name controlnets, `encode_images` with an ip_adapter.
    """
    params = items[0].params
    if any(item.params.cfg_scale is None for item in items):
        raise ValueError("denoise_batch needs resolved params: cfg_scale is unset (Engine fills the model's)")
    outcomes = [ItemOutcome() for _ in items]
    if encode is None:
        encode = lambda image: uncached_encode(pipe, image, device)  # noqa: E731
    if encode_upscaled is None:
        encode_upscaled = lambda image: uncached_encode(pipe, image, device)  # noqa: E731

    # 0. Pictures in
    pictures = [prepare_picture(item.params, item.init_image, item.mask) for item in items]

    # 1. Text conditioning
    cond = encode_conditioning(pipe, family, [item.params for item in items], device)

    # 2. Timesteps (each row gets its own copy of the scheduler in phase 3)
    [timed_scheduler], timesteps = prepare_schedulers(pipe, family, scheduler, 1, params, device)

    # 3. Rows
    denoiser = pipe.transformer if family == "sd3" else pipe.unet
    factor = pipe.vae_scale_factor
    rows = build_rows(
        family,
        pipe.vae.config,
        timed_scheduler,
        timesteps,
        items,
        pictures,
        encode,
        latent_shape=(pipe.vae.config.latent_channels, params.height // factor, params.width // factor),
        pixel_size=(params.height, params.width),
        model_channels=denoiser.config.in_channels,
        device=device,
        dtype=dtype,
    )
    controls: AttachControls | None = None
    if any(item.params.controlnets for item in items):
        if load_control is None:
            raise ValueError("controlnets need load_control")
        encode_map = sd3_map_encoder(pipe) if family == "sd3" else None

        def controls(rows: list[Row], width: int, height: int) -> None:
            attach_controls(rows, items, load_control, width=width, height=height, device=device,
                            annotate=annotate, encode_map=encode_map)  # fmt: skip

        controls(rows, params.width, params.height)
    if params.ip_adapter is not None:
        if encode_images is None:
            raise ValueError("an ip_adapter needs encode_images")
        attach_image_embeds(rows, items, encode_images)

    # 4. The loop, and 5. a second stage
    common = dict(rgb_map=rgb_map, outcomes=outcomes, device=device, dtype=dtype)
    decoder = pipe
    if params.refiner is not None:
        if load_refiner is None:
            raise ValueError("a refiner request needs load_refiner")
        finished, decoder = _base_then_refiner(
            pipe, family, items, rows, cond, timesteps, load_refiner, on_batch_step, **common
        )
    elif params.hires is not None:
        finished = _first_then_hires(
            pipe, family, items, rows, cond, timesteps, encode_upscaled, on_batch_step, controls, **common
        )
    else:
        finished = run_rows(
            pipe,
            family,
            items,
            rows,
            cond,
            timesteps,
            rgb_map=rgb_map,
            outcomes=outcomes,
            on_batch_step=on_batch_step,
        )

    # 6. Decode what finished, paste it back, and hand each request its images
    if finished:
        images = decode_latents(decoder, family, torch.cat([row.latents for row in finished]))
        for row, image in zip(finished, images, strict=True):
            outcomes[row.item].images.append(paste_back(pictures[row.item], image))
    return outcomes


def _first_then_hires(
    pipe: DiffusionPipeline,
    family: Family,
    items: list[BatchItem],
    rows: list[Row],
    cond: Conditioning,
    timesteps: torch.Tensor,
    encode_upscaled: Encode,
    on_batch_step: BatchStepCallback | None,
    controls: AttachControls | None,
    *,
    rgb_map: LatentRgbMap,
    outcomes: list[ItemOutcome],
    device: str,
    dtype: torch.dtype,
) -> list[Row]:
    """The whole first pass, then the hires pass on the rows that finished it.

    A request counts its own first-pass steps, then exactly the second pass's steps. ControlNets and
    T2I-Adapters act in both passes, as in the A1111 ControlNet extension's default: `controls`
    gives the second pass's rows their units again, the maps preprocessed at the larger size, and
    each unit's start and end are fractions of the second pass's own steps.
    """
    params = items[0].params
    hires = params.hires
    assert hires is not None and params.width is not None and params.height is not None
    steps, first_steps = second_pass_steps(params), len(timesteps)
    own = _own_steps(rows, len(items), first_steps)
    totals = [n + steps for n in own]
    finished = run_rows(
        pipe,
        family,
        shifted_items(items, [0] * len(items), totals),
        rows,
        cond,
        timesteps,
        rgb_map=rgb_map,
        outcomes=outcomes,
        on_batch_step=shifted_batch_step(on_batch_step, 0, 0, first_steps + steps),
    )
    if not finished:
        return finished

    schedule, start = second_pass_schedule(steps, hires.strength)
    width, height = target_size(params.width, params.height, hires, size_multiple(family))
    larger = params.model_copy(update={"steps": schedule, "width": width, "height": height})
    scheduler = build_scheduler(family, hires.sampler or params.sampler, pipe.scheduler.config)
    [timed], second = prepare_schedulers(pipe, family, scheduler, 1, larger, device)
    upscaled = hires_rows(
        pipe,
        family,
        finished,
        timed,
        second,
        start,
        (width, height),
        hires.upscaler,
        encode_upscaled,
        device=device,
        dtype=dtype,
    )
    if controls is not None:
        controls(upscaled, width, height)
    return run_rows(
        pipe,
        family,
        shifted_items(items, own, totals),
        upscaled,
        hires_conditioning(pipe, family, _rows_of(cond, rows, finished), larger),
        second,
        rgb_map=rgb_map,
        outcomes=outcomes,
        on_batch_step=shifted_batch_step(on_batch_step, first_steps, start, first_steps + steps),
        span=range(start, schedule),
    )


def _base_then_refiner(
    pipe: DiffusionPipeline,
    family: Family,
    items: list[BatchItem],
    rows: list[Row],
    cond: Conditioning,
    timesteps: torch.Tensor,
    load_refiner: LoadRefiner,
    on_batch_step: BatchStepCallback | None,
    *,
    rgb_map: LatentRgbMap,
    outcomes: list[ItemOutcome],
    device: str,
    dtype: torch.dtype,
) -> tuple[list[Row], DiffusionPipeline]:
    """The base down to each row's switch index, then the refiner on the rest of the same schedule.

    Returns the rows that finished and the pipeline whose VAE decodes them (the refiner's). A
    request counts its steps across both models; the batch counts the base's loop, then the
    refiner's.
    """
    total_steps = len(timesteps)
    train = pipe.scheduler.config.num_train_timesteps
    for row in rows:
        refiner = items[row.item].params.refiner
        assert refiner is not None
        row.end = max(row.start, switch_index(timesteps, refiner.switch_at, train))
    handover = max(row.end or 0 for row in rows)  # the base's loop ends here
    joined = min(row.end or 0 for row in rows)  # the refiner's loop starts here
    batch_total = handover + total_steps - joined
    finished = rows
    if handover > 0:
        finished = run_rows(
            pipe,
            family,
            items,
            rows,
            cond,
            timesteps,
            rgb_map=rgb_map,
            outcomes=outcomes,
            on_batch_step=shifted_batch_step(on_batch_step, 0, 0, batch_total),
            span=range(handover),
        )
    if not finished:
        return finished, pipe

    refiner_pipe, scheduler = load_refiner()
    [timed], refiner_timesteps = prepare_schedulers(
        refiner_pipe, family, scheduler, 1, items[0].params, device
    )
    if not torch.equal(refiner_timesteps.cpu(), timesteps.cpu()):
        raise ValueError(
            "the refiner's scheduler config gives other timesteps than the base's; "
            "base and refiner must share one schedule"
        )
    starts = {row.item: row.start for row in rows}
    joins = {row.item: row.end or 0 for row in rows}
    refined = refiner_rows(finished, timed, device=device, dtype=dtype)
    refiner_cond = encode_conditioning(refiner_pipe, family, [item.params for item in items], device)
    finished = run_rows(
        refiner_pipe,
        family,
        shifted_items(
            items,
            [joins[i] - starts[i] for i in range(len(items))],
            [total_steps - starts[i] for i in range(len(items))],
        ),
        refined,
        _rows_of(refiner_cond, rows, finished),
        refiner_timesteps,
        rgb_map=rgb_map,  # the refiner works in the base's latent space
        outcomes=outcomes,
        on_batch_step=shifted_batch_step(on_batch_step, handover, joined, batch_total),
        span=range(joined, total_steps),
    )
    return finished, refiner_pipe


def _own_steps(rows: list[Row], items: int, total: int) -> list[int]:
    """Each request's own steps on a `total`-step schedule: from its rows' start to the end."""
    starts = {row.item: row.start for row in rows}
    return [total - starts[i] for i in range(items)]


def _rows_of(cond: Conditioning, rows: list[Row], kept: list[Row]) -> Conditioning:
    """Conditioning of all `rows`, narrowed to the `kept` ones, in their order."""
    position = {id(row): i for i, row in enumerate(rows)}
    keep = torch.tensor([position[id(row)] for row in kept], device=cond.cond.device)
    return cond.select(keep)


def uncached_encode(pipe: DiffusionPipeline, image: np.ndarray, device: str) -> LatentDist:
    return encode_pixels(pipe, pixels_to_tensor(image, device, pipe.vae.dtype))

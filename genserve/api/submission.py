"""Turning a client's request into a stored job, and a stored job into its public shape."""

from __future__ import annotations

import hashlib
import json
import secrets
from datetime import UTC, datetime, timedelta

from genserve.api.pictures import PICTURE_FIELDS, size_from_picture, stored_size
from genserve.api.upscale_submission import check_post_options, post_seconds
from genserve.artifacts.inputs import InputStore
from genserve.config import Settings
from genserve.engine.models.controls import control_problems, preprocessor_problem, registered_controls
from genserve.engine.models.loras import registered_loras
from genserve.engine.models.registry import ModelInfo, sampler_supported
from genserve.engine.stages.plan import (
    output_size,
    refiner_problem,
    schedule_error,
    second_pass_steps,
    size_multiple,
)
from genserve.scheduler.cost import seconds_per_batch, steps_run
from genserve.scheduler.policy import classify
from genserve.schemas import (
    GenerationParams,
    ImageRef,
    JobCreate,
    JobPublic,
    JobState,
    LimitError,
    check_limits,
)
from genserve.schemas.control import nested_picture_refs
from genserve.schemas.generation import MAX_SEED, SAMPLER_NAMES
from genserve.schemas.image_inputs import is_image_hash
from genserve.store.calibration import CalibrationStore
from genserve.store.jobs import JobRecord, JobStore

# Pixel sizes whole in latents and in transformer patches (VAE factor 8 × SD3's patch size 2).
SIZE_MULTIPLE = {"sd3": 16}


def resolve_params(
    params: GenerationParams,
    models: dict[str, ModelInfo],
    settings: Settings,
    pictures: InputStore | None = None,
) -> GenerationParams:
    """Fill in the model, its size (native, or the init image's), the model card's CFG scale, steps
    and sampler where the request names none, and a random seed, then check every limit.

    Pictures must be stored already (`store_pictures`): `pictures` is where their sizes are read.
    The stored job holds the resolved values, so a job always says exactly what ran and can be
    reproduced. Raises LimitError naming the field.
    """
    model_name = params.model or settings.default_model
    check_limits(params.model_copy(update={"model": model_name}), settings.limits, known_models=set(models))
    info = models[model_name]
    if info.refiner:
        raise LimitError(
            "model",
            f"model '{model_name}' is an SDXL refiner: name an SDXL base model and put it in refiner.model",
        )
    # The model's own defaults for what the caller left out: switching models changes no one's settings.
    unset = {"steps": info.request_steps, "sampler": info.request_sampler}
    params = params.model_copy(update={k: v for k, v in unset.items() if k not in params.model_fields_set})
    if not sampler_supported(info.family, params.sampler):
        raise LimitError("sampler", f"sampler '{params.sampler}' is not supported for {info.family} models")
    _check_refiner(params.model_copy(update={"model": model_name}), info, models, settings)
    _check_controls(params, info, settings)
    _check_loras(params, info, settings)
    width, height = _size(params, info, settings, pictures)
    resolved = params.model_copy(
        update={
            "model": model_name,
            "width": width,
            "height": height,
            "seed": params.seed if params.seed is not None else secrets.randbelow(MAX_SEED + 1),
            "cfg_scale": params.cfg_scale if params.cfg_scale is not None else info.request_cfg_scale,
            "preview_every": params.preview_every
            if params.preview_every is not None
            else settings.preview_every,
        }
    )
    check_limits(resolved, settings.limits)
    _check_hires(resolved, info, settings)
    check_post_options(resolved, settings)  # upscale, face_restore, a hires model upscaler
    return GenerationParams.model_validate(resolved.model_dump())


def _check_refiner(
    params: GenerationParams, info: ModelInfo, models: dict[str, ModelInfo], settings: Settings
) -> None:
    """The refiner is an SDXL refiner the caller may use, for an SDXL base."""
    if params.refiner is None:
        return
    problem = refiner_problem(params, info, models)
    if problem is not None:
        raise LimitError("refiner", problem)
    allowed = settings.limits.allowed_models
    if allowed is not None and params.refiner.model not in allowed:
        raise LimitError(
            "refiner", f"refiner model '{params.refiner.model}' is not in the allowed list {allowed}"
        )


def _check_loras(params: GenerationParams, info: ModelInfo, settings: Settings) -> None:
    """Every LoRA is registered, loadable and made for the model's family (422 naming loras[i].name)."""
    if not params.loras:
        return
    loras = registered_loras(settings)
    for i, ref in enumerate(params.loras):
        lora = loras.get(ref.name)
        if lora is None:
            raise LimitError(f"loras[{i}].name", f"LoRA '{ref.name}' is not registered; see GET /v1/loras")
        if (reason := lora.unsupported_reason()) is not None:
            raise LimitError(f"loras[{i}].name", reason)
        if lora.family != info.family:
            raise LimitError(
                f"loras[{i}].name",
                f"LoRA '{ref.name}' is for {lora.family} models; model '{info.name}' is {info.family}",
            )
    if settings.optimizations.lora_hotswap_rank and len(params.loras) > 1:  # one hot-swapped slot
        raise LimitError(
            "loras[1].name", "this server hot-swaps one LoRA at a time (lora_hotswap_rank is set)"
        )


def _check_controls(params: GenerationParams, info: ModelInfo, settings: Settings) -> None:
    """Control models exist, fit the base model's family, their preprocessors are known and their
    pictures are stored (422 naming e.g. controlnets[0].model)."""
    if not params.controlnets and params.ip_adapter is None:
        return
    for field, problem in control_problems(params, registered_controls(settings), info):
        raise LimitError(field, problem)
    for i, unit in enumerate(params.controlnets or []):
        if (problem := preprocessor_problem(unit.preprocessor, settings.models_dir)) is not None:
            raise LimitError(f"controlnets[{i}].preprocessor", problem)
    for field, value in nested_picture_refs(params):
        if not is_image_hash(value):
            raise LimitError(field, f"{field} must be stored first; send it to POST /v1/jobs or /v1/uploads")


def _check_hires(params: GenerationParams, info: ModelInfo, settings: Settings) -> None:
    """The hires fix's second pass within the same limits as a first pass: its sampler, steps,
    schedule and size (the size of the images the job returns)."""
    hires = params.hires
    if hires is None:
        return
    if params.init_image is not None:
        raise LimitError(
            "hires", "hires is a second pass of a text-to-image request; with an init_image, ask for the size"
        )
    sampler = hires.sampler or params.sampler
    if sampler not in SAMPLER_NAMES or not sampler_supported(info.family, sampler):
        raise LimitError("hires", f"hires sampler '{sampler}' is not supported for {info.family} models")
    limits = settings.limits
    if second_pass_steps(params) > limits.max_steps:
        raise LimitError("hires", f"hires steps must be between 1 and {limits.max_steps} (max_steps)")
    if (problem := schedule_error(params)) is not None:
        raise LimitError("hires", problem)
    width, height = output_size(params, info.family)
    multiple = size_multiple(info.family)
    if width % multiple or height % multiple:
        raise LimitError(
            "hires", f"hires width and height must be multiples of {multiple} for {info.family} models"
        )
    if width > limits.max_width or height > limits.max_height:
        raise LimitError(
            "hires",
            f"the hires size {width}x{height} exceeds max_width {limits.max_width} or max_height {limits.max_height}",
        )
    if width * height > limits.max_pixels:
        raise LimitError(
            "hires",
            f"the hires size {width}x{height} = {width * height} pixels exceeds max_pixels {limits.max_pixels}",
        )


def _size(
    params: GenerationParams, info: ModelInfo, settings: Settings, pictures: InputStore | None
) -> tuple[int, int]:
    """The request's size; else the init image's (plus outpaint margins); else the model's native size."""
    _check_pictures(params, pictures)
    if params.init_image is None:
        return params.width or info.native_width, params.height or info.native_height
    assert pictures is not None  # _check_pictures
    if params.width is not None and params.height is not None:
        return params.width, params.height
    picture = stored_size(pictures, params.init_image, "init_image")
    return size_from_picture(params, picture, settings.limits, SIZE_MULTIPLE.get(info.family, 8))


def _check_pictures(params: GenerationParams, pictures: InputStore | None) -> None:
    """The picture options make sense together, and the pictures are stored."""
    if params.init_image is None:
        for name in ("mask", "outpaint", "inpaint"):
            if getattr(params, name) is not None:
                raise LimitError(name, f"{name} needs an init_image")
        return
    if params.inpaint is not None and params.mask is None and params.outpaint is None:
        raise LimitError("inpaint", "inpaint options need a mask (or outpaint)")
    if steps_run(params.steps, params.strength) < 1:  # diffusers refuses a run of no steps too
        raise LimitError(
            "strength",
            f"strength {params.strength} of {params.steps} steps runs no step (int(steps × strength) = 0); "
            "raise strength or steps",
        )
    for name in PICTURE_FIELDS:
        ref = getattr(params, name)
        if ref is not None and (pictures is None or not is_image_hash(ref)):
            raise LimitError(name, f"{name} must be stored first; send it to POST /v1/jobs or /v1/uploads")


def request_hash(body: JobCreate) -> str:
    """Hash of what the client asked for (before defaults are resolved), for idempotency checks."""
    canonical = json.dumps(body.model_dump(exclude={"request_id"}), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def trace_id_from(traceparent: str | None) -> str:
    """The W3C trace id of an incoming `traceparent` header, or a new one."""
    parts = (traceparent or "").split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and all(c in "0123456789abcdef" for c in parts[1]):
        return parts[1]
    return secrets.token_hex(16)


def submit(
    body: JobCreate,
    models: dict[str, ModelInfo],
    settings: Settings,
    store: JobStore,
    client_id: str | None,
    trace_id: str | None = None,
    pictures: InputStore | None = None,
) -> tuple[JobRecord, bool]:
    """Validate and store a job. Returns (job, created); an idempotent resubmit returns created=False.

    Its pictures must be stored already (`store_pictures`), so the request hash sees their ids."""
    # exclude_unset: what the caller left out stays unset, so resolve_params fills in the model's defaults.
    generation = GenerationParams.model_validate(
        body.model_dump(exclude={"request_id", "priority"}, exclude_unset=True)
    )
    resolved = resolve_params(generation, models, settings, pictures)
    seconds = estimated_seconds(resolved, models[resolved.model].family, store)
    job, created = store.submit(
        resolved.model_dump(),
        request_id=body.request_id,
        request_hash=request_hash(body),
        priority=body.priority,
        max_attempts=settings.max_attempts,
        client_id=client_id,
        queue=classify(seconds, settings.long_queue_threshold_seconds),
        estimated_seconds=seconds,
        trace_id=trace_id,
    )
    if created and settings.broker_url:  # multi-node mode: wake a worker (best-effort; the reaper sweeps)
        from genserve.distributed.celery_app import publish_wake, wake_queue

        warm = {
            model for worker in store.live_workers(max_age_seconds=10.0) for model in worker.models_loaded
        }
        publish_wake(settings, [job.id], queue=wake_queue(settings, warm, resolved.model))
    return job, created


def estimated_seconds(params: GenerationParams, family: str, store: JobStore) -> float:
    """The cost model's run time for this request alone, on the device it was calibrated on: only
    the steps that run (img2img at strength s runs int(steps × s)), plus a VAE encode, plus the
    hires pass's steps at its size."""
    calibration = CalibrationStore(store.engine)
    device = calibration.default_device(params.model)
    timing = calibration.lookup(
        device=device,
        model=params.model,
        family=family,
        width=params.width,
        height=params.height,
        batch=params.num_images,
    )
    strength = params.strength if params.init_image is not None else None
    seconds = seconds_per_batch(timing, steps_run(params.steps, strength), encodes=strength is not None)
    if params.upscale is not None or params.face_restore is not None:  # after decode (engine/upscale/)
        seconds += post_seconds(params, output_size(params, family), calibration.all(device=device), device)
    return seconds + second_stage_seconds(params, family, calibration, device, params.num_images)


def second_stage_seconds(
    params: GenerationParams, family: str, calibration: CalibrationStore, device: str, batch: int
) -> float:
    """A batch's hires pass: its steps at the hires size (0 without hires)."""
    if params.hires is None:
        return 0.0
    width, height = output_size(params, family)
    larger = calibration.lookup(
        device=device, model=params.model, family=family, width=width, height=height, batch=batch
    )
    return second_pass_steps(params) * larger.step_s


def to_public(job: JobRecord, store: JobStore, live_workers: int = 1) -> JobPublic:
    standing = store.queue_standing(job.id) if job.state == JobState.queued else None
    start = None
    if standing is not None:
        start = datetime.now(UTC) + timedelta(seconds=standing[1] / max(1, live_workers))
    return JobPublic(
        id=job.id,
        request_id=job.request_id,
        state=job.state,
        params=GenerationParams.model_validate(job.params),
        priority=job.priority,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        attempts=job.attempt,
        max_attempts=job.max_attempts,
        error=job.error,
        images=[ImageRef(id=image_id, url=f"/v1/images/{image_id}") for image_id in job.image_ids],
        queue=job.queue,
        estimated_seconds=job.estimated_seconds,
        queue_position=standing[0] if standing else None,
        estimated_start_at=start,
        events_url=f"/v1/jobs/{job.id}/events",
    )

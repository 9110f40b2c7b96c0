"""What a request would take and cost: the cost model over calibrated step timings (no torch)."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from genserve.api.deps import ServicesDep
from genserve.api.pictures import store_pictures
from genserve.api.submission import resolve_params, second_stage_seconds
from genserve.scheduler.cost import estimate, steps_run
from genserve.schemas import GenerationParams
from genserve.store.calibration import CalibrationStore

router = APIRouter(tags=["estimate"])


class EstimateRequest(GenerationParams):
    """The generation fields (a prompt is optional here), plus the batch and the price to plan with."""

    prompt: str = Field("estimate", min_length=1, description="Not used by the estimate.")
    batch: int | None = Field(
        None, ge=1, le=256, description="Images per batch on one worker; num_images if omitted."
    )
    gpu_price_per_hour: float | None = Field(None, ge=0, description="Price of one GPU-hour.")
    gpus: int = Field(1, ge=1, description="GPUs one worker's batch occupies.")
    images: int | None = Field(
        None, ge=1, description="Images in the whole job, for GPU-hours and total cost."
    )
    device: str | None = Field(
        None, description="Device to plan for, as calibrated; default: the model's calibrated device."
    )


class EstimatePublic(BaseModel):
    model: str
    family: str
    device: str
    width: int
    height: int
    steps: int
    batch: int
    seconds_per_batch: float = Field(description="T = O + S × t_step")
    seconds_per_image: float
    images_per_hour: float = Field(description="3600 × B / T, one worker")
    cost_per_1000: float | None = Field(description="price × gpus / (images_per_hour / 1000)")
    gpu_hours: float | None
    total_cost: float | None
    overhead_s: float = Field(description="O, seconds per batch")
    step_s: float = Field(description="t_step(R, B), seconds per step of the batch")
    gpus: int
    gpu_price_per_hour: float | None
    images: int | None
    source: str = Field(description="calibrated, observed, default, rough default, or scaled from ...")
    calibrated: bool
    basis: str


@router.post("/v1/estimate", response_model=EstimatePublic, operation_id="estimate_cost")
def estimate_cost(body: EstimateRequest, services: ServicesDep) -> EstimatePublic:
    """Time per image, images/hour and cost per 1,000 images for this request on a calibrated device."""
    models = services.catalog.models()
    # exclude_unset: steps and sampler left out take the model card's, as a submitted job would.
    asked = body.model_dump(include=set(GenerationParams.model_fields), exclude_unset=True)
    generation = GenerationParams.model_validate({"prompt": body.prompt, **asked})
    generation = store_pictures(generation, services.inputs, services.settings.limits)
    params = resolve_params(generation, models, services.settings, services.inputs)
    family = models[params.model].family
    batch = body.batch or params.num_images
    calibration = CalibrationStore(services.store.engine)
    device = body.device or calibration.default_device(params.model)
    timing = calibration.lookup(
        device=device,
        model=params.model,
        family=family,
        width=params.width,
        height=params.height,
        batch=batch,
    )
    strength = params.strength if params.init_image is not None else None  # img2img runs fewer steps
    result = estimate(
        timing,
        steps=steps_run(params.steps, strength),
        encodes=strength is not None,
        second_stage_s=second_stage_seconds(params, family, calibration, device, batch),
        batch=batch,
        gpu_price_per_hour=body.gpu_price_per_hour,
        gpus=body.gpus,
        images=body.images,
    )
    return EstimatePublic(
        model=params.model,
        family=family,
        device=device,
        width=params.width,
        height=params.height,
        steps=params.steps,
        batch=batch,
        seconds_per_batch=result.seconds_per_batch,
        seconds_per_image=result.seconds_per_image,
        images_per_hour=result.images_per_hour,
        cost_per_1000=result.cost_per_1000,
        gpu_hours=result.gpu_hours,
        total_cost=result.total_cost,
        overhead_s=result.overhead_s,
        step_s=result.step_s,
        gpus=result.gpus,
        gpu_price_per_hour=result.gpu_price_per_hour,
        images=result.images,
        source=result.source,
        calibrated=result.calibrated,
        basis=result.basis,
    )

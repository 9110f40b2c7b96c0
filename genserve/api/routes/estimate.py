"""What a request would take and cost: the cost model over calibrated step timings (no torch).

`POST /v1/estimate` takes a video request too: a body with any video field (mode, num_frames,
seconds, fps, guidance, keyframes, video, long, post, output, sparsectrl), or one that names a video
model, gets what `POST /v1/video/estimate` gives for it (device-seconds, and cost per second of
video), from the same function. Image bodies validate and answer exactly as before.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError

from genserve.api.deps import ServicesDep
from genserve.api.pictures import store_pictures
from genserve.api.routes.videos import VideoEstimate, VideoEstimateRequest, estimate_video
from genserve.api.submission import resolve_params, second_stage_seconds
from genserve.auth.deps import PrincipalDep
from genserve.scheduler.cost import estimate, steps_run
from genserve.schemas import GenerationParams, LimitError
from genserve.schemas.text import SafeText
from genserve.schemas.video import (
    LongOptions,
    OutputOptions,
    PostOptions,
    SparseCtrlOptions,
    VideoKeyframe,
    VideoModeName,
)
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
    # A video request (POST /v1/video/estimate's body): any of these, or a video model, makes it one.
    mode: VideoModeName | None = Field(None, description="Video: t2v, i2v, flf2v, keyframes or v2v.")
    num_frames: int | None = Field(None, ge=1, description="Video: frames generated.")
    seconds: float | None = Field(None, gt=0, description="Video: instead of num_frames, seconds at fps.")
    fps: int | None = Field(None, ge=1, le=120, description="Video: frames per second.")
    guidance: float | None = Field(None, ge=0, description="Video: guidance scale.")
    keyframes: list[VideoKeyframe] | None = Field(None, max_length=64, description="Video: keyframes.")
    video: SafeText | None = Field(None, description="Video v2v: an input video id.")
    long: LongOptions | None = Field(None, description="Video: a long clip's segments.")
    post: PostOptions | None = Field(None, description="Video: post-processing.")
    output: OutputOptions | None = Field(None, description="Video: container, codec, crf.")
    sparsectrl: SparseCtrlOptions | None = Field(None, description="Video: AnimateDiff SparseCtrl keyframes.")


VIDEO_ONLY_FIELDS = (
    frozenset(VideoEstimateRequest.model_fields)
    - frozenset(GenerationParams.model_fields)
    - {"gpu_price_per_hour"}
)
assert VIDEO_ONLY_FIELDS <= frozenset(EstimateRequest.model_fields), (
    "EstimateRequest must take every video field"
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


@router.post("/v1/estimate", response_model=EstimatePublic | VideoEstimate, operation_id="estimate_cost")
def estimate_cost(
    body: EstimateRequest, services: ServicesDep, principal: PrincipalDep
) -> EstimatePublic | VideoEstimate:
    """Time per image, images/hour and cost per 1,000 images for this request on a calibrated device;
    for a video request (a video field, or a video model), what POST /v1/video/estimate gives."""
    models = services.catalog.models()
    named = models.get(body.model or "")
    if body.model_fields_set & VIDEO_ONLY_FIELDS or (named is not None and named.kind == "video"):
        return estimate_video(_video_body(body), services, principal)
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


def _video_body(body: EstimateRequest) -> VideoEstimateRequest:
    """The video estimate's body from an /v1/estimate body: its fields as set, checked as
    /v1/video/estimate checks them (an image-only field is a 422 naming it)."""
    image_only = sorted(body.model_fields_set - set(VideoEstimateRequest.model_fields))
    if image_only:
        field = image_only[0]
        raise LimitError(
            field, f"{field} is an image estimate's field; a video estimate takes the video request"
        )
    fields = body.model_dump(include=body.model_fields_set, exclude_unset=True)
    try:
        return VideoEstimateRequest.model_validate(fields)
    except ValidationError as error:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in error.errors(include_url=False)]
        raise RequestValidationError(errors) from None

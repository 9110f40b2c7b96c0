"""An AUTOMATIC1111-compatible subset of /sdapi/v1, enough for its API clients (e.g. webuiapi).

There is no global "current model": a model named in `override_settings` applies to that request
only, and one set through POST /sdapi/v1/options applies to that caller's later requests only (the
caller is the API key; with auth off, the X-Client-Id header or else the client's address).
Every txt2img and img2img request is an ordinary genserve job, so it queues, batches (img2img rows
with txt2img rows) and shows up in /v1/jobs.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Collection
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from genserve import __version__
from genserve.api.a1111_controlnet import SCRIPT_NAMES, controlnet_fields
from genserve.api.a1111_inputs import A1111_FIELDS, HiresFields, Img2ImgFields, hires_fields, img2img_fields
from genserve.api.compat import data_url_payload, image_b64, wait_for_job
from genserve.api.deps import ServicesDep
from genserve.api.submission import trace_id_from
from genserve.api.upscale_submission import registered_upscalers
from genserve.artifacts.png import A1111_SAMPLER_NAMES, a1111_parameters, extra_parameters
from genserve.auth.deps import Principal, PrincipalDep, submit_as
from genserve.engine.models.loras import registered_loras
from genserve.schemas import GenerationParams, JobCreate, JobState, LimitError
from genserve.store.jobs import JobRecord, JobStore

router = APIRouter(prefix="/sdapi/v1", tags=["automatic1111"])

ClientId = Annotated[str | None, Header(alias="X-Client-Id", max_length=200)]
TASK_PREFIX = "a1111:"  # request ids of jobs submitted here: "a1111:<id_task>"
_FROM_A1111 = {name.lower(): sampler for sampler, name in A1111_SAMPLER_NAMES.items()}
_ALIASES = {"k_euler": "euler", "k_euler_a": "euler_a", "k_dpmpp_2m": "dpmpp_2m"}
_HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]+\]$")  # "model [abc123]" titles


class ProcessingRequest(BaseModel):
    """The fields A1111's txt2img and img2img share that genserve honours; other fields that
    clients send with their default values are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = Field(-1, ge=-1, description="-1: random")
    steps: int = Field(20, ge=1)
    cfg_scale: float = 7.0
    width: int | None = Field(None, description="Pixels; the model's native width if omitted.")
    height: int | None = Field(None, description="Pixels; the model's native height if omitted.")
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    override_settings: dict[str, Any] | None = None
    force_task_id: str | None = Field(None, max_length=100, description="The id_task for /progress.")
    send_images: bool = True
    restore_faces: bool | None = False
    tiling: bool | None = False
    script_name: str | None = None


class Txt2ImgRequest(ProcessingRequest, HiresFields):
    """A1111's StableDiffusionProcessingTxt2Img: the shared fields, hires fix and refiner."""


class Img2ImgRequest(ProcessingRequest, Img2ImgFields):
    """A1111's StableDiffusionProcessingImg2Img: the shared fields, init_images, mask and its options."""


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None
    current_task: str | None = None
    queued: bool = False
    completed: bool = False


class CallerOptions:
    """The model each caller chose with POST /options; in this process (one API replica)."""

    def __init__(self) -> None:
        self._models: dict[str, str] = {}
        self._lock = threading.Lock()

    def get(self, caller: str) -> str | None:
        with self._lock:
            return self._models.get(caller)

    def set(self, caller: str, model: str) -> None:
        with self._lock:
            self._models[caller] = model


def _caller(request: Request, principal: Principal, client_id: str | None) -> str:
    if principal.authenticated:
        return f"key:{principal.key_id}"
    if client_id:
        return f"client:{client_id}"
    return f"addr:{request.client.host if request.client else '-'}"


def _options(request: Request) -> CallerOptions:
    state = request.app.state
    if not hasattr(state, "a1111_options"):
        state.a1111_options = CallerOptions()
    return state.a1111_options


def _model_name(title: str) -> str:
    return _HASH_SUFFIX.sub("", title.strip())


def _sampler(name: str | None, scheduler: str | None) -> str:
    key = (name or "Euler").strip().lower()
    sampler = _FROM_A1111.get(key) or _ALIASES.get(key) or (key if key in A1111_SAMPLER_NAMES else None)
    if sampler is None:
        names = ", ".join(A1111_SAMPLER_NAMES.values())
        raise LimitError("sampler_name", f"sampler '{name}' is not available; use one of: {names}")
    schedule = (scheduler or "automatic").strip().lower()
    if schedule == "karras" and sampler in ("dpmpp_2m", "dpmpp_2m_karras"):
        return "dpmpp_2m_karras"
    if schedule not in ("automatic", "karras"):
        raise LimitError("scheduler", f"scheduler '{scheduler}' is not available; use automatic or karras")
    if schedule == "karras" and sampler != "dpmpp_2m_karras":
        raise LimitError("scheduler", f"the karras scheduler is available with DPM++ 2M only, not '{name}'")
    return sampler


def _unsupported(body: ProcessingRequest) -> None:
    for field, what in (
        ("restore_faces", "face restoration"),
        ("tiling", "tiling"),
    ):
        if getattr(body, field):
            raise LimitError(field, f"{what} ({field}) is not supported by genserve")
    if body.script_name:
        raise LimitError("script_name", "scripts are not supported by genserve")


def _job_body(
    body: ProcessingRequest, model: str | None, task_id: str, upscalers: Collection[str] = ()
) -> JobCreate:
    _unsupported(body)
    if isinstance(body, Img2ImgRequest):
        extra = img2img_fields(body)
    else:
        assert isinstance(body, Txt2ImgRequest)
        extra = hires_fields(body, _sampler, _model_name, upscalers)
    extra.update(controlnet_fields(body.model_extra or {}, extra.get("init_image")))
    try:
        return _to_job(body, model, task_id, extra)
    except ValidationError as error:
        errors = error.errors(include_url=False, include_context=False)
        for item in errors:  # the name the client sent: denoising_strength, not strength
            item["loc"] = ("body", *(A1111_FIELDS.get(str(part), part) for part in item["loc"]))
        raise RequestValidationError(errors) from None


def _to_job(body: ProcessingRequest, model: str | None, task_id: str, extra: dict[str, Any]) -> JobCreate:
    return JobCreate(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        model=model,
        seed=None if body.seed < 0 else body.seed,
        steps=body.steps,
        cfg_scale=body.cfg_scale,
        width=body.width,
        height=body.height,
        sampler=_sampler(body.sampler_name or body.sampler_index, body.scheduler),
        num_images=body.batch_size * body.n_iter,
        request_id=TASK_PREFIX + task_id,
        **extra,
    )


def _info(job: JobRecord, task_id: str) -> dict[str, Any]:
    """A1111's `info` object; `infotexts` holds each image's parameter string."""
    params = GenerationParams.model_validate(job.params)
    extra = extra_parameters(params)
    count = params.num_images
    seeds = [params.seed + index for index in range(count)]
    return {
        "prompt": params.prompt,
        "all_prompts": [params.prompt] * count,
        "negative_prompt": params.negative_prompt,
        "all_negative_prompts": [params.negative_prompt] * count,
        "seed": params.seed,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * count,
        "subseed_strength": 0,
        "width": params.width,
        "height": params.height,
        "sampler_name": A1111_SAMPLER_NAMES.get(params.sampler, params.sampler),
        "cfg_scale": params.cfg_scale,
        "steps": params.steps,
        "batch_size": count,
        "restore_faces": False,
        "sd_model_name": params.model,
        "sd_model_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "index_of_first_image": 0,
        "infotexts": [a1111_parameters(params, seed=seed, model_name=params.model or "") for seed in seeds],
        "styles": [],
        "job_timestamp": job.created_at.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1,
        "denoising_strength": extra.get("Denoising strength"),
        "extra_generation_params": extra,
        "is_using_inpainting_conditioning": False,
        "version": f"genserve {__version__}",
        "id_task": task_id,
        "job_id": job.id,
        "interrupted": job.state == JobState.canceled,
    }


@router.post("/txt2img", operation_id="a1111_txt2img")
async def txt2img(
    body: Txt2ImgRequest,
    request: Request,
    services: ServicesDep,
    principal: PrincipalDep,
    client_id: ClientId = None,
    traceparent: Annotated[str | None, Header(alias="traceparent")] = None,
) -> JSONResponse:
    """Generate images and answer when they are done, with A1111's `images`, `parameters`, `info`.
    `enable_hr` with its `hr_*` fields and `refiner_checkpoint` map onto hires and refiner."""
    return await _process(body, request, services, principal, client_id, traceparent, body.model_dump())


@router.post("/img2img", operation_id="a1111_img2img")
async def img2img(
    body: Img2ImgRequest,
    request: Request,
    services: ServicesDep,
    principal: PrincipalDep,
    client_id: ClientId = None,
    traceparent: Annotated[str | None, Header(alias="traceparent")] = None,
) -> JSONResponse:
    """Change a picture (`init_images`, `denoising_strength`, `resize_mode`), or inpaint where the
    `mask` is white (or opaque), with A1111's mask options. Answers as txt2img does."""
    parameters = body.model_dump()
    if not body.include_init_images:  # as A1111: do not send the pictures back
        parameters.update(init_images=None, mask=None)
    return await _process(body, request, services, principal, client_id, traceparent, parameters)


async def _process(
    body: ProcessingRequest,
    request: Request,
    services: Any,
    principal: Principal,
    client_id: str | None,
    traceparent: str | None,
    parameters: dict[str, Any],
) -> JSONResponse:
    override = (body.override_settings or {}).get("sd_model_checkpoint")
    chosen = override or _options(request).get(_caller(request, principal, client_id))
    task_id = body.force_task_id or uuid.uuid4().hex
    upscalers = [n for n, i in registered_upscalers(services.settings).items() if i.kind == "upscaler"]
    job_body = _job_body(body, _model_name(chosen) if chosen else None, task_id, upscalers)
    trace_id = trace_id_from(traceparent)
    try:
        job, _ = await run_in_threadpool(submit_as, principal, job_body, services, client_id, trace_id)
    except LimitError as error:  # named as the client sent it
        raise LimitError(A1111_FIELDS.get(error.field, error.field), error.message) from None
    done = await wait_for_job(request, services.store, job.id, services.settings.compat_timeout_seconds)
    if done is None:
        raise HTTPException(500, f"job {job.id} disappeared from the store")
    if done.state == JobState.failed:
        raise HTTPException(500, f"generation failed: {done.error}")
    images = [image_b64(services.images, image_id) for image_id in done.image_ids] if body.send_images else []
    headers = {"X-Trace-Id": done.trace_id or trace_id, "X-Job-Id": done.id}
    content = {"images": images, "parameters": parameters, "info": json.dumps(_info(done, task_id))}
    return JSONResponse(content, headers=headers)


@router.get("/progress", response_model=ProgressResponse, operation_id="a1111_progress")
def progress(
    request: Request,
    services: ServicesDep,
    principal: PrincipalDep,
    client_id: ClientId = None,
    id_task: Annotated[
        str | None, Query(max_length=100, description="force_task_id of a txt2img call")
    ] = None,
    skip_current_image: bool = False,
) -> ProgressResponse:
    """Progress of a task (by id_task), else of the caller's current job, with the latest preview."""
    job = _task_job(services, principal, id_task) if id_task else _current_job(services, principal, client_id)
    if job is None:
        if id_task:
            raise HTTPException(404, f"task {id_task} not found")
        return ProgressResponse(progress=0.0, eta_relative=0.0, state=ProgressState())
    return _progress_of(services, job, skip_current_image)


def _task_job(services: Any, principal: Principal, id_task: str) -> JobRecord | None:
    request_id = principal.scoped_request_id(TASK_PREFIX + id_task)
    with services.store.engine.connect() as conn:
        job = JobStore._find_request(conn, request_id)
    return job if job is not None and principal.owns(job) else None


def _current_job(services: Any, principal: Principal, client_id: str | None) -> JobRecord | None:
    owner = principal.client_id(client_id)
    for state in (JobState.running, JobState.queued):
        jobs, _ = services.store.list_jobs(limit=50, state=state, client_id=owner)
        mine = [job for job in jobs if principal.owns(job) and _is_task(job, principal)]
        if mine:
            return mine[-1] if state == JobState.queued else mine[0]
    return None


def _is_task(job: JobRecord, principal: Principal) -> bool:
    return (principal.public_request_id(job.request_id) or "").startswith(TASK_PREFIX)


def _progress_of(services: Any, job: JobRecord, skip_image: bool) -> ProgressResponse:
    steps = job.params["steps"]  # until the first progress event says how many run (img2img: fewer)
    step, eta, image = 0, 0.0, None
    for event in services.store.events.read_after(job.id, 0):
        if event.type == "progress":
            step, eta = event.data["step"], event.data.get("eta_s", 0.0)
            steps = event.data.get("steps", steps)
        elif event.type == "preview" and event.data.get("images"):
            image = event.data["images"][0]
    terminal = job.state.is_terminal
    fraction = 1.0 if terminal else step / steps
    state = ProgressState(
        interrupted=job.state == JobState.canceled,
        job=job.id,
        job_count=0 if terminal else 1,
        job_timestamp=job.created_at.strftime("%Y%m%d%H%M%S"),
        sampling_step=steps if job.state == JobState.succeeded else step,
        sampling_steps=steps,
    )
    position = services.store.queue_position(job.id) if job.state == JobState.queued else None
    textinfo = f"Waiting... ({position} ahead)" if position is not None else ("Done" if terminal else None)
    return ProgressResponse(
        progress=round(fraction, 4),
        eta_relative=0.0 if terminal else eta,
        state=state,
        current_image=None if skip_image or image is None else data_url_payload(image),
        textinfo=textinfo,
        current_task=job.request_id.split(TASK_PREFIX, 1)[-1] if job.request_id else None,
        queued=job.state == JobState.queued,
        completed=terminal,
    )


@router.post("/interrupt", operation_id="a1111_interrupt")
def interrupt(services: ServicesDep, principal: PrincipalDep, client_id: ClientId = None) -> dict:
    """Stop the caller's running txt2img jobs at their next step (never another caller's)."""
    jobs, _ = services.store.list_jobs(
        limit=200, state=JobState.running, client_id=principal.client_id(client_id)
    )
    stopped = [job.id for job in jobs if principal.owns(job) and _is_task(job, principal)]
    for job_id in stopped:
        services.store.request_cancel(job_id)
    return {"interrupted": stopped}


@router.post("/skip", operation_id="a1111_skip")
def skip(services: ServicesDep, principal: PrincipalDep, client_id: ClientId = None) -> dict:
    """As interrupt: genserve runs each txt2img call as one job."""
    return interrupt(services, principal, client_id)


@router.get("/sd-models", operation_id="a1111_sd_models")
def sd_models(services: ServicesDep, principal: PrincipalDep) -> list[dict]:
    allowed = principal.limits.allowed_models
    return [
        {
            "title": info.name,
            "model_name": info.name,
            "hash": None,
            "sha256": None,
            "filename": info.path.name,
            "config": None,
        }
        for info in sorted(services.catalog.models().values(), key=lambda m: m.name)
        if allowed is None or info.name in allowed
    ]


@router.get("/loras", operation_id="a1111_loras")
def loras(services: ServicesDep, principal: PrincipalDep) -> list[dict]:
    """The LoRAs this caller may name in `<lora:name:weight>`, in A1111's shape."""
    allowed = principal.limits.allowed_loras
    return [
        {
            "name": info.name,
            "alias": info.name,
            "path": info.path.name,  # the file name only: where it lives is the server's business
            "metadata": {"family": info.family, "format": info.format, "supported": info.supported},
        }
        for info in sorted(registered_loras(services.settings).values(), key=lambda lora: lora.name)
        if allowed is None or info.name in allowed
    ]


@router.get("/scripts", operation_id="a1111_scripts")
def scripts() -> dict:
    """The ControlNet extension (alwayson_scripts.controlnet), as clients probe for it."""
    return {"txt2img": SCRIPT_NAMES, "img2img": SCRIPT_NAMES}


@router.get("/samplers", operation_id="a1111_samplers")
def samplers() -> list[dict]:
    return [
        {"name": name, "aliases": [sampler, f"k_{sampler}"], "options": {}}
        for sampler, name in A1111_SAMPLER_NAMES.items()
    ]


@router.get("/schedulers", operation_id="a1111_schedulers")
def schedulers() -> list[dict]:
    return [
        {
            "name": "automatic",
            "label": "Automatic",
            "aliases": None,
            "default_rho": -1,
            "need_inner_model": False,
        },
        {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False},
    ]


@router.get("/options", operation_id="a1111_get_options")
def get_options(
    request: Request, services: ServicesDep, principal: PrincipalDep, client_id: ClientId = None
) -> dict:
    """The caller's options: its model (or the default model), and genserve's fixed settings."""
    model = _options(request).get(_caller(request, principal, client_id)) or services.settings.default_model
    return {
        "sd_model_checkpoint": model,
        "sd_checkpoint_hash": None,
        "samples_format": "png",
        "CLIP_stop_at_last_layers": 1,
        "eta_noise_seed_delta": 0,
    }


@router.post("/options", operation_id="a1111_set_options")
def set_options(
    request: Request,
    services: ServicesDep,
    principal: PrincipalDep,
    options: Annotated[dict[str, Any], Body()],
    client_id: ClientId = None,
) -> dict:
    """Set this caller's model (`sd_model_checkpoint`); it never changes another caller's. Other
    options are not settable and are listed back as ignored."""
    applied = {}
    if "sd_model_checkpoint" in options:
        model = _model_name(str(options["sd_model_checkpoint"]))
        models = services.catalog.models()
        allowed = principal.limits.allowed_models
        if model not in models or (allowed is not None and model not in allowed):
            raise LimitError(
                "sd_model_checkpoint", f"model '{model}' is not available; see /sdapi/v1/sd-models"
            )
        _options(request).set(_caller(request, principal, client_id), model)
        applied["sd_model_checkpoint"] = model
    return {"applied": applied, "ignored": sorted(set(options) - set(applied))}

"""The OpenAI Images API: POST /v1/images/generations and /v1/images/edits, as the official `openai`
clients call them.

genserve's extensions ride along in the same body (`negative_prompt`, `seed`, `steps`, `cfg_scale`,
`sampler`; `strength` for edits). Errors on these routes use OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, so the clients raise their usual exceptions
(BadRequestError, RateLimitError, ...).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from genserve.api.compat import ImageFormat, convert_image, data_url_payload, image_b64, wait_for_job
from genserve.api.deps import ServicesDep
from genserve.api.forms import FORM_SLACK_BYTES, form_file, read_form, read_upload
from genserve.api.openai_pictures import MASKED_STRENGTH, UNMASKED_STRENGTH, edit_pictures
from genserve.api.submission import trace_id_from
from genserve.auth.deps import PrincipalDep, submit_as
from genserve.auth.limits import QuotaExceeded, RateLimited
from genserve.scheduler.cost import steps_run
from genserve.schemas import JobCreate, JobState, LimitError
from genserve.schemas.generation import MAX_SEED, SamplerName
from genserve.schemas.image_inputs import InpaintOptions
from genserve.store.jobs import JobRecord, JobStore

router = APIRouter(tags=["openai"])

_EDIT_FORM = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image", "prompt"],
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "mask": {"type": "string", "format": "binary"},
                        "prompt": {"type": "string"},
                        "n": {"type": "integer"},
                        "size": {"type": "string"},
                        "response_format": {"type": "string", "enum": ["b64_json", "url"]},
                        "strength": {"type": "number"},
                    },
                }
            }
        },
    }
}

PATH = "/v1/images/generations"
EDITS_PATH = "/v1/images/edits"
OPENAI_PATHS = (PATH, EDITS_PATH)
_SIZE_FIELDS = {"width", "height"}
_PARAMS = {"num_images": "n", "init_image": "image"}  # genserve field -> OpenAI parameter


class OpenAIError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, type: str = ""
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status, headers=headers)


class ImageRequest(BaseModel):
    """OpenAI's fields that generations and edits share, then genserve's extensions. Unknown fields
    are refused, as OpenAI does."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    prompt: str = Field(..., min_length=1)
    model: str | None = Field(None, description="A model from GET /v1/models; the default model if omitted.")
    n: int | None = Field(1, ge=1, le=10, description="Images to generate.")
    size: str | None = Field("auto", description="WIDTHxHEIGHT in multiples of 8, or auto (native size).")
    response_format: Literal["b64_json", "url"] | None = Field("b64_json")
    output_format: ImageFormat | None = Field("png")
    output_compression: int | None = Field(None, ge=0, le=100, description="JPEG/WebP quality (100: best).")
    user: str | None = Field(None, max_length=200, description="End-user id; the fair-share identity.")
    safety_identifier: str | None = Field(None, max_length=200, description="As `user`.")
    quality: Literal["auto", "low", "medium", "high", "standard", "hd"] | None = Field(
        None, description="Accepted and ignored: use steps."
    )
    background: Literal["auto", "opaque", "transparent"] | None = Field(
        None, description="Only opaque backgrounds are drawn."
    )
    stream: bool | None = Field(False, description="Stream partial images as server-sent events.")
    partial_images: int | None = Field(None, ge=0, le=3, description="Partial images to stream (0-3).")
    negative_prompt: str = Field("", description="genserve: what to steer away from.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="genserve: image i uses seed+i.")
    steps: int = Field(20, ge=1, description="genserve: denoising steps.")
    cfg_scale: float | None = Field(
        None, description="genserve: classifier-free guidance scale (the model's default if omitted)."
    )
    sampler: SamplerName = Field("euler", description="genserve: sampler name.")


class ImageGenerationRequest(ImageRequest):
    style: Literal["vivid", "natural"] | None = Field(None, description="Accepted and ignored.")
    moderation: Literal["auto", "low"] | None = Field(None, description="Accepted and ignored.")


class ImageEditRequest(ImageRequest):
    """The text fields of an edit's multipart form; `image` and `mask` are its files."""

    input_fidelity: Literal["high", "low"] | None = Field(None, description="Accepted and ignored.")
    strength: float | None = Field(
        None,
        gt=0,
        le=1,
        description="genserve: how much to change; 1.0 where a mask (or transparency) marks the edit, "
        "else 0.75.",
    )


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: ImageFormat
    size: str
    quality: str = "auto"
    background: str = "opaque"


def _size(text: str | None) -> tuple[int | None, int | None]:
    if text in (None, "auto"):
        return None, None
    width, _, height = text.lower().partition("x")
    if not (width.isdigit() and height.isdigit()):
        raise OpenAIError(
            400, f"Invalid size '{text}': use WIDTHxHEIGHT (for example 512x512) or auto", "size"
        )
    return int(width), int(height)


def _job_body(body: ImageRequest, preview_every: int, pictures: dict[str, Any] | None = None) -> JobCreate:
    if body.background == "transparent":
        raise OpenAIError(
            400, "background 'transparent' is not supported: genserve draws opaque images", "background"
        )
    width, height = _size(body.size)
    try:
        return JobCreate(
            prompt=body.prompt,
            negative_prompt=body.negative_prompt,
            model=body.model,
            seed=body.seed,
            steps=body.steps,
            cfg_scale=body.cfg_scale,
            width=width,
            height=height,
            sampler=body.sampler,
            num_images=body.n or 1,
            preview_every=preview_every,
            **(pictures or {}),
        )
    except ValidationError as error:
        item = error.errors()[0]
        field = str(item["loc"][-1]) if item["loc"] else None
        if field in _SIZE_FIELDS:
            raise OpenAIError(
                400, f"Invalid size '{body.size}': {field} {item['msg'].lower()}", "size"
            ) from None
        raise OpenAIError(400, f"Invalid value for '{field}': {item['msg']}", field) from None


def _limit_error(error: LimitError, body: ImageRequest) -> OpenAIError:
    if error.field in _SIZE_FIELDS:
        model = body.model or "the default model"
        return OpenAIError(400, f"size '{body.size}' is not supported for {model}: {error.message}", "size")
    param = _PARAMS.get(error.field, error.field)
    code = "model_not_found" if error.field == "model" else "invalid_value"
    return OpenAIError(400, error.message, param, code)


def _preview_cadence(body: ImageRequest, strength: float | None = None) -> int:
    """Previews only when streaming partial images: spread so there are about `partial_images` over
    the steps that run (an edit at `strength` runs int(steps × strength) of them)."""
    if not body.stream or not body.partial_images:
        return 0
    return max(1, steps_run(body.steps, strength) // (body.partial_images + 1))


def _submit(
    principal: Any,
    body: ImageRequest,
    services: Any,
    client_id: str | None,
    trace_id: str,
    pictures: dict[str, Any] | None = None,
) -> JobRecord:
    strength = pictures["strength"] if pictures and pictures.get("init_image") else None
    job_body = _job_body(body, _preview_cadence(body, strength), pictures)
    try:
        job, _ = submit_as(
            principal, job_body, services, body.safety_identifier or body.user or client_id, trace_id
        )
    except LimitError as error:
        raise _limit_error(error, body) from None
    return job


@router.post(
    PATH,
    operation_id="openai_create_image",
    response_model=ImagesResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE with stream: true"}},
)
async def create_image(
    body: ImageGenerationRequest,
    request: Request,
    services: ServicesDep,
    principal: PrincipalDep,
    client_id: Annotated[str | None, Header(alias="X-Client-Id", max_length=200)] = None,
    traceparent: Annotated[str | None, Header(alias="traceparent")] = None,
) -> Any:
    """Generate images (OpenAI Images API). Blocks until done, or streams with `stream: true`."""
    trace_id = trace_id_from(traceparent)
    job = await run_in_threadpool(_submit, principal, body, services, client_id, trace_id)
    return await _answer(request, services, job, body, trace_id, "image_generation")


@router.post(
    EDITS_PATH,
    operation_id="openai_edit_image",
    response_model=ImagesResponse,
    openapi_extra=_EDIT_FORM,
    responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE with stream: true"}},
)
async def edit_image(
    request: Request,
    services: ServicesDep,
    principal: PrincipalDep,
    client_id: Annotated[str | None, Header(alias="X-Client-Id", max_length=200)] = None,
    traceparent: Annotated[str | None, Header(alias="traceparent")] = None,
) -> Any:
    """Edit a picture (multipart: `image`, optional `mask` whose TRANSPARENT pixels mark the edit,
    `prompt`, ...): inpainting where a mask or the image's own transparency says, else img2img."""
    limits = services.settings.limits
    image, mask, body = await _edit_form(request, limits.max_upload_bytes)
    try:
        stored = await run_in_threadpool(edit_pictures, image, mask, services.inputs, limits)
    except LimitError as error:
        raise _limit_error(error, body) from None
    pictures: dict[str, Any] = {
        "init_image": stored.init_image,
        "mask": stored.mask,
        "strength": body.strength or (MASKED_STRENGTH if stored.mask else UNMASKED_STRENGTH),
        # transparent pixels carry no colour worth keeping: start the masked area from its surroundings
        "inpaint": InpaintOptions(fill="fill") if stored.mask else None,
    }
    trace_id = trace_id_from(traceparent)
    job = await run_in_threadpool(_submit, principal, body, services, client_id, trace_id, pictures)
    return await _answer(request, services, job, body, trace_id, "image_edit")


async def _edit_form(request: Request, max_bytes: int) -> tuple[bytes, bytes | None, ImageEditRequest]:
    """The edit's image, mask and text fields, read with a byte cap; OpenAI errors naming the field."""
    try:
        form = await read_form(request, 2 * max_bytes + FORM_SLACK_BYTES, "image")
        files = [*form.getlist("image"), *form.getlist("image[]")]
        if len(files) > 1:
            raise OpenAIError(400, "genserve edits one image per request; send one image", "image")
        image = await read_upload(files[0] if files else None, "image", max_bytes)
        mask = await form_file(form, "mask", max_bytes, required=False)
    except HTTPException as error:
        detail = error.detail[0] if isinstance(error.detail, list) else {"msg": str(error.detail)}
        param = str(detail.get("loc", ["", "image"])[-1]) if detail.get("loc") else None
        raise OpenAIError(error.status_code, detail["msg"], param) from None
    fields = {key: value for key, value in form.multi_items() if key not in ("image", "image[]", "mask")}
    try:
        body = ImageEditRequest.model_validate(fields)
    except ValidationError as error:
        raise RequestValidationError(error.errors(include_url=False, include_context=False)) from None
    return image, mask, body


async def _answer(
    request: Request, services: Any, job: JobRecord, body: ImageRequest, trace_id: str, kind: str
) -> Any:
    """The finished job in OpenAI's shape, or its events as `<kind>.partial_image` / `.completed`."""
    headers = {"X-Trace-Id": job.trace_id or trace_id, "X-Job-Id": job.id}
    output_format = body.output_format or "png"
    if body.stream:
        events = _stream(services.store, services.images, job, body, output_format, kind)
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
    done = await wait_for_job(request, services.store, job.id, services.settings.compat_timeout_seconds)
    _raise_unless_succeeded(done)
    if body.response_format == "url":
        query = "" if output_format == "png" else f"?format={output_format}"
        if output_format != "png" and body.output_compression is not None:
            query += f"&quality={body.output_compression}"
        base = str(request.base_url).rstrip("/")
        data = [ImageData(url=f"{base}/v1/images/{image_id}{query}") for image_id in done.image_ids]
    else:
        data = [
            ImageData(b64_json=image_b64(services.images, image_id, output_format, body.output_compression))
            for image_id in done.image_ids
        ]
    response = ImagesResponse(
        created=int(done.created_at.timestamp()), data=data, output_format=output_format, size=_size_of(done)
    )
    return JSONResponse(response.model_dump(exclude_none=True), headers=headers)


def _size_of(job: JobRecord) -> str:
    return f"{job.params['width']}x{job.params['height']}"


def _raise_unless_succeeded(job: JobRecord | None) -> None:
    if job is None:
        raise OpenAIError(500, "the job disappeared from the store")
    if job.state == JobState.failed:
        raise OpenAIError(500, f"image generation failed: {job.error}")
    if job.state == JobState.canceled:
        raise OpenAIError(409, "image generation was canceled", code="canceled")


def _sse(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"


async def _stream(
    store: JobStore,
    images: Any,
    job: JobRecord,
    body: ImageRequest,
    output_format: ImageFormat,
    kind: str = "image_generation",
) -> AsyncIterator[str]:
    """genserve's preview events as <kind>.partial_image, then one <kind>.completed per image
    (kind: image_generation or image_edit); a failure ends the stream with an `error` event."""
    common = {
        "background": "opaque",
        "quality": "auto",
        "output_format": output_format,
        "size": _size_of(job),
    }
    last_seq, partials = 0, 0
    size = (job.params["width"], job.params["height"])  # previews come smaller or larger
    while True:
        events = await run_in_threadpool(store.events.read_after, job.id, last_seq)
        for event in events:
            last_seq = event.seq
            if event.type == "preview" and partials < (body.partial_images or 0):
                jpeg = base64.b64decode(data_url_payload(event.data["images"][0]))
                partial = base64.b64encode(convert_image(jpeg, output_format, body.output_compression, size))
                yield _sse(
                    {
                        **common,
                        "type": f"{kind}.partial_image",
                        "b64_json": partial.decode("ascii"),
                        "created_at": int(time.time()),
                        "partial_image_index": partials,
                    }
                )
                partials += 1
            elif event.type in ("succeeded", "failed", "canceled"):
                done = await run_in_threadpool(store.get, job.id)
                if done is None or done.state != JobState.succeeded:
                    message = (done.error if done else None) or f"image generation {event.type}"
                    yield f"event: error\ndata: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n"
                    return
                for image_id in done.image_ids:
                    yield _sse(
                        {
                            **common,
                            "type": f"{kind}.completed",
                            "b64_json": image_b64(images, image_id, output_format, body.output_compression),
                            "created_at": int(time.time()),
                            "usage": _NO_TOKENS,
                        }
                    )
                return
        if not events:
            await anyio.sleep(0.05)


_NO_TOKENS = {
    "input_tokens": 0,
    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
    "output_tokens": 0,
    "total_tokens": 0,
}


# -- errors in OpenAI's shape, on this route only -----------------------------------------------------


def install_error_shape(app: FastAPI) -> None:
    """Answer errors on the OpenAI routes in OpenAI's shape; other routes keep theirs.

    Call after the app's own handlers are registered: each one is wrapped, not replaced.
    """

    def wrap(exception: type[Exception], convert: Any) -> None:
        previous = app.exception_handlers.get(exception)

        async def handler(request: Request, error: Exception) -> Any:
            if request.url.path in OPENAI_PATHS or previous is None:
                converted, headers = convert(error)
                return converted.response(headers)
            return await previous(request, error)

        app.add_exception_handler(exception, handler)

    async def openai_error(request: Request, error: OpenAIError) -> JSONResponse:
        return error.response()

    app.add_exception_handler(OpenAIError, openai_error)
    wrap(StarletteHTTPException, _from_http)
    wrap(RequestValidationError, _from_validation)
    wrap(RateLimited, _from_rate_limit)


def _from_http(error: StarletteHTTPException) -> tuple[OpenAIError, dict | None]:
    codes = {401: "invalid_api_key", 403: "permission_denied", 404: "not_found"}
    message = error.detail if isinstance(error.detail, str) else json.dumps(error.detail)
    types = {401: "authentication_error", 403: "permission_error"}
    return OpenAIError(
        error.status_code, message, None, codes.get(error.status_code), types.get(error.status_code, "")
    ), error.headers


def _from_validation(error: RequestValidationError) -> tuple[OpenAIError, None]:
    item = error.errors()[0]
    loc = [str(part) for part in item.get("loc", ()) if part != "body"]
    param = loc[-1] if loc else None
    if item.get("type") == "extra_forbidden":
        return OpenAIError(
            400, f"Unrecognized request argument supplied: {param}", param, "unknown_parameter"
        ), None
    if not loc:
        return OpenAIError(400, f"Invalid request body: {item.get('msg')}"), None
    return OpenAIError(400, f"Invalid value for '{param}': {item.get('msg')}", param, "invalid_value"), None


def _from_rate_limit(error: RateLimited) -> tuple[OpenAIError, dict]:
    code = "insufficient_quota" if isinstance(error, QuotaExceeded) else "rate_limit_exceeded"
    return OpenAIError(429, error.message, None, code, "rate_limit_error"), {
        "Retry-After": str(error.retry_after)
    }

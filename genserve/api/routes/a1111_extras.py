"""AUTOMATIC1111's "Extras" API: `/sdapi/v1/upscalers`, `/extra-single-image` and
`/extra-batch-images`. Each picture becomes an upscale job (kind "upscale", worker/upscale.py), so
it queues and shows its progress like any job; the route waits for it and answers in A1111's shape.

Supported: resize_mode 0 (upscaling_resize) and 1 (upscaling_resize_w/h, with upscaling_crop),
upscaler_1 (a model, or "Lanczos"/"Nearest"/"None"), gfpgan_visibility (the first GFPGAN face
restorer, else any), codeformer_visibility (a CodeFormer restorer, only if the operator installed
one), upscale_first. A second upscaler blended in (upscaler_2 with extras_upscaler_2_visibility > 0)
is refused with 422.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import PIL.Image
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from genserve.api.compat import wait_for_job
from genserve.api.deps import ServicesDep
from genserve.api.routes.a1111 import ClientId
from genserve.api.upscale_submission import registered_upscalers, submit_upscale
from genserve.auth.deps import Principal, PrincipalDep
from genserve.schemas import JobState, LimitError
from genserve.schemas.upscale import FaceRestoreOptions, UpscaleJobCreate, UpscaleOptions

router = APIRouter(prefix="/sdapi/v1", tags=["automatic1111"])

_RESAMPLERS = {"lanczos": "lanczos", "nearest": "nearest"}
_WAIT_SECONDS = 600.0


class ExtrasRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    resize_mode: int = Field(0, ge=0, le=1)
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(0, ge=0, le=1)
    codeformer_visibility: float = Field(0, ge=0, le=1)
    codeformer_weight: float = Field(0, ge=0, le=1)
    upscaling_resize: float = Field(2, gt=0, le=8)
    upscaling_resize_w: int = Field(512, ge=1)
    upscaling_resize_h: int = Field(512, ge=1)
    upscaling_crop: bool = True
    upscaler_1: str | None = "None"
    upscaler_2: str | None = "None"
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1)
    upscale_first: bool = False


class ExtrasSingleRequest(ExtrasRequest):
    image: str = Field(..., min_length=1, description="base64 or a data URL")


class ImageItem(BaseModel):
    data: str = Field(..., min_length=1)
    name: str = ""


class ExtrasBatchRequest(ExtrasRequest):
    imageList: list[ImageItem] = Field(..., min_length=1, max_length=32)  # noqa: N815 (A1111's name)


@router.get("/upscalers", operation_id="a1111_upscalers")
def upscalers(services: ServicesDep, principal: PrincipalDep) -> list[dict[str, Any]]:
    """A1111's built-in names, then the upscaler models (kind 'upscaler' in /v1/models)."""
    rows: list[dict[str, Any]] = [
        {"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
        for name in ("None", "Lanczos", "Nearest")
    ]
    for info in sorted(registered_upscalers(services.settings).values(), key=lambda i: i.name):
        if info.kind == "upscaler":
            rows.append({"name": info.name, "model_name": info.architecture, "model_path": info.path.name,
                         "model_url": None, "scale": info.scale})  # fmt: skip
    return rows


@router.post("/extra-single-image", operation_id="a1111_extra_single_image")
async def extra_single_image(
    body: ExtrasSingleRequest,
    request: Request,
    services: ServicesDep,
    principal: PrincipalDep,
    client_id: ClientId = None,
) -> dict[str, Any]:
    [image] = await _run(request, services, principal, client_id, body, [body.image])
    return {"html_info": "", "image": image}


@router.post("/extra-batch-images", operation_id="a1111_extra_batch_images")
async def extra_batch_images(
    body: ExtrasBatchRequest,
    request: Request,
    services: ServicesDep,
    principal: PrincipalDep,
    client_id: ClientId = None,
) -> dict[str, Any]:
    images = await _run(request, services, principal, client_id, body, [item.data for item in body.imageList])
    return {"html_info": "", "images": images}


async def _run(
    request: Request,
    services: Any,
    principal: Principal,
    client_id: str | None,
    body: ExtrasRequest,
    pictures: list[str],
) -> list[str]:
    jobs = []
    for picture in pictures:  # queued together, so one worker can take them back to back
        create = _job_body(body, picture, services)
        job, _ = await run_in_threadpool(
            submit_upscale,
            create,
            services.settings,
            services.store,
            services.inputs,
            principal.client_id(client_id),
        )
        jobs.append(job)
    out = []
    for job in jobs:
        done = await wait_for_job(request, services.store, job.id, _WAIT_SECONDS)
        if done is None or done.state != JobState.succeeded or not done.image_ids:
            raise LimitError(
                "image",
                f"upscale job {job.id} {done.state if done else 'vanished'}: {done.error if done else ''}",
            )
        png = services.images.path(done.image_ids[0]).read_bytes()
        out.append(base64.b64encode(_fit(png, body)).decode())
    return out


def _job_body(body: ExtrasRequest, picture: str, services: Any) -> UpscaleJobCreate:
    if body.upscaler_2 not in (None, "None") and body.extras_upscaler_2_visibility > 0:
        raise LimitError("upscaler_2", "a second upscaler blended in (upscaler_2) is not supported")
    scale = body.upscaling_resize
    if body.resize_mode == 1:
        width, height = _size_of(picture)
        scale = max(body.upscaling_resize_w / width, body.upscaling_resize_h / height)
    upscale = None
    name = body.upscaler_1 or "None"
    if name != "None" and scale > 1:
        upscale = UpscaleOptions(model=_RESAMPLERS.get(name.lower(), name), scale=min(scale, 8.0))
    face_restore = None
    if body.gfpgan_visibility > 0 or body.codeformer_visibility > 0:
        face_restore = _face_restorer(body, services)
    if (
        upscale is None and face_restore is None
    ):  # A1111 returns the picture as it is; so do we, through a 1x job
        upscale = UpscaleOptions(model="lanczos", scale=1.0001)
    return UpscaleJobCreate(
        image=picture, upscale=upscale, face_restore=face_restore, upscale_first=body.upscale_first
    )


def _face_restorer(body: ExtrasRequest, services: Any) -> FaceRestoreOptions:
    restorers = [i for i in registered_upscalers(services.settings).values() if i.kind == "face_restorer"]
    if body.codeformer_visibility > 0:
        chosen = [i for i in restorers if i.architecture == "CodeFormer"]
        if not chosen:
            raise LimitError(
                "codeformer_visibility",
                "no CodeFormer model is installed (it is non-commercial; see docs/upscale.md)",
            )
        return FaceRestoreOptions(model=chosen[0].name, visibility=body.codeformer_visibility)
    chosen = sorted(restorers, key=lambda i: (i.architecture != "GFPGAN", i.name))
    if not chosen:
        raise LimitError("gfpgan_visibility", "no face restorer is installed in <models_dir>/upscale/")
    return FaceRestoreOptions(model=chosen[0].name, visibility=body.gfpgan_visibility)


def _size_of(picture: str) -> tuple[int, int]:
    payload = picture.split(",", 1)[1] if picture.startswith("data:") else picture
    try:
        with PIL.Image.open(io.BytesIO(base64.b64decode(payload))) as image:
            return image.size
    except Exception:
        raise LimitError("image", "image is not a base64-encoded picture") from None


def _fit(png: bytes, body: ExtrasRequest) -> bytes:
    """resize_mode 1: the exact upscaling_resize_w × h, centre-cropped (upscaling_crop) or stretched."""
    if body.resize_mode != 1:
        return png
    target = (body.upscaling_resize_w, body.upscaling_resize_h)
    with PIL.Image.open(io.BytesIO(png)) as image:
        if image.size == target:
            return png
        if body.upscaling_crop:
            scale = max(target[0] / image.width, target[1] / image.height)
            size = (max(target[0], round(image.width * scale)), max(target[1], round(image.height * scale)))
            left, top = (size[0] - target[0]) // 2, (size[1] - target[1]) // 2
            fitted = image.resize(size, PIL.Image.Resampling.LANCZOS).crop(
                (left, top, left + target[0], top + target[1])
            )
        else:
            fitted = image.resize(target, PIL.Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        fitted.save(buffer, format="PNG")
        return buffer.getvalue()

"""Upscale jobs and the upscaling options of image jobs, checked the way the worker runs them:
names of registered upscalers and face restorers (422 naming the field otherwise), the picture's
format and size, the output size, and the cost estimate. Torch-free."""

from __future__ import annotations

import hashlib
import json

from genserve.api.pictures import check_picture, decode_payload, stored_size
from genserve.artifacts.inputs import InputStore
from genserve.config import Settings
from genserve.engine.models.upscalers import UpscalerInfo, face_detectors, scan_upscalers
from genserve.engine.stages.plan import LATENT_UPSCALERS
from genserve.scheduler.cost import upscale_seconds
from genserve.scheduler.policy import classify
from genserve.schemas import LimitError
from genserve.schemas.image_inputs import is_image_hash
from genserve.schemas.upscale import FaceRestoreOptions, UpscaleJobCreate, UpscaleOptions, UpscaleParams
from genserve.store.jobs import JobRecord, JobStore

UPSCALE_KIND = "upscale"
MAX_OUTPUT_PIXELS = 8192 * 8192
_PIXEL_RESAMPLERS = ("lanczos", "nearest")


def registered_upscalers(settings: Settings) -> dict[str, UpscalerInfo]:
    return scan_upscalers(settings.models_dir, builtin=settings.builtin_models)


def check_upscaler(
    options: UpscaleOptions | None, upscalers: dict[str, UpscalerInfo], field: str = "upscale"
) -> None:
    if options is not None and options.model not in _PIXEL_RESAMPLERS:
        _check_name(options.model, "upscaler", upscalers, field)


def check_face_restore(
    options: FaceRestoreOptions | None, upscalers: dict[str, UpscalerInfo], settings: Settings
) -> None:
    if options is None:
        return
    _check_name(options.model, "face_restorer", upscalers, "face_restore")
    if not face_detectors(settings.models_dir):
        raise LimitError(
            "face_restore",
            "face restoration needs a face detector: the operator puts an OpenCV YuNet ONNX file in "
            "<models_dir>/facedetect/ (see docs/upscale.md)",
        )


def check_post_options(params: object, settings: Settings) -> None:
    """An image job's `upscale`, `face_restore` and hires model upscaler name registered models."""
    upscale, faces = getattr(params, "upscale", None), getattr(params, "face_restore", None)
    hires = getattr(params, "hires", None)
    model_hires = (
        hires is not None
        and hires.upscaler not in LATENT_UPSCALERS
        and hires.upscaler not in _PIXEL_RESAMPLERS
    )
    if upscale is None and faces is None and not model_hires:
        return
    upscalers = registered_upscalers(settings)
    check_upscaler(upscale, upscalers)
    check_face_restore(faces, upscalers, settings)
    if model_hires:
        _check_name(hires.upscaler, "upscaler", upscalers, "hires")


def _check_name(name: str, kind: str, upscalers: dict[str, UpscalerInfo], field: str) -> None:
    info = upscalers.get(name)
    if info is None or info.kind != kind:
        known = ", ".join(sorted(n for n, i in upscalers.items() if i.kind == kind)) or "none"
        what = kind.replace("_", " ")
        raise LimitError(field, f"{what} '{name}' is not registered (known: {known}); see GET /v1/models")


def store_image(
    body: UpscaleJobCreate, inputs: InputStore, settings: Settings
) -> tuple[UpscaleJobCreate, tuple[int, int]]:
    """The body with its picture stored (named by its hash), and the picture's size."""
    if is_image_hash(body.image):
        return body, stored_size(inputs, body.image, "image")
    data = decode_payload(body.image, "image", settings.limits.max_upload_bytes)
    info = check_picture(data, "image", settings.limits)
    return body.model_copy(update={"image": inputs.put(data)}), (info.width, info.height)


def output_size(size: tuple[int, int], params: UpscaleParams) -> tuple[int, int]:
    scale = params.upscale.scale if params.upscale is not None else 1.0
    return round(size[0] * scale), round(size[1] * scale)


def estimated_upscale_seconds(size: tuple[int, int], params: UpscaleParams, settings: Settings) -> float:
    out = output_size(size, params)
    faces = 1 if params.face_restore is not None else 0
    return upscale_seconds(out[0] * out[1], device="cuda" if settings.device != "cpu" else "cpu", faces=faces)


def submit_upscale(
    body: UpscaleJobCreate,
    settings: Settings,
    store: JobStore,
    inputs: InputStore,
    client_id: str | None,
    trace_id: str | None = None,
) -> tuple[JobRecord, bool]:
    body, size = store_image(body, inputs, settings)
    params = UpscaleParams.model_validate(body.model_dump(exclude={"request_id", "priority"}))
    upscalers = registered_upscalers(settings)
    check_upscaler(params.upscale, upscalers)
    check_face_restore(params.face_restore, upscalers, settings)
    width, height = output_size(size, params)
    if width * height > MAX_OUTPUT_PIXELS:
        raise LimitError(
            "upscale", f"the output would be {width}x{height}; at most {MAX_OUTPUT_PIXELS} pixels"
        )
    seconds = estimated_upscale_seconds(size, params, settings)
    canonical = json.dumps(params.model_dump(), sort_keys=True)
    return store.submit(
        params.model_dump(),
        request_id=body.request_id,
        request_hash="upscale:" + hashlib.sha256(canonical.encode()).hexdigest(),
        priority=body.priority,
        max_attempts=settings.max_attempts,
        client_id=client_id,
        queue=classify(seconds, settings.long_queue_threshold_seconds),
        estimated_seconds=seconds,
        trace_id=trace_id,
        kind=UPSCALE_KIND,
    )


def post_seconds(params: object, size: tuple[int, int], timings: list, device: str) -> float:
    """An image job's upscale and face restoration, for all its images (the cost model's rates:
    calibrated for this upscaler on `device`, else the default)."""
    from genserve.scheduler.cost import upscale_rate

    upscale, faces = getattr(params, "upscale", None), getattr(params, "face_restore", None)
    if upscale is None and faces is None:
        return 0.0
    images = getattr(params, "num_images", 1)
    scale = upscale.scale if upscale is not None else 1.0
    pixels = round(size[0] * scale) * round(size[1] * scale)
    rate = upscale_rate(timings, upscale.model, device)[0] if upscale is not None else 0.0
    return images * upscale_seconds(pixels, device=device, faces=1 if faces else 0, s_per_megapixel=rate)

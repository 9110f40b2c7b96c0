"""Control models and preprocessors: what a request's `controlnets` and `ip_adapter` may name, and
`POST /v1/preprocess`, which shows the control map a unit's preprocessor makes of a picture.

Weight-free preprocessors (canny, invert, ...) are numpy/OpenCV and run here. An annotator with
weights (depth) is loaded the first time it is asked for, in a worker thread of this process: the
one place the API touches torch, and only when an operator has put annotators in the models folder.
"""

from __future__ import annotations

import io
import threading
from typing import Any

import numpy as np
from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from genserve.api.deps import ServicesDep
from genserve.api.pictures import check_picture, decode_payload, stored_size
from genserve.artifacts.inputs import open_picture
from genserve.auth.deps import PrincipalDep
from genserve.engine.conditioning.preprocess import PREPROCESSORS, canonical_name, run_preprocessor
from genserve.engine.models.controls import (
    preprocessor_names,
    preprocessor_problem,
    registered_controls,
    scan_annotators,
)
from genserve.schemas import LimitError
from genserve.schemas.image_inputs import is_image_hash
from genserve.schemas.text import SafeText

router = APIRouter(tags=["controls"])


class ControlPublic(BaseModel):
    name: str
    kind: str = Field(
        description="controlnet, t2i_adapter (both go in controlnets), ipadapter, or sparsectrl (video sparsectrl.model)"
    )
    family: str = Field(description="The base-model family it runs with: sd15, sdxl or sd3")
    base_model: str | None = None
    license: str | None = None


class ControlList(BaseModel):
    object: str = "list"
    data: list[ControlPublic]


class PreprocessorList(BaseModel):
    weight_free: list[str]
    annotators: list[str] = Field(description="Weight-based preprocessors from <models_dir>/annotators/")
    all: list[str] = Field(description="Every name a unit's preprocessor may take (aliases included)")


class PreprocessRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: SafeText = Field(..., description="base64, a data URL or an upload id")
    preprocessor: SafeText = Field("canny")
    threshold_a: float | None = Field(None, ge=0, le=10000)
    threshold_b: float | None = Field(None, ge=0, le=10000)


@router.get("/v1/controls", response_model=ControlList, operation_id="list_controls")
def list_controls(services: ServicesDep, principal: PrincipalDep) -> ControlList:
    """ControlNets, T2I-Adapters and IP-Adapters this caller may use, with their family."""
    allowed = principal.limits.allowed_controls
    controls = registered_controls(services.settings)
    return ControlList(
        data=[
            ControlPublic(
                name=info.name,
                kind=info.kind,
                family=info.family,
                base_model=info.base_model,
                license=info.license,
            )
            for info in sorted(controls.values(), key=lambda c: c.name)
            if allowed is None or info.name in allowed
        ]
    )


@router.get("/v1/preprocessors", response_model=PreprocessorList, operation_id="list_preprocessors")
def list_preprocessors(services: ServicesDep) -> PreprocessorList:
    models_dir = services.settings.models_dir
    return PreprocessorList(
        weight_free=sorted(PREPROCESSORS),
        annotators=sorted(scan_annotators(models_dir)),
        all=preprocessor_names(models_dir),
    )


@router.post(
    "/v1/preprocess",
    response_class=Response,
    operation_id="preprocess_picture",
    responses={200: {"content": {"image/png": {}}, "description": "The control map"}},
)
async def preprocess(body: PreprocessRequest, services: ServicesDep) -> Response:
    """The control map the preprocessor makes of the picture, as a PNG."""
    settings = services.settings
    if (problem := preprocessor_problem(body.preprocessor, settings.models_dir)) is not None:
        raise LimitError("preprocessor", problem)
    if is_image_hash(body.image):
        stored_size(services.inputs, body.image, "image")
        data = services.inputs.get(body.image)
    else:
        data = decode_payload(body.image, "image", settings.limits.max_upload_bytes)
        check_picture(data, "image", settings.limits)
    picture = open_picture(data)
    detected = await run_in_threadpool(detect_map, body.preprocessor, picture, settings.models_dir, body)
    return Response(content=png_bytes(detected), media_type="image/png")


def detect_map(name: str, picture: Any, models_dir: Any, options: Any) -> np.ndarray:
    image = np.asarray(picture.convert("RGB"))
    key = canonical_name(name)
    if key in PREPROCESSORS:
        return run_preprocessor(key, image, threshold_a=options.threshold_a, threshold_b=options.threshold_b)
    return _annotators(models_dir)(key, image)


_loaded: dict[str, Any] = {}
_lock = threading.Lock()


def _annotators(models_dir: Any) -> Any:
    from genserve.engine.models.control_loading import Annotators  # torch: only for weight-based ones

    with _lock:
        key = str(models_dir)
        if key not in _loaded:
            _loaded[key] = Annotators(scan_annotators(models_dir))
        return _loaded[key]


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()

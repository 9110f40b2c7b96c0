"""sd-webui-controlnet's own routes (`/controlnet/...`), as webuiapi's controlnet_* calls use them.
The units themselves arrive in txt2img/img2img (`api/a1111_controlnet.py`)."""

from __future__ import annotations

import base64
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from genserve.api.a1111_controlnet import MODULE_ALIASES
from genserve.api.deps import ServicesDep
from genserve.api.pictures import check_picture, decode_payload
from genserve.api.routes.controls import detect_map, png_bytes
from genserve.artifacts.inputs import open_picture
from genserve.auth.deps import PrincipalDep
from genserve.engine.models.controls import preprocessor_names, preprocessor_problem, registered_controls
from genserve.schemas import LimitError
from genserve.schemas.control import MAX_CONTROL_UNITS

router = APIRouter(prefix="/controlnet", tags=["automatic1111"])


class DetectRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field(default_factory=list)
    controlnet_images: list[str] = Field(default_factory=list, description="webuiapi's name")
    controlnet_processor_res: int = 512
    controlnet_threshold_a: float = -1
    controlnet_threshold_b: float = -1


@router.get("/version", operation_id="controlnet_version")
def version() -> dict:
    return {"version": 2}


@router.get("/model_list", operation_id="controlnet_model_list")
def model_list(services: ServicesDep, principal: PrincipalDep) -> dict:
    allowed = principal.limits.allowed_controls
    names = sorted(
        name for name in registered_controls(services.settings) if allowed is None or name in allowed
    )
    return {"model_list": names}


@router.get("/module_list", operation_id="controlnet_module_list")
def module_list(services: ServicesDep) -> dict:
    names = sorted({*MODULE_ALIASES, *preprocessor_names(services.settings.models_dir)})
    detail = {name: {"model_free": name not in ("depth", "depth_midas"), "sliders": []} for name in names}
    return {"module_list": names, "module_detail": detail}


@router.get("/control_types", operation_id="controlnet_control_types")
def control_types(services: ServicesDep) -> dict:
    models = sorted(registered_controls(services.settings))
    return {
        "control_types": {
            "All": {
                "module_list": ["none", "canny"],
                "model_list": models,
                "default_option": "none",
                "default_model": "None",
            }
        }
    }


@router.get("/settings", operation_id="controlnet_settings")
def settings() -> dict:
    return {"control_net_unit_count": MAX_CONTROL_UNITS}


@router.post("/detect", operation_id="controlnet_detect")
async def detect(body: DetectRequest, services: ServicesDep) -> dict[str, Any]:
    """Run a preprocessor on each picture: `images` are raw base64 PNGs of the detected maps."""
    module = MODULE_ALIASES.get(body.controlnet_module.lower(), body.controlnet_module.lower())
    limits = services.settings.limits
    if (problem := preprocessor_problem(module, services.settings.models_dir)) is not None:
        raise LimitError("controlnet_module", problem)
    options = _Options(
        None if body.controlnet_threshold_a < 0 else body.controlnet_threshold_a,
        None if body.controlnet_threshold_b < 0 else body.controlnet_threshold_b,
    )
    images = []
    for i, value in enumerate(body.controlnet_input_images or body.controlnet_images):
        field = f"controlnet_input_images[{i}]"
        data = decode_payload(value, field, limits.max_upload_bytes)
        check_picture(data, field, limits)
        detected = await run_in_threadpool(
            detect_map, module, open_picture(data), services.settings.models_dir, options
        )
        images.append(base64.b64encode(png_bytes(detected)).decode("ascii"))
    return {"images": images, "info": "Success"}


class _Options:
    def __init__(self, threshold_a: float | None, threshold_b: float | None) -> None:
        self.threshold_a = threshold_a
        self.threshold_b = threshold_b

"""Models found in the models directory, and whether any live worker has them loaded."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from genserve.api.deps import ServicesDep
from genserve.auth.deps import PrincipalDep
from genserve.engine.models.loras import registered_loras

router = APIRouter(tags=["models"])

# A worker that has not reported for this long is not counted as having anything loaded.
WORKER_FRESH_SECONDS = 10.0


class ModelPublic(BaseModel):
    id: str  # the name again, where OpenAI's clients look for it
    object: str = "model"
    name: str
    family: str
    format: str
    native_width: int
    native_height: int
    dtype: str
    loaded: bool
    default: bool
    # What a request that leaves them out gets with this model (its model card's, else the schema's).
    default_cfg_scale: float
    default_steps: int
    default_sampler: str
    # What the model is for besides text-to-image: an inpainting checkpoint (9-channel UNet), or an
    # SDXL refiner, which only finishes another model's latents (request.refiner) and never runs alone.
    inpainting: bool = False
    refiner: bool = False
    # image or video; the model card's licence; a video model's modes and defaults, and for a
    # motion module the image model it animates.
    kind: str = "image"
    license: str | None = None
    video_modes: list[str] = []
    default_frames: int | None = None
    default_fps: int | None = None
    base_model: str | None = None
    # Upscalers and face restorers (kind 'upscaler' / 'face_restorer', engine/models/upscalers.py):
    # spandrel's architecture id and the scale (None until a worker has loaded it, for a pickle
    # whose name does not say). Their family is 'upscale' and their sizes 0.
    architecture: str | None = None
    scale: int | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelPublic]


@router.get("/v1/models", response_model=ModelList, operation_id="list_models")
def list_models(services: ServicesDep, principal: PrincipalDep) -> ModelList:
    """The models this caller may use (an API key may be limited to some)."""
    allowed = principal.limits.allowed_models
    loaded = {
        name
        for worker in services.store.live_workers(max_age_seconds=WORKER_FRESH_SECONDS)
        for name in worker.models_loaded
    }
    return ModelList(
        data=[
            ModelPublic(
                id=info.name,
                name=info.name,
                family=info.family,
                format=info.format,
                native_width=info.native_width,
                native_height=info.native_height,
                dtype=info.dtype,
                loaded=info.name in loaded,
                default=info.name in (services.settings.default_model, services.settings.default_video_model),
                default_cfg_scale=info.request_cfg_scale,
                default_steps=info.request_steps,
                default_sampler=info.request_sampler,
                inpainting=info.inpainting,
                refiner=info.refiner,
                kind=info.kind,
                license=info.license,
                video_modes=list(info.video_modes),
                default_frames=info.default_frames,
                default_fps=info.default_fps,
                base_model=info.base_model,
            )
            for info in sorted(services.catalog.models().values(), key=lambda m: m.name)
            if allowed is None or info.name in allowed
        ]
        + upscaler_models(services, loaded)
    )


class LoraPublic(BaseModel):
    name: str
    family: str  # sd15, sdxl or sd3: the models it applies to
    format: str  # diffusers or kohya; loha, lokr and tucker are listed but refused (supported: false)
    supported: bool
    base_model: str | None = None  # the model it was trained on, where its card names one
    description: str | None = None
    license: str | None = None
    size_bytes: int


class LoraList(BaseModel):
    object: str = "list"
    data: list[LoraPublic]


@router.get("/v1/loras", response_model=LoraList, operation_id="list_loras")
def list_loras(services: ServicesDep, principal: PrincipalDep) -> LoraList:
    """The LoRAs this caller may name in `loras` or `<lora:name:weight>` (an API key may be limited)."""
    allowed = principal.limits.allowed_loras
    return LoraList(
        data=[
            LoraPublic(
                name=info.name,
                family=info.family,
                format=info.format,
                supported=info.supported,
                base_model=info.base_model,
                description=info.description,
                license=info.license,
                size_bytes=info.size_bytes,
            )
            for info in sorted(registered_loras(services.settings).values(), key=lambda lora: lora.name)
            if allowed is None or info.name in allowed
        ]
    )


def upscaler_models(services: ServicesDep, loaded: set[str]) -> list[ModelPublic]:
    """Upscalers and face restorers in <models_dir>/upscale/ (and the built-in one)."""
    from genserve.engine.models.upscalers import scan_upscalers

    found = scan_upscalers(services.settings.models_dir, builtin=services.settings.builtin_models)
    return [
        ModelPublic(
            id=info.name,
            name=info.name,
            family="upscale",
            format=info.format,
            native_width=0,
            native_height=0,
            dtype=info.dtype,
            loaded=info.name in loaded,
            default=False,
            default_cfg_scale=0.0,
            default_steps=0,
            default_sampler="",
            kind=info.kind,
            license=info.license,
            architecture=info.architecture,
            scale=info.scale,
        )  # fmt: skip
        for info in sorted(found.values(), key=lambda i: i.name)
    ]

"""Models found in the models directory, and whether any live worker has them loaded."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from genserve.api.deps import ServicesDep
from genserve.auth.deps import PrincipalDep

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
    )

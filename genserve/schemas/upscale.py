"""Upscaling and face restoration: options of any image job (after decode), and the standalone
upscale job (`POST /v1/upscale`, job kind "upscale")."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from genserve.schemas.text import SafeText

MAX_UPSCALE = 8.0


class UpscaleOptions(BaseModel):
    """Upscale the decoded images with a model upscaler (spandrel), tiled."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: SafeText = Field(
        ..., min_length=1, description="An upscaler from GET /v1/models (kind 'upscaler')."
    )
    scale: float = Field(2.0, gt=1, le=MAX_UPSCALE, description="Output size ÷ input size (the model runs "
                         "as many times as it takes, at most 3, then Lanczos to the exact size).")  # fmt: skip
    tile: int | None = Field(
        None, ge=32, le=2048, description="Tile side in input pixels; the device's default if omitted."
    )


class FaceRestoreOptions(BaseModel):
    """Restore faces (GFPGAN, RestoreFormer) found by the operator's face detector."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: SafeText = Field(
        ..., min_length=1, description="A face restorer from GET /v1/models (kind 'face_restorer')."
    )
    visibility: float = Field(1.0, ge=0, le=1, description="How much of the restored face is blended in.")


class UpscaleParams(BaseModel):
    """A standalone upscale job: one picture in, one picture out."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    image: SafeText = Field(
        ..., description="The picture: base64, a data URL, or an id from POST /v1/uploads."
    )
    upscale: UpscaleOptions | None = None
    face_restore: FaceRestoreOptions | None = None
    # Face restoration runs first (on the smaller picture) unless this is set, as A1111's `upscale_first`.
    upscale_first: bool = False

    @model_validator(mode="after")
    def _something(self) -> UpscaleParams:
        if self.upscale is None and self.face_restore is None:
            raise ValueError("an upscale job needs upscale, face_restore, or both")
        return self


class UpscaleJobCreate(UpscaleParams):
    request_id: SafeText | None = Field(None, max_length=200, description="Idempotency key.")
    priority: int = Field(0, ge=-10, le=10, description="Higher runs first.")


class ImagePost(BaseModel):
    """A batch spec's `post:` section: what every image item gets after decode."""

    model_config = ConfigDict(extra="forbid")

    upscale: UpscaleOptions | None = None
    face_restore: FaceRestoreOptions | None = None

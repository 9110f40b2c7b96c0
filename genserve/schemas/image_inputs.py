"""Pictures in: the options of img2img, inpainting, outpainting, hires fix and the refiner.

A job stores only the content hash of each input picture (`sha256:<64 hex>`), never its bytes: the
API resolves base64, data URLs and upload ids into the artifact store first, so a queued job
survives a restart and database rows stay small.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# How a stored job names a picture in the artifact store. Uploads return this same id.
IMAGE_HASH_PATTERN = re.compile(r"^sha256:[0-9a-f]{64}$")

InpaintFill = Literal["original", "fill", "latent_noise", "latent_nothing"]
LatentUpscaler = Literal[
    "latent", "latent_bilinear", "latent_bicubic", "latent_nearest", "latent_antialiased"
]
PixelUpscaler = Literal["lanczos", "nearest"]


def is_image_hash(value: str) -> bool:
    return bool(IMAGE_HASH_PATTERN.match(value))


class InpaintOptions(BaseModel):
    """How the mask is applied (AUTOMATIC1111's inpainting options)."""

    model_config = ConfigDict(extra="forbid")

    mask_blur: int = Field(4, ge=0, le=64, description="Gaussian blur of the mask edge, in pixels.")
    fill: InpaintFill = Field(
        "original",
        description="What the masked area starts from: the original picture, its surrounding colours "
        "(fill), fresh noise (latent_noise) or zeros (latent_nothing).",
    )
    invert: bool = Field(False, description="Inpaint what the mask leaves out instead.")
    only_masked: bool = Field(
        False,
        description="Crop around the mask (plus padding), generate that crop at the request's size, "
        "paste it back.",
    )
    only_masked_padding: int = Field(32, ge=0, le=256, description="Pixels around the mask's box.")


class OutpaintOptions(BaseModel):
    """Extend the canvas: pad by these many pixels, fill the new area, and inpaint it."""

    model_config = ConfigDict(extra="forbid")

    left: int = Field(0, ge=0, le=1024, multiple_of=8)
    top: int = Field(0, ge=0, le=1024, multiple_of=8)
    right: int = Field(0, ge=0, le=1024, multiple_of=8)
    bottom: int = Field(0, ge=0, le=1024, multiple_of=8)
    feather: int = Field(8, ge=0, le=256, description="Soft edge of the mask over the old picture, px.")

    @model_validator(mode="after")
    def _extends_something(self) -> OutpaintOptions:
        if not (self.left or self.top or self.right or self.bottom):
            raise ValueError("outpaint needs at least one of left, top, right, bottom above 0")
        return self


class HiresOptions(BaseModel):
    """A second pass of the same job at a larger size (AUTOMATIC1111's hires fix)."""

    model_config = ConfigDict(extra="forbid")

    scale: float | None = Field(None, gt=1, le=4, description="Upscale factor; or give width and height.")
    width: int | None = Field(None, ge=8, multiple_of=8)
    height: int | None = Field(None, ge=8, multiple_of=8)
    upscaler: LatentUpscaler | PixelUpscaler | Annotated[str, Field(min_length=1, max_length=200)] = Field(
        "latent",
        description="Latent or pixel upscaler, or an upscaler model's name (kind 'upscaler' in GET /v1/models).",
    )
    steps: int | None = Field(
        None, ge=1, description="Steps the second pass runs (exactly); the first pass's if omitted."
    )
    strength: float = Field(0.55, gt=0, le=1, description="Denoising strength of the second pass.")
    sampler: str | None = Field(None, description="The second pass's sampler; the first pass's if omitted.")

    @model_validator(mode="after")
    def _one_size(self) -> HiresOptions:
        if self.scale is None and (self.width is None or self.height is None):
            raise ValueError("hires needs scale, or both width and height")
        return self


class RefinerOptions(BaseModel):
    """SDXL base + refiner: the base hands its latents to the refiner at `switch_at`."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(..., min_length=1, description="The refiner's model name from GET /v1/models.")
    switch_at: float = Field(0.8, gt=0, lt=1, description="Fraction of the steps the base runs.")

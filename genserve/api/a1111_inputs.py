"""AUTOMATIC1111's picture-in fields mapped onto genserve's schema: img2img and inpainting
(`/sdapi/v1/img2img`), and txt2img's hires fix and refiner fields.

A1111 names are kept in error messages (`denoising_strength`, not `strength`), so its clients see
the field they sent.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from pydantic import BaseModel, Field

from genserve.schemas import LimitError
from genserve.schemas.image_inputs import HiresOptions, InpaintOptions, RefinerOptions

# A1111's resize_mode numbers (0 just resize, 1 crop and resize, 2 resize and fill).
RESIZE_MODES = {0: "resize", 1: "crop", 2: "fill"}
# inpainting_fill: 0 fill, 1 original, 2 latent noise, 3 latent nothing.
INPAINT_FILLS = {0: "fill", 1: "original", 2: "latent_noise", 3: "latent_nothing"}
# hr_upscaler display names (webuiapi's HiResUpscaler) -> genserve's upscalers.
HR_UPSCALERS = {
    "latent": "latent",
    "latent (antialiased)": "latent_antialiased",
    "latent (bicubic)": "latent_bicubic",
    "latent (bicubic antialiased)": "latent_bicubic",
    "latent (nearest)": "latent_nearest",
    "latent (nearest-exact)": "latent_nearest",
    "lanczos": "lanczos",
    "nearest": "nearest",
}
# genserve field -> the A1111 field a client sent it as, for error messages.
A1111_FIELDS = {
    "init_image": "init_images",
    "strength": "denoising_strength",
    "num_images": "batch_size",
    "sampler": "sampler_name",
    "resize_mode": "resize_mode",
    "hires": "enable_hr",
    "refiner": "refiner_checkpoint",
    "inpaint": "mask",
}


class Img2ImgFields(BaseModel):
    """The fields A1111's StableDiffusionProcessingImg2Img adds to txt2img's."""

    init_images: list[str] = Field(..., min_length=1, description="Base64 or data URLs; one picture.")
    resize_mode: int = Field(0, description="0 just resize, 1 crop and resize, 2 resize and fill.")
    denoising_strength: float = Field(0.75, description="How much to change the picture.")
    mask: str | None = Field(None, description="Inpaint where white (or, with alpha, where opaque).")
    mask_blur: int | None = Field(None, ge=0, le=64, description="Blur of the mask edge, px (4).")
    mask_blur_x: int | None = Field(None, ge=0, le=64)
    mask_blur_y: int | None = Field(None, ge=0, le=64)
    inpainting_fill: int = Field(0, description="0 fill, 1 original, 2 latent noise, 3 latent nothing.")
    inpaint_full_res: bool = Field(True, description="Only masked: crop around the mask, then paste back.")
    inpaint_full_res_padding: int = Field(0, ge=0, le=256)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    include_init_images: bool = False


class HiresFields(BaseModel):
    """txt2img's hires fix and refiner fields."""

    enable_hr: bool = False
    denoising_strength: float | None = None
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_sampler_name: str | None = None
    hr_checkpoint_name: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None


def one_init_image(init_images: list[str]) -> str:
    """A job has one init image: A1111 clients send one, or the same one per batch row."""
    if len(set(init_images)) > 1:
        raise LimitError(
            "init_images",
            f"init_images holds {len(set(init_images))} different pictures; genserve takes one per "
            "request (send one request per picture)",
        )
    return init_images[0]


def img2img_fields(body: Img2ImgFields) -> dict[str, Any]:
    """The schema's fields for an img2img request (pictures as sent; stored later)."""
    if body.resize_mode not in RESIZE_MODES:
        raise LimitError(
            "resize_mode",
            f"resize_mode {body.resize_mode} is not supported; use 0 (just resize), "
            "1 (crop and resize) or 2 (resize and fill)",
        )
    fields: dict[str, Any] = {
        "init_image": one_init_image(body.init_images),
        "strength": body.denoising_strength,
        "resize_mode": RESIZE_MODES[body.resize_mode],
    }
    if body.mask:
        fields["mask"] = body.mask
        fields["inpaint"] = inpaint_options(body)
    return fields


def inpaint_options(body: Img2ImgFields) -> InpaintOptions:
    if body.inpainting_fill not in INPAINT_FILLS:
        raise LimitError(
            "inpainting_fill",
            f"inpainting_fill {body.inpainting_fill} is not one of 0 (fill), 1 (original), "
            "2 (latent noise), 3 (latent nothing)",
        )
    blurs = [b for b in (body.mask_blur, body.mask_blur_x, body.mask_blur_y) if b is not None]
    return InpaintOptions(
        mask_blur=max(blurs) if blurs else 4,  # one blur for both axes: the larger of x and y
        fill=INPAINT_FILLS[body.inpainting_fill],  # type: ignore[arg-type]
        invert=bool(body.inpainting_mask_invert),
        only_masked=body.inpaint_full_res,
        only_masked_padding=body.inpaint_full_res_padding,
    )


def hires_fields(
    body: HiresFields, sampler: Any, model_name: Any, upscalers: Collection[str] = ()
) -> dict[str, Any]:
    """The schema's `hires` and `refiner` for a txt2img request; `sampler` and `model_name` turn
    A1111's display names into genserve's; `upscalers` are the upscaler models hr_upscaler may name."""
    fields: dict[str, Any] = {}
    if body.enable_hr:
        for name in ("hr_checkpoint_name", "hr_prompt", "hr_negative_prompt"):
            if getattr(body, name):
                raise LimitError(name, f"{name} is not supported: the second pass uses the first's")
        asked = (body.hr_upscaler or "latent").strip()
        upscaler = HR_UPSCALERS.get(asked.lower()) or (asked if asked in upscalers else None)
        if upscaler is None:
            names = ", ".join(sorted({name.title() for name in HR_UPSCALERS}) + sorted(upscalers))
            raise LimitError(
                "hr_upscaler", f"hr_upscaler '{body.hr_upscaler}' is not available; use one of: {names}"
            )
        sized = body.hr_resize_x > 0 and body.hr_resize_y > 0
        options: dict[str, Any] = {
            "upscaler": upscaler,
            "steps": body.hr_second_pass_steps or None,
            "sampler": sampler(body.hr_sampler_name, None) if body.hr_sampler_name else None,
        }
        if sized:
            options.update(width=body.hr_resize_x, height=body.hr_resize_y)
        else:
            options["scale"] = body.hr_scale
        if body.denoising_strength is not None:
            options["strength"] = body.denoising_strength
        fields["hires"] = _validated(
            HiresOptions, options, {"scale": "hr_scale", "strength": "denoising_strength"}
        )
    if body.refiner_checkpoint and body.refiner_checkpoint.strip().lower() not in ("", "none"):
        options = {"model": model_name(body.refiner_checkpoint)}
        if body.refiner_switch_at is not None:
            options["switch_at"] = body.refiner_switch_at
        fields["refiner"] = _validated(RefinerOptions, options, {"switch_at": "refiner_switch_at"})
    return fields


def _validated(model: type[BaseModel], options: dict[str, Any], names: dict[str, str]) -> BaseModel:
    from pydantic import ValidationError

    try:
        return model.model_validate(options)
    except ValidationError as error:
        item = error.errors()[0]
        field = str(item["loc"][-1]) if item["loc"] else ""
        raise LimitError(names.get(field, f"hr_{field}" if field else "enable_hr"), item["msg"]) from None

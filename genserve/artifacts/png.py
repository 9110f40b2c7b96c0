"""PNG encoding with the generation parameters embedded, readable by A1111-compatible tools.

Each PNG carries two text chunks:
- "parameters": AUTOMATIC1111's infotext, which image browsers and A1111's "PNG Info" tab read;
- "genserve": JSON with the full GenerationParams, the image's own seed and its index, so the
  image can be regenerated exactly with genserve.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import PIL.Image
from PIL.PngImagePlugin import PngInfo

from genserve.schemas.generation import GenerationParams
from genserve.schemas.image_inputs import InpaintOptions

# A1111's display names for the samplers genserve offers.
A1111_SAMPLER_NAMES: dict[str, str] = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "ddim": "DDIM",
    "unipc": "UniPC",
}

# A1111's display names for the hires upscalers.
HIRES_UPSCALER_NAMES: dict[str, str] = {
    "latent": "Latent",
    "latent_antialiased": "Latent (antialiased)",
    "latent_bicubic": "Latent (bicubic)",
    "latent_nearest": "Latent (nearest)",
    "latent_bilinear": "Latent",
    "lanczos": "Lanczos",
    "nearest": "Nearest",
}

PARAMETERS_KEY = "parameters"
GENSERVE_KEY = "genserve"


def a1111_parameters(params: GenerationParams, *, seed: int, model_name: str) -> str:
    """AUTOMATIC1111's infotext for one image; `seed` is that image's own seed.

    Like A1111, the "Negative prompt:" line is left out when there is none, and so is "Size" when
    width and height are not resolved.
    """
    lines = [params.prompt]
    if params.negative_prompt:
        lines.append(f"Negative prompt: {params.negative_prompt}")
    fields = {
        "Steps": params.steps,
        "Sampler": A1111_SAMPLER_NAMES.get(params.sampler, params.sampler),
        "CFG scale": params.cfg_scale,
        "Seed": seed,
        "Size": f"{params.width}x{params.height}" if params.width and params.height else None,
        "Model": model_name,
        **extra_parameters(params),
    }
    lines.append(", ".join(f"{key}: {value}" for key, value in fields.items() if value is not None))
    return "\n".join(lines)


def extra_parameters(params: GenerationParams) -> dict[str, Any]:
    """The infotext fields of pictures in, hires fix and refiner, named as AUTOMATIC1111 names them
    (its `extra_generation_params`): e.g. "Denoising strength" for img2img and inpainting."""
    fields: dict[str, Any] = {}
    if params.init_image is not None:
        fields["Denoising strength"] = params.strength
        if params.mask is not None:
            fields["Mask blur"] = params.inpaint.mask_blur if params.inpaint else InpaintOptions().mask_blur
    hires = params.hires
    if hires is not None:
        fields.setdefault("Denoising strength", hires.strength)
        if hires.scale is not None:
            fields["Hires upscale"] = hires.scale
        else:
            fields["Hires resize"] = f"{hires.width}x{hires.height}"
        if hires.steps is not None:
            fields["Hires steps"] = hires.steps
        fields["Hires upscaler"] = HIRES_UPSCALER_NAMES.get(hires.upscaler, hires.upscaler)
    if params.refiner is not None:
        fields["Refiner"] = params.refiner.model
        fields["Refiner switch at"] = params.refiner.switch_at
    return fields


def encode_png(
    image: PIL.Image.Image,
    params: GenerationParams,
    *,
    seed: int,
    index: int,
    extra: dict[str, Any] | None = None,
) -> bytes:
    """PNG bytes of `image` with the "parameters" and "genserve" text chunks.

    `seed` is this image's own seed (the request's seed + `index`), which both chunks record, so the
    image can be regenerated on its own with num_images=1.
    """
    record = {"params": params.model_dump(mode="json"), "seed": seed, "index": index, **(extra or {})}
    info = PngInfo()
    # add_text writes tEXt, or iTXt (UTF-8) when the text is not Latin-1, e.g. a prompt in Japanese.
    info.add_text(PARAMETERS_KEY, a1111_parameters(params, seed=seed, model_name=params.model or ""))
    info.add_text(GENSERVE_KEY, json.dumps(record, ensure_ascii=False, sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_png_metadata(data: bytes) -> dict[str, str]:
    """All text chunks (tEXt, zTXt, iTXt) of a PNG, by key."""
    with PIL.Image.open(io.BytesIO(data)) as image:
        if image.format != "PNG":
            raise ValueError(f"not a PNG image (format {image.format})")
        return {key: str(value) for key, value in image.text.items()}


def preview_data_url(image: PIL.Image.Image, quality: int = 75) -> str:
    """A small JPEG as a data: URL, ready for an <img src> or an SSE payload."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")

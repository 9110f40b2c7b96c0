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

# A1111's display names for the samplers genserve offers.
A1111_SAMPLER_NAMES: dict[str, str] = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "ddim": "DDIM",
    "unipc": "UniPC",
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
    }
    lines.append(", ".join(f"{key}: {value}" for key, value in fields.items() if value is not None))
    return "\n".join(lines)


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

"""Generation parameters: one typed definition used by the API, the CLI, the store and the engine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from genserve.schemas.control import MAX_CONTROL_UNITS, ControlNetUnit, IPAdapterOptions, ip_adapter_key
from genserve.schemas.image_inputs import HiresOptions, InpaintOptions, OutpaintOptions, RefinerOptions
from genserve.schemas.lora import MAX_LORAS, LoraRef, extract_lora_tags, lora_key, merge_loras
from genserve.schemas.text import SafeText
from genserve.schemas.upscale import FaceRestoreOptions, UpscaleOptions

if TYPE_CHECKING:
    from genserve.config import Limits

SamplerName = Literal["euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim", "unipc"]
SAMPLER_NAMES: tuple[str, ...] = SamplerName.__args__  # type: ignore[attr-defined]

MAX_SEED = 2**32 - 1
DEFAULT_CFG_SCALE = 7.0  # for models whose card names no default


class GenerationParams(BaseModel):
    """What to generate. Structural rules live here; configurable limits live in `check_limits`."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    prompt: SafeText = Field(..., min_length=1, description="What to draw.")
    negative_prompt: SafeText = Field("", description="What to steer away from.")
    model: SafeText | None = Field(
        None, description="Model name from GET /v1/models; default model if omitted."
    )
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="Image i uses seed+i. Random (and recorded) if omitted."
    )
    steps: int = Field(20, ge=1, description="Denoising steps.")
    cfg_scale: float | None = Field(
        None,
        description="Classifier-free guidance scale; the model's default if omitted (its model card's, "
        "else 7.0).",
    )
    width: int | None = Field(None, ge=8, multiple_of=8, description="Pixels; model native width if omitted.")
    height: int | None = Field(
        None, ge=8, multiple_of=8, description="Pixels; model native height if omitted."
    )
    sampler: SamplerName = Field("euler", description="Sampler name.")
    num_images: int = Field(1, ge=1, description="Images generated with seeds seed, seed+1, ...")
    preview_every: int | None = Field(
        None, ge=0, description="Send a preview image every N steps (0: never; server default if omitted)."
    )
    # Pictures in (img2img, inpainting, outpainting). A request may send base64, a data URL or an
    # upload id; a stored job holds only the content hash `sha256:<hex>` (schemas/image_inputs.py).
    init_image: SafeText | None = Field(
        None, description="Start from this picture: base64, a data URL, or an id from POST /v1/uploads."
    )
    mask: SafeText | None = Field(
        None, description="Inpaint where the mask is white (or opaque); same forms as init_image."
    )
    resize_mode: Literal["resize", "crop", "fill"] = Field(
        "resize",
        description="How init_image meets width x height: stretch, crop to fill, or fit and fill the rest.",
    )
    strength: float = Field(
        0.75,
        gt=0,
        le=1,
        description="img2img: how much to change; the last int(steps*strength) steps of the schedule run.",
    )
    inpaint: InpaintOptions | None = Field(None, description="Mask options (with mask or outpaint).")
    outpaint: OutpaintOptions | None = Field(None, description="Extend init_image's canvas and fill it.")
    hires: HiresOptions | None = Field(None, description="A second, larger pass of the same job.")
    refiner: RefinerOptions | None = Field(None, description="SDXL: finish with a refiner model.")
    # After decode, per request (engine/upscale/), so out of batch_key.
    upscale: UpscaleOptions | None = Field(
        None, description="Upscale the images with an upscaler model (tiled)."
    )
    face_restore: FaceRestoreOptions | None = Field(
        None, description="Restore faces (GFPGAN, RestoreFormer) found by the face detector, before upscale."
    )
    # LoRAs (schemas/lora.py): the set with its weights is part of batch_key. A1111's
    # `<lora:name:weight>` prompt tags are moved here when the params are read.
    loras: list[LoraRef] | None = Field(
        None, max_length=MAX_LORAS, description="LoRAs from GET /v1/loras, each with its weight."
    )

    @model_validator(mode="after")
    def _lora_tags(self) -> GenerationParams:
        """`<lora:name:weight>` tags leave the prompt and join `loras` (a name in `loras` wins)."""
        names = [ref.name for ref in self.loras or ()]
        if len(set(names)) != len(names):
            raise ValueError("loras: each LoRA may be named once")
        prompt, tagged = extract_lora_tags(self.prompt)
        if tagged:
            merged = merge_loras(self.loras, tagged)
            if merged is not None and len(merged) > MAX_LORAS:
                raise ValueError(f"loras: at most {MAX_LORAS} LoRAs, prompt tags included")
            self.prompt, self.loras = prompt, merged
        return self

    # Control by pictures (schemas/control.py): per row, so they stay out of batch_key, except the
    # IP-Adapter's model, style switch and picture count (its scale is per row).
    controlnets: list[ControlNetUnit] | None = Field(
        None, max_length=MAX_CONTROL_UNITS, description="ControlNet / T2I-Adapter units, applied together."
    )
    ip_adapter: IPAdapterOptions | None = Field(None, description="Image prompt (IP-Adapter).")


def batch_key(params: GenerationParams) -> tuple:
    """What must match for requests to share one batch on the GPU.

    Prompts, negative prompts, seeds, CFG scales, image counts and preview cadence may all differ, and
    so may the pictures in: init_image, mask, strength, resize mode, inpaint and outpaint options. A
    row that starts from a picture joins the shared schedule at its own step (the last
    int(steps × strength) steps run), and its mask travels with the row. width × height is the size
    denoised, which for "only masked" inpainting is the request's size, not the picture's. The hires
    fix runs a second pass with its own options, so those must match; a refiner must be the same
    model, but each row hands over at its own switch_at (and joins the refiner there). The LoRA set
    (names and weights, sorted) is in: a batch runs with one set of adapters active.
    ControlNets and T2I-Adapters add per-row residuals, so they stay out; an IP-Adapter's model,
    style switch and picture count are in (loaded processors, image tokens per row), its scale and
    reference pictures are not (per row).
    """
    return (
        params.model,
        params.width,
        params.height,
        params.steps,
        params.sampler,
        _options_key(params.hires),
        None if params.refiner is None else params.refiner.model,
        lora_key(params.loras),
        ip_adapter_key(params.ip_adapter),
    )


def _options_key(options: BaseModel | None) -> tuple | None:
    return None if options is None else tuple(sorted(options.model_dump().items()))


class LimitError(ValueError):
    """A request exceeds a configured limit. `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def check_limits(params: GenerationParams, limits: Limits, known_models: set[str] | None = None) -> None:
    """Raise LimitError for the first violated limit; width/height must be resolved already."""
    if len(params.prompt) > limits.max_prompt_chars:
        raise LimitError(
            "prompt", f"prompt is {len(params.prompt)} characters; the limit is {limits.max_prompt_chars}"
        )
    if len(params.negative_prompt) > limits.max_prompt_chars:
        raise LimitError(
            "negative_prompt",
            f"negative_prompt is {len(params.negative_prompt)} characters; the limit is {limits.max_prompt_chars}",
        )
    if params.model is not None:
        if known_models is not None and params.model not in known_models:
            raise LimitError("model", f"model '{params.model}' is not registered; see GET /v1/models")
        if limits.allowed_models is not None and params.model not in limits.allowed_models:
            raise LimitError(
                "model", f"model '{params.model}' is not in the allowed list {limits.allowed_models}"
            )
    if params.steps > limits.max_steps:
        raise LimitError("steps", f"steps must be between 1 and {limits.max_steps} (max_steps)")
    if params.cfg_scale is not None and not limits.min_cfg_scale <= params.cfg_scale <= limits.max_cfg_scale:
        raise LimitError(
            "cfg_scale", f"cfg_scale must be between {limits.min_cfg_scale} and {limits.max_cfg_scale}"
        )
    if params.num_images > limits.max_num_images:
        raise LimitError("num_images", f"num_images must be at most {limits.max_num_images} (max_num_images)")
    if params.width is not None and params.width > limits.max_width:
        raise LimitError("width", f"width must be at most {limits.max_width} (max_width)")
    if params.height is not None and params.height > limits.max_height:
        raise LimitError("height", f"height must be at most {limits.max_height} (max_height)")
    if (
        params.width is not None
        and params.height is not None
        and params.width * params.height > limits.max_pixels
    ):
        raise LimitError(
            "width",
            f"width*height = {params.width * params.height} pixels exceeds max_pixels {limits.max_pixels}",
        )

"""The ComfyUI core nodes genserve runs: their inputs, outputs and widget ranges.

One table serves validation (graph.py), the plan (plan.py) and `GET /object_info`. Option lists
that depend on what the server has (checkpoints, LoRAs, control and upscale models, uploaded
pictures) are filled in by the caller: `Choices` names which list an input takes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from genserve.workflows.samplers import COMFY_SAMPLERS, COMFY_SCHEDULERS

MAX_INT = 0xFFFFFFFFFFFFFFFF
MAX_SIZE = 16384
LINK_TYPES = frozenset(
    {
        "MODEL",
        "CLIP",
        "VAE",
        "CONDITIONING",
        "LATENT",
        "IMAGE",
        "MASK",
        "CONTROL_NET",
        "UPSCALE_MODEL",
        "VIDEO",
    }
)
LATENT_UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")
IMAGE_SCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
CROP_METHODS = ("disabled", "center")


@dataclass(frozen=True)
class Input:
    """One input: a link type (MODEL, IMAGE, ...), a widget (INT, FLOAT, STRING, BOOLEAN) with its
    range, or a choice among `options` (fixed) or `choices` (a list the server fills in)."""

    type: str
    default: Any = None
    min: float | None = None
    max: float | None = None
    options: tuple[str, ...] = ()
    choices: str | None = None  # "checkpoints", "loras", "controlnets", "upscalers", "images"
    multiline: bool = False

    @property
    def is_link(self) -> bool:
        return self.type in LINK_TYPES

    def spec(self, choices: dict[str, list[str]]) -> list[Any]:
        """The input as `/object_info` lists it."""
        if self.options or self.choices:
            values = list(self.options) if self.options else choices.get(self.choices or "", [])
            extra = {"default": self.default} if self.default is not None else {}
            return [values, extra] if extra else [values]
        if self.is_link:
            return [self.type]
        extra = {
            key: value
            for key, value in (("default", self.default), ("min", self.min), ("max", self.max))
            if value is not None
        }
        if self.type == "FLOAT":
            extra["step"] = 0.01
        if self.multiline:
            extra["multiline"] = True
        return [self.type, extra]


@dataclass(frozen=True)
class Node:
    inputs: dict[str, Input]
    outputs: tuple[str, ...]
    output_names: tuple[str, ...] = ()
    category: str = ""
    output_node: bool = False
    optional: dict[str, Input] = field(default_factory=dict)
    description: str = ""


def _int(default: int, low: int, high: int) -> Input:
    return Input("INT", default, low, high)


def _float(default: float, low: float, high: float) -> Input:
    return Input("FLOAT", default, low, high)


_SEED = _int(0, 0, MAX_INT)
_STEPS = _int(20, 1, 10000)
_CFG = _float(8.0, 0.0, 100.0)
_SIZE = _int(512, 16, MAX_SIZE)
_SAMPLER = Input("COMBO", "euler", options=COMFY_SAMPLERS)
_SCHEDULER = Input("COMBO", "normal", options=COMFY_SCHEDULERS)
_ENABLE = Input("COMBO", "enable", options=("enable", "disable"))
_PREFIX = Input("STRING", "ComfyUI")
_FPS = _float(6.0, 1.0, 120.0)  # genserve's video fps range (schemas/video.py)


def _video_latent(width: int, height: int, length: int) -> Node:
    return Node(
        {
            "width": _int(width, 16, MAX_SIZE),
            "height": _int(height, 16, MAX_SIZE),
            "length": _int(length, 1, MAX_SIZE),
            "batch_size": _int(1, 1, 4096),
        },
        ("LATENT",),
        category="latent/video",
        description="An empty video latent for a genserve video model's KSampler.",
    )


NODES: dict[str, Node] = {
    "CheckpointLoaderSimple": Node(
        {"ckpt_name": Input("COMBO", choices="checkpoints")},
        ("MODEL", "CLIP", "VAE"),
        category="loaders",
        description="A genserve model by name (extensions like .safetensors are ignored).",
    ),
    "LoraLoader": Node(
        {
            "model": Input("MODEL"),
            "clip": Input("CLIP"),
            "lora_name": Input("COMBO", choices="loras"),
            "strength_model": _float(1.0, -10.0, 10.0),
            "strength_clip": _float(1.0, -10.0, 10.0),
        },
        ("MODEL", "CLIP"),
        category="loaders",
    ),
    "ControlNetLoader": Node(
        {"control_net_name": Input("COMBO", choices="controlnets")}, ("CONTROL_NET",), category="loaders"
    ),
    "UpscaleModelLoader": Node(
        {"model_name": Input("COMBO", choices="upscalers")}, ("UPSCALE_MODEL",), category="loaders"
    ),
    "LoadImage": Node({"image": Input("COMBO", choices="images")}, ("IMAGE", "MASK"), category="image"),
    "CLIPTextEncode": Node(
        {"text": Input("STRING", "", multiline=True), "clip": Input("CLIP")},
        ("CONDITIONING",),
        category="conditioning",
    ),
    "ControlNetApplyAdvanced": Node(
        {
            "positive": Input("CONDITIONING"),
            "negative": Input("CONDITIONING"),
            "control_net": Input("CONTROL_NET"),
            "image": Input("IMAGE"),
            "strength": _float(1.0, 0.0, 4.0),
            "start_percent": _float(0.0, 0.0, 1.0),
            "end_percent": _float(1.0, 0.0, 1.0),
        },
        ("CONDITIONING", "CONDITIONING"),
        ("positive", "negative"),
        category="conditioning/controlnet",
        optional={"vae": Input("VAE")},
    ),
    "EmptyLatentImage": Node(
        {"width": _SIZE, "height": _SIZE, "batch_size": _int(1, 1, 4096)}, ("LATENT",), category="latent"
    ),
    "VAEEncode": Node({"pixels": Input("IMAGE"), "vae": Input("VAE")}, ("LATENT",), category="latent"),
    "VAEEncodeForInpaint": Node(
        {
            "pixels": Input("IMAGE"),
            "vae": Input("VAE"),
            "mask": Input("MASK"),
            "grow_mask_by": _int(6, 0, 64),
        },
        ("LATENT",),
        category="latent/inpaint",
    ),
    "SetLatentNoiseMask": Node(
        {"samples": Input("LATENT"), "mask": Input("MASK")}, ("LATENT",), category="latent/inpaint"
    ),
    "LatentUpscale": Node(
        {
            "samples": Input("LATENT"),
            "upscale_method": Input("COMBO", "nearest-exact", options=LATENT_UPSCALE_METHODS),
            "width": _int(512, 0, MAX_SIZE),
            "height": _int(512, 0, MAX_SIZE),
            "crop": Input("COMBO", "disabled", options=CROP_METHODS),
        },
        ("LATENT",),
        category="latent",
    ),
    "KSampler": Node(
        {
            "model": Input("MODEL"),
            "seed": _SEED,
            "steps": _STEPS,
            "cfg": _CFG,
            "sampler_name": _SAMPLER,
            "scheduler": _SCHEDULER,
            "positive": Input("CONDITIONING"),
            "negative": Input("CONDITIONING"),
            "latent_image": Input("LATENT"),
            "denoise": _float(1.0, 0.0, 1.0),
        },
        ("LATENT",),
        category="sampling",
    ),
    "KSamplerAdvanced": Node(
        {
            "model": Input("MODEL"),
            "add_noise": _ENABLE,
            "noise_seed": _SEED,
            "steps": _STEPS,
            "cfg": _CFG,
            "sampler_name": _SAMPLER,
            "scheduler": _SCHEDULER,
            "positive": Input("CONDITIONING"),
            "negative": Input("CONDITIONING"),
            "latent_image": Input("LATENT"),
            "start_at_step": _int(0, 0, 10000),
            "end_at_step": _int(10000, 0, 10000),
            "return_with_leftover_noise": Input("COMBO", "disable", options=("disable", "enable")),
        },
        ("LATENT",),
        category="sampling",
    ),
    "VAEDecode": Node({"samples": Input("LATENT"), "vae": Input("VAE")}, ("IMAGE",), category="latent"),
    "ImageScale": Node(
        {
            "image": Input("IMAGE"),
            "upscale_method": Input("COMBO", "nearest-exact", options=IMAGE_SCALE_METHODS),
            "width": _int(512, 0, MAX_SIZE),
            "height": _int(512, 0, MAX_SIZE),
            "crop": Input("COMBO", "disabled", options=CROP_METHODS),
        },
        ("IMAGE",),
        category="image/upscaling",
    ),
    "ImageUpscaleWithModel": Node(
        {"upscale_model": Input("UPSCALE_MODEL"), "image": Input("IMAGE")},
        ("IMAGE",),
        category="image/upscaling",
    ),
    "SaveImage": Node(
        {"images": Input("IMAGE"), "filename_prefix": Input("STRING", "ComfyUI")},
        (),
        category="image",
        output_node=True,
    ),
    "PreviewImage": Node({"images": Input("IMAGE")}, (), category="image", output_node=True),
    "EmptyHunyuanLatentVideo": _video_latent(848, 480, 25),
    "EmptyLTXVLatentVideo": _video_latent(768, 512, 97),
    "SaveAnimatedWEBP": Node(
        {
            "images": Input("IMAGE"),
            "filename_prefix": _PREFIX,
            "fps": _FPS,
            "lossless": Input("BOOLEAN", False),
            "quality": _int(80, 0, 100),
            "method": Input("COMBO", "default", options=("default", "fastest", "slowest")),
        },
        (),
        category="image/animation",
        output_node=True,
    ),
    "SaveAnimatedPNG": Node(
        {
            "images": Input("IMAGE"),
            "filename_prefix": _PREFIX,
            "fps": _FPS,
            "compress_level": _int(4, 0, 9),
        },
        (),
        category="image/animation",
        output_node=True,
    ),
    "SaveWEBM": Node(
        {
            "images": Input("IMAGE"),
            "filename_prefix": _PREFIX,
            "codec": Input("COMBO", "vp9", options=("vp9", "av1")),
            "fps": _float(24.0, 1.0, 120.0),
            "crf": _float(32.0, 0.0, 63.0),
        },
        (),
        category="image/video",
        output_node=True,
    ),
    "CreateVideo": Node(
        {"images": Input("IMAGE"), "fps": _float(30.0, 1.0, 120.0)}, ("VIDEO",), category="image/video"
    ),
    "SaveVideo": Node(
        {
            "video": Input("VIDEO"),
            "filename_prefix": Input("STRING", "video/ComfyUI"),
            "format": Input("COMBO", "auto", options=("auto", "mp4")),
            "codec": Input("COMBO", "auto", options=("auto", "h264")),
        },
        (),
        category="image/video",
        output_node=True,
    ),
}


def object_info(choices: dict[str, list[str]]) -> dict[str, Any]:
    """`GET /object_info`: every supported node in ComfyUI's shape, option lists filled in."""
    return {name: node_info(name, node, choices) for name, node in NODES.items()}


def node_info(name: str, node: Node, choices: dict[str, list[str]]) -> dict[str, Any]:
    required = {key: spec.spec(choices) for key, spec in node.inputs.items()}
    if name == "LoadImage":  # the ComfyUI front end shows an upload button for it
        image = required["image"]
        if len(image) == 1:
            image.append({})
        image[1]["image_upload"] = True
    return {
        "input": {"required": required, "optional": {k: v.spec(choices) for k, v in node.optional.items()}},
        "input_order": {"required": list(node.inputs), "optional": list(node.optional)},
        "output": list(node.outputs),
        "output_is_list": [False] * len(node.outputs),
        "output_name": list(node.output_names or node.outputs),
        "name": name,
        "display_name": name,
        "description": node.description,
        "python_module": "genserve.workflows",
        "category": node.category,
        "output_node": node.output_node,
    }

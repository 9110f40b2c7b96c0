"""Random-weight pipelines of the real architectures, built in memory with nothing downloaded.

The configs are `architectures.json` in this package (a copy of the team's reference). Timing does
not depend on the weight values, so random weights measure what trained checkpoints would. The CLIP
tokenizers are the byte-level ones of `genserve.engine.models.fixtures` (prompts tokenize to different ids than
with CLIP's real vocabulary, but every prompt is padded to the same 77 tokens, so the shapes are real).
SD3-medium is built without its T5-XXL encoder, as its pipeline allows: T5 runs once per request, and
without it the pipeline feeds zeros of the same shape (77 CLIP + 256 T5 tokens), so the transformer's
work is unchanged; peak memory is lower by T5's weights (about 9.5 GB in half precision).

`tiny=True` builds the fixtures' tiny pipelines instead (64x64 images), for the CPU smoke test.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from genserve.engine.models.fixtures import _BOS_ID, _EOS_ID, _tiny_tokenizer
from genserve.engine.models.fixtures import _build as build_tiny_pipeline
from genserve.engine.models.registry import Family

MODELS: dict[str, Family] = {"sd15": "sd15", "sdxl": "sdxl", "sd3": "sd3"}
DEFAULT_STEPS = {"sd15": 30, "sdxl": 30, "sd3": 28}  # SD3's own pipeline default is 28
_ARCH_KEYS = {"sd15": "sd15", "sdxl": "sdxl", "sd3": "sd3_medium"}
_TINY_NATIVE = 64


@dataclass
class BuiltModel:
    name: str
    family: Family
    pipe: DiffusionPipeline
    native: int  # native width = height in pixels
    denoiser_params: int
    note: str = ""


@cache
def architectures() -> dict[str, Any]:
    return json.loads(resources.files("genserve.bench").joinpath("architectures.json").read_text())


def build(model: str, *, tiny: bool, device: str, dtype: torch.dtype, seed: int = 0) -> BuiltModel:
    """A pipeline of `model` (sd15 | sdxl | sd3) on `device` in `dtype`, with seeded random weights."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; expected one of {', '.join(MODELS)}")
    family = MODELS[model]
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if tiny:
            pipe, native, note = build_tiny_pipeline(family, seed), _TINY_NATIVE, "tiny random weights"
        else:
            pipe = _BUILDERS[family](device)
            native = architectures()[_ARCH_KEYS[model]]["native_resolution"]
            note = "random weights" + (", without T5" if family == "sd3" else "")
    pipe.to(device)
    if dtype != torch.float32:  # (a cast to float32 would only log a warning per model)
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    denoiser = pipe.transformer if family == "sd3" else pipe.unet
    params = sum(p.numel() for p in denoiser.parameters())
    return BuiltModel(f"{model}-tiny" if tiny else model, family, pipe, native, params, note)


def component(model: str, name: str) -> dict[str, Any]:
    """A component's constructor kwargs, with `same_as` references resolved and notes dropped."""
    spec = dict(architectures()[_ARCH_KEYS.get(model, model)][name])
    if "same_as" in spec:
        base_model, base_name = spec.pop("same_as").split(".")
        spec = {**component(base_model, base_name), **spec}
    return {k: v for k, v in spec.items() if k not in ("class", "note")}


def _clip(spec: dict[str, Any], cls: type) -> torch.nn.Module:
    # The byte-level tokenizer's begin/end ids, so pooling reads the end-of-text token as with CLIP.
    config = CLIPTextConfig(**spec, bos_token_id=_BOS_ID, eos_token_id=_EOS_ID, pad_token_id=_EOS_ID)
    return cls(config)


# The models are created on the device, so the random initialisation of billions of weights runs there.


def _sd15(device: str) -> StableDiffusionPipeline:
    with torch.device(device):
        unet = UNet2DConditionModel(**component("sd15", "unet"))
        vae = AutoencoderKL(**component("sd15", "vae"))
        text_encoder = _clip(component("sd15", "text_encoder"), CLIPTextModel)
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_tiny_tokenizer(),
        scheduler=EulerDiscreteScheduler(**component("sd15", "scheduler")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl(device: str) -> StableDiffusionXLPipeline:
    with torch.device(device):
        unet = UNet2DConditionModel(**component("sdxl", "unet"))
        vae = AutoencoderKL(
            **component("sdxl", "vae")
        )  # force_upcast defaults to True, as in the stock config
        text_encoder = _clip(component("sdxl", "text_encoder"), CLIPTextModel)
        text_encoder_2 = _clip(component("sdxl", "text_encoder_2"), CLIPTextModelWithProjection)
    return StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=_tiny_tokenizer(),
        tokenizer_2=_tiny_tokenizer(),
        scheduler=EulerDiscreteScheduler(**component("sdxl", "scheduler")),
    )


def _sd3(device: str) -> StableDiffusion3Pipeline:
    # text_encoders: "CLIP-L (as sd15, with projection 768), OpenCLIP bigG (as sdxl.text_encoder_2), T5-XXL"
    clip_l = {**component("sd15", "text_encoder"), "projection_dim": 768}
    with torch.device(device):
        transformer = SD3Transformer2DModel(**component("sd3", "transformer"))
        vae = AutoencoderKL(**component("sd3", "vae"))
        text_encoder = _clip(clip_l, CLIPTextModelWithProjection)
        text_encoder_2 = _clip(component("sdxl", "text_encoder_2"), CLIPTextModelWithProjection)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        text_encoder_3=None,
        tokenizer=_tiny_tokenizer(),
        tokenizer_2=_tiny_tokenizer(),
        tokenizer_3=None,
        scheduler=FlowMatchEulerDiscreteScheduler(**component("sd3", "scheduler")),
    )


_BUILDERS = {"sd15": _sd15, "sdxl": _sdxl, "sd3": _sd3}

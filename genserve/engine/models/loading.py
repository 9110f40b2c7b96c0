"""Loading a registered model into a diffusers pipeline on a device, offline.

Diffusers folders load with `from_pretrained(path, local_files_only=True)`. Single files load with
`from_single_file(path, config=<same-family diffusers folder>, local_files_only=True)`: see the
registry's module docstring for why the folder is needed and what it supplies.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DiffusionPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from genserve.engine.errors import ModelLoadError, OutOfMemory
from genserve.engine.models.registry import Family, ModelInfo

# Loading progress bars would interleave with the JSON logs and the CLI's own progress bar.
diffusers_logging.disable_progress_bar()
transformers_logging.disable_progress_bar()

PIPELINE_CLASSES: dict[Family, type[DiffusionPipeline]] = {
    "sd15": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
    "sd3": StableDiffusion3Pipeline,
}

# Inpainting checkpoints (9-channel UNets) load with their own pipeline classes; the engine uses the
# same components either way.
INPAINT_PIPELINE_CLASSES: dict[Family, type[DiffusionPipeline]] = {
    "sd15": StableDiffusionInpaintPipeline,
    "sdxl": StableDiffusionXLInpaintPipeline,
}

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# genserve does not run SD1.x's NSFW classifier: it would add ~1.2 GB and blacken images.
_FAMILY_LOAD_KWARGS: dict[Family, dict[str, Any]] = {
    "sd15": {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
    "sdxl": {},
    "sd3": {},
}

_MAX_MESSAGE_CHARS = 1000


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; anything else must name a usable torch device."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"invalid device {device!r}: {error}") from error
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """'auto' -> float16 on CUDA, float32 elsewhere (CPU kernels are slow or missing in half precision)."""
    if dtype == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"invalid dtype {dtype!r}; expected auto or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def load_pipeline(
    info: ModelInfo, models: Mapping[str, ModelInfo], *, device: str, dtype: torch.dtype
) -> DiffusionPipeline:
    """Load `info` onto `device`; raises ModelLoadError (or OutOfMemory) with a readable message."""
    pipeline_class = (INPAINT_PIPELINE_CLASSES if info.inpainting else PIPELINE_CLASSES)[info.family]
    if info.refiner:  # its encode_prompt and time ids know it has no first text encoder
        pipeline_class = StableDiffusionXLImg2ImgPipeline
    try:
        # 1. Read the weights
        if info.format == "diffusers":
            kwargs = {**_null_components(info.path), **_FAMILY_LOAD_KWARGS[info.family]}
            pipe = pipeline_class.from_pretrained(info.path, dtype=dtype, local_files_only=True, **kwargs)
        else:
            config_folder = single_file_config_folder(info, models)
            kwargs = {**_null_components(config_folder), **_FAMILY_LOAD_KWARGS[info.family]}
            pipe = pipeline_class.from_single_file(
                str(info.path), config=str(config_folder), dtype=dtype, local_files_only=True, **kwargs
            )
        # 2. Place it
        pipe.to(device)
    except ModelLoadError:
        raise
    except (torch.cuda.OutOfMemoryError, MemoryError) as error:
        raise OutOfMemory(
            f"out of memory loading model '{info.name}' on {device}: {_short(error)}"
        ) from error
    except Exception as error:
        raise ModelLoadError(
            f"could not load model '{info.name}' ({info.format} at {info.path}): "
            f"{type(error).__name__}: {_short(error)}"
        ) from error
    pipe.set_progress_bar_config(disable=True)
    return pipe


def single_file_config_folder(info: ModelInfo, models: Mapping[str, ModelInfo]) -> Path:
    """The diffusers folder that supplies configs and tokenizers for a single-file checkpoint."""
    candidates = sorted(
        (
            m
            for m in models.values()
            if m.format == "diffusers"
            and m.family == info.family
            and m.inpainting == info.inpainting
            and not m.refiner  # a refiner's configs describe another UNet and one text encoder
        ),
        key=lambda m: m.name,
    )
    if not candidates:
        kind = f"{info.family} inpainting" if info.inpainting else info.family
        raise ModelLoadError(
            f"cannot load single-file model '{info.name}' ({info.path.name}) offline: it needs a "
            f"diffusers-format {kind} model folder in the models directory to supply the model "
            f"configs and tokenizers, and there is none. Add one (for example the base model this "
            f"checkpoint was fine-tuned from) next to the file."
        )
    return candidates[0].path


def _null_components(folder: Path) -> dict[str, None]:
    """Components that model_index.json stores as absent ([null, null]), e.g. SD3 saved without T5.

    from_pretrained refuses a pipeline with a required component missing unless it is passed as None.
    """
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text())
    except (OSError, ValueError):
        return {}  # from_pretrained will report the real problem
    return {
        name: None
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and value[:2] == [None, None]
    }


def _short(error: BaseException) -> str:
    message = " ".join(str(error).split())
    return message if len(message) <= _MAX_MESSAGE_CHARS else message[: _MAX_MESSAGE_CHARS - 3] + "..."

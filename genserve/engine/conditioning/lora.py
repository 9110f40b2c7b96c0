"""The LoRA set of a batch: adapters loaded into a pipeline, unfused, and activated per batch.

Every request of a batch has the same LoRA set (it is part of `batch_key`), so one
`set_adapters(names, weights)` before the batch's text encoding and denoising is exact: diffusers
scales each adapter's low-rank update by its weight in the UNet and the text encoders alike
(`scale · B·A·x` added to each layer's output; peft backend). Adapters stay unfused, so switching
sets is cheap and never drifts the base weights (fusing and unfusing does: diffusers#5000, #5604).

Loaded adapters are kept per pipeline, least recently used first out (`delete_adapters`) beyond
`capacity`; a batch without LoRAs disables them all (`disable_lora`), keeping them loaded.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from diffusers import DiffusionPipeline

from genserve.engine.errors import EngineError
from genserve.engine.models.loras import LoraInfo
from genserve.engine.models.registry import Family

DEFAULT_CAPACITY = 8


@dataclass(frozen=True)
class ActiveLora:
    info: LoraInfo
    weight: float
    field: str  # where the request named it, for errors: "loras[0].name"


class LoraAdapters:
    """The adapters loaded into one pipeline (one per model in the engine's cache)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = max(1, capacity)
        self._loaded: OrderedDict[tuple, str] = OrderedDict()  # file identity -> adapter name
        self._count = 0
        self._enabled = False

    def loaded(self) -> list[str]:
        """Adapter names, least recently used first."""
        return list(self._loaded.values())

    def activate(self, pipe: DiffusionPipeline, family: Family, loras: Sequence[ActiveLora]) -> list[str]:
        """Make exactly `loras` active at their weights; returns their adapter names."""
        if not loras:
            if self._loaded and self._enabled:
                pipe.disable_lora()
                self._enabled = False
            return []
        names = [self._ensure_loaded(pipe, family, lora) for lora in loras]
        self._evict(pipe, keep=set(names))
        if not self._enabled:
            pipe.enable_lora()
            self._enabled = True
        pipe.set_adapters(names, adapter_weights=[lora.weight for lora in loras])
        return names

    def _ensure_loaded(self, pipe: DiffusionPipeline, family: Family, lora: ActiveLora) -> str:
        identity = _identity(lora.info)
        if identity in self._loaded:
            self._loaded.move_to_end(identity)
            return self._loaded[identity]
        check_compatible(pipe, family, lora)
        self._count += 1
        name = f"{re.sub(r'[^A-Za-z0-9_]', '_', lora.info.name)}_{self._count}"
        try:
            pipe.load_lora_weights(
                str(lora.info.path.parent), weight_name=lora.info.path.name, adapter_name=name
            )
        except Exception as error:  # a file diffusers cannot map onto this model
            _delete_quietly(pipe, name)
            raise EngineError(
                f"{lora.field}: LoRA '{lora.info.name}' could not be loaded: {error}"
            ) from error
        self._loaded[identity] = name
        return name

    def _evict(self, pipe: DiffusionPipeline, keep: set[str]) -> None:
        for identity, name in list(self._loaded.items()):
            if len(self._loaded) <= self.capacity:
                return
            if name not in keep:
                pipe.delete_adapters(name)
                del self._loaded[identity]


def check_compatible(pipe: DiffusionPipeline, family: Family, lora: ActiveLora) -> None:
    """The LoRA is loadable and made for this model's family and cross-attention width."""
    info = lora.info
    if (reason := info.unsupported_reason()) is not None:
        raise EngineError(f"{lora.field}: {reason}")
    if info.family != family:
        raise EngineError(f"{lora.field}: LoRA '{info.name}' is for {info.family} models, not {family}")
    denoiser = pipe.transformer if family == "sd3" else pipe.unet
    width = denoiser.config.get("cross_attention_dim")
    if info.cross_attention_dim is not None and width is not None and info.cross_attention_dim != width:
        raise EngineError(
            f"{lora.field}: LoRA '{info.name}' has cross-attention width {info.cross_attention_dim}, "
            f"the model {width}: it was trained for another base model"
        )


def _identity(info: LoraInfo) -> tuple:
    try:
        stat = info.path.stat()
        return (str(info.path), stat.st_size, stat.st_mtime_ns)
    except OSError:
        return (str(info.path), info.size_bytes, 0)


def _delete_quietly(pipe: DiffusionPipeline, name: str) -> None:
    try:
        pipe.delete_adapters(name)
    except Exception:  # noqa: BLE001 - nothing of it was loaded
        pass

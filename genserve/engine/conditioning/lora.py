"""The LoRA set of a batch: adapters loaded into a pipeline, unfused, and activated per batch.

Every request of a batch has the same LoRA set (it is part of `batch_key`), so one
`set_adapters(names, weights)` before the batch's text encoding and denoising is exact: diffusers
scales each adapter's low-rank update by its weight in the UNet and the text encoders alike
(`scale · B·A·x` added to each layer's output; peft backend). Adapters stay unfused, so switching
sets is cheap and never drifts the base weights (fusing and unfusing does: diffusers#5000, #5604).

Loaded adapters are kept per pipeline, least recently used first out (`delete_adapters`) beyond
`capacity`; a batch without LoRAs disables them all (`disable_lora`), keeping them loaded.

`HotswapAdapter` is the opt-in alternative for a compiled single-LoRA deployment (the
`lora_hotswap_rank` lever): one adapter slot whose weights are replaced in place (diffusers'
`load_lora_weights(..., hotswap=True)`, peft's `hotswap_adapter_from_state_dict`), so a
torch.compile'd denoiser swaps one LoRA for another without recompiling. `enable_lora_hotswap`
(called on a fresh pipeline, before the first load) pads every LoRA to `target_rank` and turns the
scalings into tensors; the request's weight is then written into those tensors in place (w · α/r,
0 for a batch without LoRA: adding 0 · B·A·x leaves the output exactly as it is), never through
`set_adapters`, which would replace them with floats (a recompile) and, after a swap, use the first
LoRA's α/r. Limits (peft's): one LoRA per batch, every later LoRA targets the first one's modules
or a subset of them, rank ≤ target_rank, no text-encoder weights.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline

from genserve.engine.errors import EngineError
from genserve.engine.models.loras import LoraInfo
from genserve.engine.models.registry import Family, _safetensors_header

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


HOTSWAP_ADAPTER = "hotswap"
_TEXT_ENCODER_PREFIXES = ("text_encoder", "lora_te")


class HotswapAdapter:
    """One LoRA slot swapped in place (module docstring); the LoRA it holds is kept between batches."""

    def __init__(self) -> None:
        self.current: tuple | None = None  # file identity of the LoRA in the slot
        self.swaps = 0
        self._base: list[tuple[torch.Tensor, float]] = []  # each layer's scaling tensor, its α/r

    def loaded(self) -> list[str]:
        return [] if self.current is None else [HOTSWAP_ADAPTER]

    def activate(self, pipe: DiffusionPipeline, family: Family, loras: Sequence[ActiveLora]) -> list[str]:
        if len(loras) > 1:
            raise EngineError(
                f"{loras[1].field}: this server hot-swaps one LoRA at a time (lora_hotswap_rank is set); "
                f"the request names {len(loras)}"
            )
        if not loras:
            self._set_weight(0.0)
            return []
        [lora] = loras
        identity = _identity(lora.info)
        if identity != self.current:
            self._load(pipe, family, lora, identity)
        self._set_weight(lora.weight)
        return [HOTSWAP_ADAPTER]

    def _load(self, pipe: DiffusionPipeline, family: Family, lora: ActiveLora, identity: tuple) -> None:
        check_compatible(pipe, family, lora)
        if any(key.startswith(_TEXT_ENCODER_PREFIXES) for key in _safetensors_header(lora.info.path)):
            raise EngineError(
                f"{lora.field}: LoRA '{lora.info.name}' has text-encoder weights, which cannot be "
                "hot-swapped (lora_hotswap_rank is set); serve it without hot-swap"
            )
        swap = self.current is not None
        try:
            pipe.load_lora_weights(
                str(lora.info.path.parent),
                weight_name=lora.info.path.name,
                adapter_name=HOTSWAP_ADAPTER,
                hotswap=swap,
            )
        except Exception as error:  # other target modules, a rank above target_rank, ...
            if not swap:
                _delete_quietly(pipe, HOTSWAP_ADAPTER)
            raise EngineError(
                f"{lora.field}: LoRA '{lora.info.name}' could not be {'hot-swapped' if swap else 'loaded'}: "
                f"{error}"
            ) from error
        self.current = identity
        self.swaps += swap
        denoiser = pipe.transformer if family == "sd3" else pipe.unet
        self._base = [
            (layer.scaling[HOTSWAP_ADAPTER], float(layer.scaling[HOTSWAP_ADAPTER]))
            for layer in denoiser.modules()
            if isinstance(getattr(layer, "scaling", None), dict)
            and isinstance(layer.scaling.get(HOTSWAP_ADAPTER), torch.Tensor)  # enable_lora_hotswap's
        ]

    def _set_weight(self, weight: float) -> None:
        for scaling, base in self._base:
            scaling.fill_(weight * base)


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

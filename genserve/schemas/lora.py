"""LoRA references on a request, and AUTOMATIC1111's `<lora:name:weight>` prompt tags.

A LoRA is named, never given as a path: names resolve only against the LoRA registry
(`engine/models/loras.py`: `<models_dir>/lora/` and the built-in companions), so a name cannot
reach outside those folders. Torch-free: the API, the store and the engine share it.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field

MAX_LORAS = 8
LORA_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._ +-]{0,127}$"
_NAME = re.compile(LORA_NAME_PATTERN)
# A1111's extra-network tag, `<lora:name:multiplier>` (modules/extra_networks.py matches `<(\w+):([^>]+)>`
# and splits the inside on ':'; the Lora extension reads items[1] as the multiplier, default 1).
_TAG = re.compile(r"<lora:([^>]+)>", re.IGNORECASE)


class LoraRef(BaseModel):
    """One LoRA applied to the whole request (UNet and text encoders) at `weight`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=LORA_NAME_PATTERN, description="A LoRA from GET /v1/loras.")
    weight: float = Field(1.0, ge=-10, le=10, description="Strength; 0 is off, 1 as trained.")


class LoraTagError(ValueError):
    """A `<lora:...>` tag that cannot be read; the message says which and why."""


def extract_lora_tags(prompt: str) -> tuple[str, list[LoraRef]]:
    """The prompt without its `<lora:name[:weight]>` tags, and the tags as LoraRefs, in order.

    Named arguments of newer A1111 builds (`te=`, `unet=`, `dyn=`) are not supported: a tag with
    one raises, as does a name or weight that is not valid.
    """
    refs: list[LoraRef] = []
    for match in _TAG.finditer(prompt):
        items = match.group(1).split(":")
        name = items[0].strip()
        if not _NAME.match(name):
            raise LoraTagError(f"{match.group(0)!r}: a LoRA name is letters, digits and . _ + - or space")
        if len(items) > 2 or (len(items) == 2 and "=" in items[1]):
            raise LoraTagError(f"{match.group(0)!r}: only <lora:name> or <lora:name:weight> is supported")
        try:
            weight = float(items[1]) if len(items) == 2 else 1.0
        except ValueError:
            raise LoraTagError(f"{match.group(0)!r}: the weight must be a number") from None
        if not -10 <= weight <= 10:
            raise LoraTagError(f"{match.group(0)!r}: the weight must be between -10 and 10")
        refs.append(LoraRef(name=name, weight=weight))
    if not refs:
        return prompt, refs
    return _TAG.sub("", prompt).strip(), refs


def merge_loras(explicit: list[LoraRef] | None, tagged: list[LoraRef]) -> list[LoraRef] | None:
    """`loras` plus the prompt's tags; a name given in `loras` wins over a tag of the same name,
    and a name tagged twice keeps its first tag. None when there are none."""
    merged = list(explicit or [])
    names = {ref.name for ref in merged}
    for ref in tagged:
        if ref.name not in names:
            merged.append(ref)
            names.add(ref.name)
    return merged or None


def lora_key(loras: list[LoraRef] | None) -> tuple[tuple[str, float], ...]:
    """The LoRA set as `batch_key` compares it: (name, weight) pairs, sorted; weight-0 entries are off."""
    return tuple(sorted((ref.name, float(ref.weight)) for ref in loras or () if ref.weight != 0))

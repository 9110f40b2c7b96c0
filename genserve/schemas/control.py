"""Control of a request by pictures: ControlNet / T2I-Adapter units and an IP-Adapter.

A unit's picture is stored like `init_image` (base64, a data URL or an upload id in the request;
`sha256:<hex>` in the stored job). Controls are per row: requests with different controls, or none,
share a batch. An IP-Adapter's model, style-only switch (which attention processors it uses) and
number of reference pictures (its image tokens per row) are in `batch_key`; its scale is per row
(engine/conditioning/ip_adapter.py; benchmarks/ip_adapter_scale.py measured it against the scale in
the key), and its pictures are the row's own.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from genserve.schemas.text import SafeText

# A1111's control modes: "balanced" adds the residuals as they are; "prompt" (My prompt is more
# important) scales them down toward the shallow blocks, 0.825**(n-1-i); "control" (ControlNet is
# more important) does the same and leaves the unconditional half of CFG without control.
ControlMode = Literal["balanced", "prompt", "control"]
CONTROL_MODES: tuple[str, ...] = ControlMode.__args__  # type: ignore[attr-defined]

MAX_CONTROL_UNITS = 4
MAX_IP_ADAPTER_IMAGES = 4


class ControlNetUnit(BaseModel):
    """One ControlNet (or T2I-Adapter) applied to every image of the request."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: SafeText = Field(..., min_length=1, description="A control model from GET /v1/controls.")
    image: SafeText = Field(
        ..., description="The control picture (or the picture to preprocess): base64, data URL or upload id."
    )
    preprocessor: SafeText = Field(
        "none", description="Turns `image` into the control map first (GET /v1/preprocessors); none: as is."
    )
    threshold_a: float | None = Field(None, description="The preprocessor's first option (canny: low, 100).")
    threshold_b: float | None = Field(
        None, description="The preprocessor's second option (canny: high, 200)."
    )
    scale: float = Field(1.0, ge=0, le=4, description="Weight of the control residuals.")
    start: float = Field(0.0, ge=0, le=1, description="Fraction of the steps after which the control starts.")
    end: float = Field(1.0, ge=0, le=1, description="Fraction of the steps after which it stops.")
    mode: ControlMode = Field("balanced", description="balanced, prompt (more important) or control.")

    @model_validator(mode="after")
    def _window(self) -> ControlNetUnit:
        if self.end < self.start:
            raise ValueError("end must not be before start")
        return self


class IPAdapterOptions(BaseModel):
    """Image prompt: the reference pictures steer the content (or, style_only, only the style)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: SafeText = Field(..., min_length=1, description="An IP-Adapter from GET /v1/controls.")
    images: list[SafeText] = Field(
        ..., min_length=1, max_length=MAX_IP_ADAPTER_IMAGES, description="Reference pictures."
    )
    scale: float = Field(0.6, ge=0, le=2, description="Weight of the image prompt.")
    style_only: bool = Field(
        False, description="InstantStyle: only the style blocks attend to the image (SDXL: up block 0)."
    )


def nested_picture_refs(params: object) -> list[tuple[str, str]]:
    """(field path, value) of every picture inside the control options, in a fixed order."""
    found: list[tuple[str, str]] = []
    for i, unit in enumerate(getattr(params, "controlnets", None) or []):
        found.append((f"controlnets[{i}].image", unit.image))
    ip = getattr(params, "ip_adapter", None)
    if ip is not None:
        found.extend((f"ip_adapter.images[{i}]", image) for i, image in enumerate(ip.images))
    return found


def with_nested_pictures(params: BaseModel, refs: dict[str, str]) -> BaseModel:
    """`params` with the pictures at these field paths replaced (by their stored ids)."""
    if not refs:
        return params
    update: dict[str, object] = {}
    units = getattr(params, "controlnets", None)
    if units:
        update["controlnets"] = [
            unit.model_copy(update={"image": refs.get(f"controlnets[{i}].image", unit.image)})
            for i, unit in enumerate(units)
        ]
    ip = getattr(params, "ip_adapter", None)
    if ip is not None:
        images = [refs.get(f"ip_adapter.images[{i}]", image) for i, image in enumerate(ip.images)]
        update["ip_adapter"] = ip.model_copy(update={"images": images})
    return params.model_copy(update=update)


def ip_adapter_key(options: IPAdapterOptions | None) -> tuple | None:
    """What of an IP-Adapter must match within a batch: its model, style switch and picture count."""
    return None if options is None else (options.model, options.style_only, len(options.images))

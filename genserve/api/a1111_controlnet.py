"""sd-webui-controlnet's API on genserve: `alwayson_scripts.controlnet.args` units in txt2img and
img2img become the request's `controlnets` (an IP-Adapter unit its `ip_adapter`), and the
extension's own routes `/controlnet/{version,model_list,module_list,control_types,settings,detect}`.

Unit fields honoured (internal_controlnet/args.py): enabled, module (preprocessor), model (its
" [hash]" suffix dropped; "None" disables the unit), weight, image (raw base64, a data URL, or
{"image", "mask"}; `input_image` too; an img2img unit without one uses the init image), threshold_a
and threshold_b (-1: the module's default, canny 100/200), guidance_start, guidance_end and
control_mode (name or 0/1/2). Accepted and ignored: resize_mode (the map is stretched to the
output size, as diffusers does), processor_res, pixel_perfect, low_vram, hr_option (control
applies to the first pass), save_detected_map (detected maps are not appended to `images`).
"""

from __future__ import annotations

import re
from typing import Any

from genserve.schemas import LimitError

_HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]+\]$")
_MODES = {
    "balanced": "balanced",
    "0": "balanced",
    "my prompt is more important": "prompt",
    "1": "prompt",
    "controlnet is more important": "control",
    "2": "control",
}
# sd-webui-controlnet module names -> genserve preprocessors
MODULE_ALIASES = {
    "none": "none",
    "canny": "canny",
    "invert": "invert",
    "invert (from white bg & black line)": "invert",
    "tile_resample": "tile_resample",
    "scribble_xdog": "scribble_xdog",
    "shuffle": "shuffle",
    "inpaint": "inpaint",
    "inpaint_only": "inpaint",
    "depth": "depth",
    "depth_midas": "depth_midas",
}
# script name clients look for (webuiapi enables its ControlNet support on "controlnet m2m")
SCRIPT_NAMES = ["controlnet", "controlnet m2m"]


def model_name(title: str) -> str:
    return _HASH_SUFFIX.sub("", title or "").strip()


def _threshold(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if value < 0 else value


def _image(unit: dict[str, Any]) -> str | None:
    image = unit.get("image", unit.get("input_image"))
    if isinstance(image, dict):  # {"image": ..., "mask": ...}
        image = image.get("image")
    return image or None


def controlnet_fields(extra: dict[str, Any], init_image: str | None = None) -> dict[str, Any]:
    """`controlnets` / `ip_adapter` for a job from a request's `alwayson_scripts` (any spelling)."""
    scripts = extra.get("alwayson_scripts") or {}
    if not isinstance(scripts, dict):
        return {}
    args = next(
        (v.get("args") for k, v in scripts.items() if k.lower() == "controlnet" and isinstance(v, dict)), None
    )
    if not args:
        return {}
    units, ip_adapter = [], None
    for i, unit in enumerate(args):
        if not isinstance(unit, dict) or not unit.get("enabled", True):
            continue
        name = model_name(str(unit.get("model") or ""))
        if not name or name.lower() == "none":
            continue
        image = _image(unit) or init_image
        if image is None:
            raise LimitError(f"alwayson_scripts.controlnet.args[{i}].image", "the unit has no image")
        module = str(unit.get("module") or "none").lower()
        weight = float(unit.get("weight", 1.0))
        if module.startswith("ip-adapter") or name.lower().startswith("ip-adapter"):
            ip_adapter = {"model": name, "images": [image], "scale": weight}
            continue
        mode = _MODES.get(str(unit.get("control_mode", "balanced")).strip().lower())
        if mode is None:
            raise LimitError(
                f"alwayson_scripts.controlnet.args[{i}].control_mode",
                f"unknown control_mode {unit['control_mode']!r}",
            )
        units.append(
            {
                "model": name,
                "image": image,
                "preprocessor": MODULE_ALIASES.get(module, module),
                "threshold_a": _threshold(unit.get("threshold_a")) if module != "none" else None,
                "threshold_b": _threshold(unit.get("threshold_b")) if module != "none" else None,
                "scale": weight,
                "start": float(unit.get("guidance_start", 0.0)),
                "end": float(unit.get("guidance_end", 1.0)),
                "mode": mode,
            }
        )
    fields: dict[str, Any] = {}
    if units:
        fields["controlnets"] = units
    if ip_adapter is not None:
        fields["ip_adapter"] = ip_adapter
    return fields

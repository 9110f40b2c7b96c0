"""Control models: ControlNets, T2I-Adapters and IP-Adapters, read from file headers only (no torch).

Layout, beside the base models in the models directory (and in the built-in models):

    <models_dir>/controlnet/<name>/     diffusers ControlNetModel or SD3ControlNetModel (config.json),
                                        or a SparseControlNetModel (kind "sparsectrl": AnimateDiff keyframes)
    <models_dir>/t2i_adapter/<name>/    diffusers T2IAdapter (config.json)
    <models_dir>/ipadapter/<name>/      ip-adapter*.safetensors (image_proj.*, ip_adapter.*) + image_encoder/

The family (sd15, sdxl, sd3) comes from the config: a ControlNetModel with SDXL's "text_time"
addition embedding is SDXL, an SD3ControlNetModel is SD3, a T2IAdapter of type full_adapter_xl is
SDXL. A SparseControlNetModel (SparseCtrl, as AnimateDiff-Evolved keeps it in ComfyUI's controlnet
folder) is kind "sparsectrl" and family "animatediff": it runs on AnimateDiff (SD1.5) video models,
named by a video request's `sparsectrl.model`. An IP-Adapter's comes from the width of its key projections (768: SD1.5, 2048: SDXL). A model
card (README.md front matter `genserve: {family: ...}`) overrides either; tiny test models need it.
Annotators for weight-based preprocessors live in `<models_dir>/annotators/<name>/`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from genserve.engine.models.registry import (
    BUILTIN_MODELS_DIR,
    CONTROL_MODEL_DIRS,
    Family,
    _card_block,
    _card_license,
    _safetensors_header,
)

if TYPE_CHECKING:
    from genserve.config import Settings

logger = logging.getLogger(__name__)

ControlKind = Literal["controlnet", "t2i_adapter", "ipadapter", "sparsectrl"]
SPARSECTRL_CLASS = "SparseControlNetModel"
CONTROL_DIRS: dict[str, ControlKind] = {
    "controlnet": "controlnet",
    "t2i_adapter": "t2i_adapter",
    "ipadapter": "ipadapter",
}
ANNOTATOR_DIR = "annotators"
assert set(CONTROL_DIRS) | {ANNOTATOR_DIR} == CONTROL_MODEL_DIRS  # the base-model scan skips these

_IP_KEY_WIDTH_FAMILY: dict[int, Family] = {768: "sd15", 1024: "sd15", 2048: "sdxl"}


@dataclass(frozen=True)
class ControlInfo:
    name: str
    kind: ControlKind
    family: Family
    path: Path
    weight_name: str | None = None  # an IP-Adapter's weights file inside `path`
    base_model: str | None = None  # the model card's base model, where it names one
    license: str | None = None


def scan_controls(models_dir: Path, *, builtin: bool = False) -> dict[str, ControlInfo]:
    """Every readable control model under `models_dir` (and the built-in ones), by name."""
    found: dict[str, ControlInfo] = {}
    roots = [Path(models_dir)] + ([BUILTIN_MODELS_DIR] if builtin else [])
    for root in roots:
        for folder, kind in CONTROL_DIRS.items():
            base = root / folder
            if not base.is_dir():
                continue
            for entry in sorted(base.iterdir()):
                if entry.name.startswith(".") or not entry.is_dir() or entry.name in found:
                    continue
                try:
                    found[entry.name] = read_control_info(entry, kind)
                except Exception as error:  # one bad entry must never stop the scan
                    logger.warning("skipping control model %s: %s", entry, error)
    return found


def scan_annotators(models_dir: Path) -> dict[str, Path]:
    base = Path(models_dir) / ANNOTATOR_DIR
    if not base.is_dir():
        return {}
    return {e.name: e for e in sorted(base.iterdir()) if e.is_dir() and (e / "config.json").exists()}


_cache: dict[tuple[str, bool], tuple[float, dict[str, ControlInfo]]] = {}
_lock = threading.Lock()


def registered_controls(settings: Settings, ttl: float = 5.0) -> dict[str, ControlInfo]:
    """The control models a server with these settings serves, rescanned at most every `ttl` s."""
    key = (str(settings.models_dir), bool(settings.builtin_models))
    with _lock:
        hit = _cache.get(key)
        if hit is not None and time.monotonic() - hit[0] < ttl:
            return hit[1]
        controls = scan_controls(settings.models_dir, builtin=settings.builtin_models)
        _cache[key] = (time.monotonic(), controls)
        return controls


def read_control_info(path: Path, kind: ControlKind) -> ControlInfo:
    card = _card_block(path / "README.md") if (path / "README.md").exists() else {}
    family = card.get("family")
    weight_name = None
    if kind == "ipadapter":
        weight_name = _ip_weight_name(path)
        family = family or _ip_family(path / weight_name)
    else:
        config = json.loads((path / "config.json").read_text())
        if kind == "controlnet" and config.get("_class_name") == SPARSECTRL_CLASS:
            kind = "sparsectrl"
            family = family or "animatediff"
            if family != "animatediff":  # SparseCtrl exists for AnimateDiff on SD1.5 only
                raise ValueError(f"a SparseCtrl model's family is animatediff, not {family!r}")
        family = family or _config_family(config, kind)
    if family not in ("sd15", "sdxl", "sd3") and kind != "sparsectrl":
        raise ValueError(f"unknown family {family!r}")
    license_id = _card_license(path / "README.md")
    return ControlInfo(path.name, kind, family, path, weight_name, card.get("base_model"), license_id)


def _config_family(config: dict, kind: ControlKind) -> Family:
    cls = config.get("_class_name", "")
    if kind == "controlnet":
        if cls.startswith("SD3"):
            return "sd3"
        if cls != "ControlNetModel":
            raise ValueError(f"{cls or 'no _class_name'}: not a ControlNetModel")
        return "sdxl" if config.get("addition_embed_type") == "text_time" else "sd15"
    if cls != "T2IAdapter":
        raise ValueError(f"{cls or 'no _class_name'}: not a T2IAdapter")
    return "sdxl" if config.get("adapter_type") == "full_adapter_xl" else "sd15"


def _ip_weight_name(folder: Path) -> str:
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise ValueError("no .safetensors weights")
    if not (folder / "image_encoder" / "config.json").exists():
        raise ValueError("no image_encoder/ folder")
    return files[0]


def _ip_family(weights: Path) -> Family:
    header = _safetensors_header(weights)
    for key, (_, shape) in header.items():
        if key.startswith("ip_adapter.") and key.endswith("to_k_ip.weight"):
            width = shape[1]
            if width in _IP_KEY_WIDTH_FAMILY:
                return _IP_KEY_WIDTH_FAMILY[width]
            raise ValueError(f"cross-attention width {width}: name the family in the model card")
    raise ValueError("no ip_adapter.*.to_k_ip.weight")


def control_problem(
    name: str, controls: dict[str, ControlInfo], base: Any, kinds: tuple[str, ...]
) -> str | None:
    """Why control model `name` cannot run on base model `base` (a ModelInfo); None when it can."""
    control = controls.get(name)
    if control is None:
        known = ", ".join(sorted(n for n, c in controls.items() if c.kind in kinds)) or "none"
        return f"unknown control model '{name}'; registered: {known} (GET /v1/controls)"
    if control.kind not in kinds:
        return f"'{name}' is a {control.kind}, not a {' or '.join(kinds)}"
    if base.family == "sd3" and control.kind != "controlnet":
        return f"{control.kind} on SD3 models is not supported yet (model '{base.name}'); ControlNets are"
    if control.family != base.family:
        return f"'{name}' is a {control.family} {control.kind}; model '{base.name}' is {base.family}"
    return None


def sparsectrl_problem(name: str, controls: dict[str, ControlInfo], model: Any, base: Any) -> str | None:
    """Why SparseCtrl model `name` cannot place keyframes on video model `model` (a ModelInfo; `base`:
    the image model a motion adapter runs on, or None); None when it can. Torch-free: configs only."""
    problem = control_problem(name, controls, model, ("sparsectrl",))
    if problem is not None:
        return problem
    control = controls[name]
    folder = base.path if model.base_model is not None and base is not None else model.path
    try:
        unet = json.loads((Path(folder) / "unet" / "config.json").read_text())
        sparse = json.loads((control.path / "config.json").read_text())
    except (OSError, ValueError):
        return None  # the engine's load reports what cannot be read
    for key in ("block_out_channels", "cross_attention_dim"):
        if key in unet and key in sparse and _as_list(unet[key]) != _as_list(sparse[key]):
            return (
                f"'{name}' has {key} {sparse[key]}; model '{model.name}' has {unet[key]}, "
                "so it was made for another AnimateDiff base"
            )
    return None


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def control_problems(params: Any, controls: dict[str, ControlInfo], base: Any) -> list[tuple[str, str]]:
    """(field, problem) for every control model of a request that cannot run on `base`."""
    found = []
    for i, unit in enumerate(getattr(params, "controlnets", None) or []):
        problem = control_problem(unit.model, controls, base, ("controlnet", "t2i_adapter"))
        if problem is not None:
            found.append((f"controlnets[{i}].model", problem))
    ip = getattr(params, "ip_adapter", None)
    if ip is not None:
        problem = control_problem(ip.model, controls, base, ("ipadapter",))
        if problem is not None:
            found.append(("ip_adapter.model", problem))
    return found


def preprocessor_names(models_dir: Path) -> list[str]:
    """Every preprocessor a unit may name: the weight-free ones and the annotators found."""
    from genserve.engine.conditioning.preprocess import ALIASES, PREPROCESSORS

    return sorted({*PREPROCESSORS, *ALIASES, *scan_annotators(models_dir)})


def preprocessor_problem(name: str, models_dir: Path) -> str | None:
    from genserve.engine.conditioning.preprocess import canonical_name

    key = canonical_name(name)
    known = preprocessor_names(models_dir)
    annotators = scan_annotators(models_dir)
    if key in known or (key.startswith("depth") and "depth" in annotators):
        return None
    return f"unknown preprocessor '{name}'; known: {', '.join(known)} (GET /v1/preprocessors)"

"""The LoRA registry: `<models_dir>/lora/*.safetensors` and the built-in companions, read from file
headers only (no torch), so the API lists and checks LoRAs without an ML stack.

Each file is described by its tensor names:

- **format**: `diffusers` (peft names, `unet.…lora_A.weight` / `lora.down.weight`), `kohya`
  (A1111/kohya-ss names, `lora_unet_…lora_down.weight`, `lora_te[12]_…`), or LyCORIS `loha`
  (`hada_w1_a`…) / `lokr` (`lokr_w1`…) / Tucker (`lora_mid`), which diffusers cannot load: they are
  listed with `supported = False` and a request naming one gets a 422 saying so.
- **family**: SD3 from `transformer.` / `lora_transformer_` names; SDXL from a second text encoder
  (`text_encoder_2.`, `lora_te2_`), SGM UNet names (`lora_unet_input_blocks_…`) or a cross-attention
  width of 2048 (SDXL base) or 1280 (refiner); else SD1.x/2.x. A model card's front matter
  (`<name>.md`, `genserve: {family, base_model}`) may say it outright.
- **cross_attention_dim**: the input width of a cross-attention key projection's LoRA, where the
  file has one; the engine compares it with the model's before loading.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from genserve.engine.models.registry import (
    BUILTIN_MODELS_DIR,
    Family,
    UnknownModelFormat,
    _card_block,
    _card_front_matter,
    _safetensors_header,
)

if TYPE_CHECKING:
    from genserve.config import Settings

logger = logging.getLogger(__name__)

LORA_SUBDIR = "lora"
BUILTIN_LORA_DIR = BUILTIN_MODELS_DIR / LORA_SUBDIR
LoraFormat = Literal["diffusers", "kohya", "loha", "lokr", "tucker"]
UNSUPPORTED_FORMATS = {"loha": "LyCORIS LoHa", "lokr": "LyCORIS LoKr", "tucker": "LyCORIS Tucker (lora_mid)"}
_SDXL_CROSS_DIMS = (2048, 1280)
_CROSS_KEY = re.compile(r"attn2[._]to_k[._](?:lora_A|lora[._]down|lora_down)[._]weight$")


@dataclass(frozen=True)
class LoraInfo:
    name: str
    path: Path
    family: Family
    format: LoraFormat
    cross_attention_dim: int | None = None
    base_model: str | None = None  # the model card's, where it names one
    description: str | None = None  # the model card's first paragraph
    license: str | None = None
    size_bytes: int = 0

    @property
    def supported(self) -> bool:
        return self.format not in UNSUPPORTED_FORMATS

    def unsupported_reason(self) -> str | None:
        if self.supported:
            return None
        return (
            f"LoRA '{self.name}' is a {UNSUPPORTED_FORMATS[self.format]} file, which diffusers cannot "
            "load; convert it to a plain LoRA (kohya or diffusers format)"
        )


def lora_dirs(models_dir: Path, builtin: bool) -> list[Path]:
    """Where LoRAs are looked for, first wins on a name clash."""
    return [Path(models_dir) / LORA_SUBDIR] + ([BUILTIN_LORA_DIR] if builtin else [])


def scan_loras(models_dir: Path, *, builtin: bool = False) -> dict[str, LoraInfo]:
    """Every readable LoRA by name (file stem); unreadable files are skipped with a warning."""
    found: dict[str, LoraInfo] = {}
    for folder in lora_dirs(models_dir, builtin):
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.safetensors")):
            if path.stem in found:
                continue
            try:
                found[path.stem] = read_lora_info(path)
            except Exception as error:  # one bad file must never stop the scan
                logger.warning("skipping LoRA %s: %s", path, error)
    return found


def registered_loras(settings: Settings) -> dict[str, LoraInfo]:
    """The LoRAs a server with these settings serves; rescanned when a LoRA folder changes."""
    dirs = lora_dirs(settings.models_dir, settings.builtin_models)
    return _cached_scan(str(settings.models_dir), settings.builtin_models, tuple(_mtime(d) for d in dirs))


@lru_cache(maxsize=8)
def _cached_scan(models_dir: str, builtin: bool, _mtimes: tuple[int, ...]) -> dict[str, LoraInfo]:
    return scan_loras(Path(models_dir), builtin=builtin)


def _mtime(folder: Path) -> int:
    try:
        return os.stat(folder).st_mtime_ns
    except OSError:
        return 0


def read_lora_info(path: Path) -> LoraInfo:
    """Describe one LoRA file; raises UnknownModelFormat if its tensor names are no LoRA's."""
    keys = _safetensors_header(path)
    lora_format = detect_lora_format(list(keys), path)
    card = path.with_suffix(".md")
    block = _card_block(card)
    cross = cross_attention_dim(keys)
    family = block.get("family") or detect_lora_family(list(keys), cross)
    if family not in ("sd15", "sdxl", "sd3"):
        raise UnknownModelFormat(f"{path.name}: the card's family {family!r} is not sd15, sdxl or sd3")
    base = block.get("base_model")
    license_id = _card_front_matter(card).get("license")
    return LoraInfo(
        name=path.stem,
        path=path,
        family=family,
        format=lora_format,
        cross_attention_dim=cross,
        base_model=None if base is None else str(base),
        description=_first_paragraph(card),
        license=None if license_id is None else str(license_id),
        size_bytes=path.stat().st_size,
    )


def detect_lora_format(keys: list[str], path: Path | str = "file") -> LoraFormat:
    if any("hada_" in key for key in keys):
        return "loha"
    if any("lokr_" in key for key in keys):
        return "lokr"
    if any(".lora_mid." in key for key in keys):
        return "tucker"
    if any(
        key.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_transformer_"))
        for key in keys
    ):
        return "kohya"
    if any(("lora_A." in key or "lora.down." in key or "lora_linear_layer." in key) for key in keys):
        return "diffusers"
    raise UnknownModelFormat(f"{Path(path).name}: tensor names are no LoRA's; first keys: {sorted(keys)[:3]}")


def detect_lora_family(keys: list[str], cross_dim: int | None) -> Family:
    if any(key.startswith(("transformer.", "lora_transformer_")) for key in keys):
        return "sd3"
    sdxl_names = ("text_encoder_2.", "lora_te2_", "lora_unet_input_blocks_", "lora_unet_output_blocks_")
    if any(key.startswith(sdxl_names) for key in keys) or cross_dim in _SDXL_CROSS_DIMS:
        return "sdxl"
    return "sd15"


def cross_attention_dim(keys: dict[str, tuple[str, list[int]]]) -> int | None:
    """The input width of the first cross-attention key projection's LoRA down matrix (r, in)."""
    for key, (_, shape) in keys.items():
        if _CROSS_KEY.search(key) and len(shape) == 2:
            return int(shape[1])
    return None


def _first_paragraph(card: Path) -> str | None:
    try:
        text = card.read_text()
    except (OSError, UnicodeDecodeError):
        return None
    if text.startswith("---"):
        text = text.split("---", 2)[2]
    for paragraph in text.split("\n\n"):
        lines = [line for line in paragraph.strip().splitlines() if not line.startswith("#")]
        if lines:
            return " ".join(line.strip() for line in lines)[:500]
    return None


def builtin_loras() -> dict[str, LoraInfo]:
    """The LoRAs shipped with genserve (what an Engine built without a LoRA registry serves)."""
    return _cached_scan(str(Path("/nonexistent-models-dir")), True, (_mtime(BUILTIN_LORA_DIR),))

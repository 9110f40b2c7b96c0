"""Upscalers and face restorers in the models directory, read from file headers only (no torch).

Where they go:

- `<models_dir>/upscale/`: super-resolution models (ESRGAN and Real-ESRGAN, Real-ESRGAN Compact,
  SPAN, SwinIR, HAT, DAT, OmniSR, ...): anything spandrel loads. Face restorers (GFPGAN,
  RestoreFormer; CodeFormer only with `spandrel_extra_arches`, see docs/upscale.md) may sit here
  or in `<models_dir>/facerestore/`.
- `<models_dir>/facedetect/`: the face detector for face restoration, an OpenCV YuNet ONNX file
  (`face_detection_yunet_*.onnx`, run by cv2.FaceDetectorYN). Nothing downloads at run time.

`.safetensors` is preferred; `.pth`/`.pt`/`.ckpt` files are read here without unpickling
(pickletools lists the tensor names) and loaded later only through spandrel's restricted
unpickler. The architecture comes from the tensor names (the same key patterns spandrel detects
by), the scale from the output convolution's shape where the header gives shapes, else from the
model card's `genserve: {scale: N}` or the file name ("4x-…", "…_x2"); what stays unknown here
is filled when the worker loads the model (spandrel's ModelDescriptor). A file whose tensor names
match no known architecture is skipped with a warning naming it, and a request naming it gets 422.
"""

from __future__ import annotations

import logging
import math
import pickletools
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from genserve.engine.models import registry

logger = logging.getLogger(__name__)

UpscalerKind = Literal["upscaler", "face_restorer"]
UPSCALE_DIR, FACE_RESTORE_DIR, FACE_DETECT_DIR = registry.NON_MODEL_FOLDERS  # the image-model scan skips them
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")

# (architecture id as spandrel names it, kind, keys that must all be present). First match wins,
# so more specific patterns come first.
_SIGNATURES: tuple[tuple[str, UpscalerKind, tuple[str, ...]], ...] = (
    ("GFPGAN", "face_restorer", ("toRGB.0.weight", "stylegan_decoder.style_mlp.1.weight")),
    ("CodeFormer", "face_restorer", ("position_emb", "quantize.embedding.weight")),
    (
        "RestoreFormer",
        "face_restorer",
        ("encoder.conv_in.weight", "quantize.embedding.weight", "decoder.conv_out.weight"),
    ),  # fmt: skip
    ("HAT", "upscaler", ("layers.0.residual_group.blocks.0.conv_block.cab.0.weight",)),
    ("SwinIR", "upscaler", ("layers.0.residual_group.blocks.0.norm1.weight", "conv_first.weight")),
    ("DAT", "upscaler", ("layers.0.blocks.0.ffn.fc1.weight",)),
    ("SPAN", "upscaler", ("conv_1.sk.weight", "block_1.c1_r.sk.weight")),
    ("OmniSR", "upscaler", ("residual_layer.0.residual_layer.0.layer.0.fn.0.weight",)),
    ("ESRGAN", "upscaler", ("model.0.weight", "model.1.sub.0.RDB1.conv1.0.weight")),
    ("ESRGAN", "upscaler", ("conv_first.weight", "body.0.rdb1.conv1.weight")),  # basicsr's RRDBNet
    ("RealCUGAN", "upscaler", ("unet1.conv1.conv.0.weight",)),
    ("Compact", "upscaler", ("body.0.weight", "body.1.weight")),  # Real-ESRGAN Compact (SRVGGNet)
)
_NAME_SCALE = re.compile(r"(?:^|[^0-9a-z])(?:([1-8])x|x([1-8]))(?:[^0-9a-z]|$)", re.IGNORECASE)


class UnknownUpscaler(ValueError):
    """A file in upscale/ or facerestore/ that no supported architecture matches."""


@dataclass(frozen=True)
class UpscalerInfo:
    name: str  # the file stem
    path: Path
    kind: UpscalerKind
    architecture: str  # spandrel's architecture id ("ESRGAN", "Compact", "GFPGAN", ...)
    scale: int | None  # None: known once loaded
    format: Literal["safetensors", "pickle"]
    dtype: str
    license: str | None = None


def scan_upscalers(models_dir: Path, *, builtin: bool = False) -> dict[str, UpscalerInfo]:
    """Upscalers and face restorers in models_dir/upscale/ and /facerestore/ (and the built-in
    ones when `builtin`), by name; unreadable or unknown files are skipped with a warning."""
    found: dict[str, UpscalerInfo] = {}
    roots = [Path(models_dir)] + ([registry.BUILTIN_MODELS_DIR] if builtin else [])
    for root in roots:
        for folder in (root / UPSCALE_DIR, root / FACE_RESTORE_DIR):
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                if path.name.startswith(".") or path.suffix not in WEIGHT_SUFFIXES:
                    continue
                try:
                    info = read_upscaler_info(path)
                except Exception as error:  # one bad file must never stop the scan
                    logger.warning("skipping %s: %s", path, error)
                    continue
                found.setdefault(info.name, info)
    return found


def face_detectors(models_dir: Path) -> list[Path]:
    """YuNet ONNX files in models_dir/facedetect/, by name."""
    folder = Path(models_dir) / FACE_DETECT_DIR
    return sorted(folder.glob("*.onnx")) if folder.is_dir() else []


def read_upscaler_info(path: Path) -> UpscalerInfo:
    path = Path(path)
    if path.suffix == ".safetensors":
        shapes = {name: shape for name, (_, shape) in registry._safetensors_header(path).items()}
        dtype, fmt = registry._majority_dtype(registry._safetensors_header(path)), "safetensors"
    else:
        shapes = {name: [] for name in pickle_keys(path)}
        dtype, fmt = "unknown", "pickle"
    architecture, kind = detect_architecture(shapes, path)
    card = path.with_suffix(".md")
    block = registry._card_block(card)
    scale = registry._positive_int(block.get("scale")) or _header_scale(architecture, shapes)
    if scale is None and kind == "face_restorer":
        scale = 1
    return UpscalerInfo(
        path.stem, path, kind, architecture, scale or _name_scale(path.stem), fmt,  # type: ignore[arg-type]
        dtype, registry._card_license(card),
    )  # fmt: skip


def detect_architecture(shapes: dict[str, list[int]], path: Path) -> tuple[str, UpscalerKind]:
    keys = shapes.keys()
    stripped = {
        key.removeprefix("module.").removeprefix("params_ema.").removeprefix("params.") for key in keys
    }
    for architecture, kind, required in _SIGNATURES:
        if all(key in stripped for key in required):
            return architecture, kind
    raise UnknownUpscaler(
        f"{path.name}: its tensor names match no architecture spandrel loads that genserve knows "
        f"(first keys: {sorted(keys)[:3]})"
    )


def _header_scale(architecture: str, shapes: dict[str, list[int]]) -> int | None:
    """The scale from the last convolution's output channels (3·scale² before a pixel shuffle)."""
    if architecture == "Compact":
        last = max((int(k.split(".")[1]) for k in shapes if k.startswith("body.") and k.endswith(".weight")
                    and len(shapes[k]) == 4), default=None)  # fmt: skip
        if last is None:
            return None
        return _shuffle_scale(shapes[f"body.{last}.weight"])
    if architecture == "SPAN":
        return _shuffle_scale(shapes.get("upsampler.0.weight", []))
    return None


def _shuffle_scale(shape: list[int]) -> int | None:
    if len(shape) != 4 or shape[0] % 3:
        return None
    scale = math.isqrt(shape[0] // 3)
    return scale if scale * scale * 3 == shape[0] else None


def _name_scale(stem: str) -> int | None:
    match = _NAME_SCALE.search(stem)
    return int(match.group(1) or match.group(2)) if match else None


def pickle_keys(path: Path, limit: int = 200_000) -> list[str]:
    """The strings in a torch pickle (the state dict's keys among them), read with pickletools:
    nothing is unpickled. Zip checkpoints hold the pickle in `<archive>/data.pkl`; legacy files
    are a few pickles in a row (magic number, protocol, system info, the object)."""
    strings: list[str] = []

    def collect(stream) -> None:  # noqa: ANN001
        for opcode, arg, _ in pickletools.genops(stream):
            if isinstance(arg, str) and opcode.name in ("BINUNICODE", "SHORT_BINUNICODE", "UNICODE",
                                                        "BINUNICODE8"):  # fmt: skip
                strings.append(arg)
                if len(strings) > limit:
                    return

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if not names:
                raise UnknownUpscaler(f"{path.name}: a zip file without data.pkl is not a torch checkpoint")
            with archive.open(names[0]) as stream:
                collect(stream)
    else:
        with open(path, "rb") as stream:
            try:
                for _ in range(4):
                    collect(stream)
            except Exception as error:  # not a pickle at all, or truncated
                if not strings:
                    raise UnknownUpscaler(f"{path.name}: not a torch checkpoint ({error})") from None
    return strings


DEFAULT_UPSCALER = "genserve-shapes-2x"  # built in: genserve-shapes' pictures, 64 → 128


def default_upscaler(upscalers: dict[str, UpscalerInfo]) -> str | None:
    """The upscaler a client that names none gets: the built-in one, else the first by name."""
    if DEFAULT_UPSCALER in upscalers:
        return DEFAULT_UPSCALER
    names = sorted(name for name, info in upscalers.items() if info.kind == "upscaler")
    return names[0] if names else None

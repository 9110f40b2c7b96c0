"""The model registry: what is in the models directory, read from file headers only.

This module imports neither torch nor diffusers, so the API server can list models and validate
requests without loading an ML stack.

Two on-disk formats are recognised:

- **diffusers folders** (`model_index.json` plus one subfolder per component). The family comes
  from the pipeline class in `model_index.json`; the native size is the denoiser's `sample_size`
  times the VAE scale factor, `2 ** (len(vae.block_out_channels) - 1)`.
- **single-file checkpoints** (`<name>.safetensors`, the original Stability/A1111 layout). The
  family comes from the tensor names in the safetensors header; the native size is the family's
  default (SD2 checkpoints are recognised by their OpenCLIP text encoder and get 768).

Loading a single file offline: the file holds weights only, so the model configs, tokenizers and
scheduler config must come from somewhere without a hub. The engine loads it with
`<FamilyPipeline>.from_single_file(path, config=<folder>, local_files_only=True)`, where `<folder>`
is a diffusers-format folder of the same family in the models directory (the first by name).
Without such a folder, loading fails with a `ModelLoadError` saying so. What works:

- a complete checkpoint (denoiser, VAE and the CLIP text encoders in the file), with a folder whose
  component configs describe the same architecture: an SD1.5 folder for SD1.5 fine-tunes, an SD2
  folder for SD2 files (both are family "sd15"; a mismatch fails with a shape error);
- components the folder marks absent (`[null, null]` in model_index.json, e.g. SD3 without T5)
  are left out.

What does not: a file that lacks a component the folder has (a UNet-only file, an SD3 file
without T5 next to a folder with T5). diffusers takes those from the folder only for diffusers-named
weights, so it reports the component as missing.

Video models (kind "video") are diffusers folders too, recognised by the pipeline class in
`model_index.json` through `video.families.VIDEO_PIPELINES` (family and the modes the folder
serves), or a bare `MotionAdapter` folder (config.json) whose model card names its base image model
(`genserve: {base_model: ...}`): AnimateDiff on that base. Their native size is the denoiser's
`sample_size` times the VAE's spatial factor where the configs give one (SVD, AnimateDiff), else the
card's `genserve.native_size`, else the family default (Wan and LTX transformers have no sample
size). Frames and fps default to the card's `default_frames`/`default_fps`, else the family's.
Every model's card may give a `license:`; ModelInfo.license carries it.
"""

from __future__ import annotations

import json
import logging
import struct
from collections import Counter
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from genserve.engine.video.families import MOTION_ADAPTER_CLASSES, VIDEO_FAMILIES, VIDEO_PIPELINES
from genserve.schemas.generation import DEFAULT_CFG_SCALE, SAMPLER_NAMES, GenerationParams

if TYPE_CHECKING:
    from genserve.config import Settings

logger = logging.getLogger(__name__)

Family = Literal["sd15", "sdxl", "sd3", "wan", "ltx", "svd", "animatediff", "animatediff_sdxl"]
ModelKind = Literal["image", "video"]
ModelFormat = Literal["diffusers", "single_file"]

# Which samplers each family supports. SD3 is a flow-matching model: DPM++ and UniPC have flow
# variants in diffusers; "euler_a" is left out because SD3's pipeline does not pass the seeded
# generator to the scheduler (the noise would not follow the seed), and DDIM and Karras sigmas
# assume a variance-preserving noise schedule.
SUPPORTED_SAMPLERS: dict[Family, tuple[str, ...]] = {
    "sd15": SAMPLER_NAMES,
    "sdxl": SAMPLER_NAMES,
    "sd3": ("euler", "dpmpp_2m", "unipc"),
}

PIPELINE_FAMILIES: dict[str, Family] = {
    "StableDiffusionPipeline": "sd15",  # SD1.x and SD2.x
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    # Inpainting checkpoints: the same families with a 9-channel UNet (latents + mask + masked picture)
    "StableDiffusionInpaintPipeline": "sd15",
    "StableDiffusionXLInpaintPipeline": "sdxl",
    # An SDXL refiner (text_encoder_2 only, aesthetic-score time ids) is saved in the img2img layout
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
}
INPAINT_UNET_CHANNELS = 9

DEFAULT_NATIVE_SIZE: dict[Family, int] = {"sd15": 512, "sdxl": 1024, "sd3": 1024}
SD2_NATIVE_SIZE = 768

# Subfolders of a models directory that hold other kinds of models (engine/models/upscalers.py).
NON_MODEL_FOLDERS = ("upscale", "facerestore", "facedetect")

_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # real headers are a few MB; anything larger is not safetensors


class UnknownModelFormat(ValueError):
    """A models-directory entry that is not a recognised Stable Diffusion checkpoint."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: Path
    family: Family
    format: ModelFormat
    native_width: int
    native_height: int
    dtype: str  # dtype of the stored denoiser weights ("float16", "float32", ...), or "unknown"
    # Defaults from the model card's front matter (`genserve:` block), where it names them.
    default_cfg_scale: float | None = None
    default_steps: int | None = None
    default_sampler: str | None = None
    # An inpainting checkpoint: its UNet takes the mask and the masked picture's latents as well.
    inpainting: bool = False
    # An SDXL refiner: it finishes another SDXL model's latents (request.refiner), never runs alone.
    refiner: bool = False
    kind: ModelKind = "image"
    license: str | None = None  # the model card's front-matter `license:`
    # Video models: the modes the folder serves (video.families.VIDEO_MODES), frames and fps a
    # request that names none gets, and, for a motion adapter, the image model it runs on.
    video_modes: tuple[str, ...] = ()
    default_frames: int | None = None
    default_fps: int | None = None
    base_model: str | None = None

    @property
    def request_cfg_scale(self) -> float:
        """The CFG scale a request that names none gets: the model card's, else the global default."""
        return self.default_cfg_scale if self.default_cfg_scale is not None else DEFAULT_CFG_SCALE

    @property
    def request_steps(self) -> int:
        """The steps a request that names none gets: the model card's, else the schema's default."""
        return self.default_steps or GenerationParams.model_fields["steps"].default

    @property
    def request_sampler(self) -> str:
        return self.default_sampler or GenerationParams.model_fields["sampler"].default


# Folders of the models directory that hold control models, not base models (models/controls.py).
CONTROL_MODEL_DIRS = frozenset({"controlnet", "t2i_adapter", "ipadapter", "annotators"})

# Models shipped inside the package (the trained default, genserve-shapes); see builtin_models/.
BUILTIN_MODELS_DIR = Path(__file__).resolve().parents[2] / "builtin_models"


def scan_models(models_dir: Path, *, builtin: bool = False) -> dict[str, ModelInfo]:
    """Every readable model in `models_dir`, by name (folder name or file stem), plus the models
    shipped with genserve when `builtin` is set (a models_dir entry of the same name wins).

    Entries that are not models, or cannot be read, are skipped with a logged warning.
    """
    models = _scan_dir(Path(models_dir), quiet_if_missing=builtin)
    if builtin:
        for name, info in _scan_dir(BUILTIN_MODELS_DIR, quiet_if_missing=False).items():
            models.setdefault(name, info)
    return models


def registered_models(settings: Settings) -> dict[str, ModelInfo]:
    """The models a server with these settings serves: models_dir, plus the built-in ones if enabled."""
    return scan_models(settings.models_dir, builtin=settings.builtin_models)


def _scan_dir(models_dir: Path, *, quiet_if_missing: bool) -> dict[str, ModelInfo]:
    if not models_dir.is_dir():
        if not quiet_if_missing:
            logger.warning("models directory %s does not exist; no models registered from it", models_dir)
        return {}
    models: dict[str, ModelInfo] = {}
    for entry in sorted(models_dir.iterdir()):
        if entry.is_dir() and entry.name in NON_MODEL_FOLDERS:  # upscalers, face models
            continue
        if entry.name.startswith(".") or (entry.is_dir() and entry.name in CONTROL_MODEL_DIRS):
            continue
        if entry.name == "lora":  # the LoRA folder: models/loras.py
            continue
        try:
            info = read_model_info(entry)
        except Exception as error:  # one bad entry must never stop the scan
            logger.warning("skipping %s: %s", entry, error)
            continue
        if info.name in models:
            logger.warning(
                "skipping %s: model name '%s' is already taken by %s",
                entry,
                info.name,
                models[info.name].path,
            )
            continue
        models[info.name] = info
    return models


def read_model_info(path: Path) -> ModelInfo:
    """Describe one models-directory entry; raises UnknownModelFormat if it is not a model."""
    path = Path(path)
    if path.is_dir() and _video_class(path) is not None:
        return _video_model_info(path)
    family = detect_family(path)
    if path.is_dir():
        width, height = _diffusers_native_size(path, family)
        return ModelInfo(
            path.name,
            path,
            family,
            "diffusers",
            width,
            height,
            _diffusers_dtype(path),
            **_model_card_defaults(path / "README.md"),
            license=_card_license(path / "README.md"),
            inpainting=_diffusers_unet_channels(path) == INPAINT_UNET_CHANNELS,
            refiner=_diffusers_is_refiner(path),
        )
    keys_and_dtypes = _safetensors_header(path)
    size = SD2_NATIVE_SIZE if family == "sd15" and _is_sd2(keys_and_dtypes) else DEFAULT_NATIVE_SIZE[family]
    return ModelInfo(
        path.stem,
        path,
        family,
        "single_file",
        size,
        size,
        _majority_dtype(keys_and_dtypes),
        inpainting=_single_file_unet_channels(keys_and_dtypes) == INPAINT_UNET_CHANNELS,
    )


def detect_family(path: Path) -> Family:
    """The model family of a diffusers folder or a single-file `.safetensors` checkpoint."""
    path = Path(path)
    if path.is_dir():
        return _diffusers_family(path)
    if path.suffix == ".safetensors":
        return _single_file_family(_safetensors_header(path), path)
    raise UnknownModelFormat(
        f"{path.name}: not a model (expected a diffusers folder with model_index.json or a .safetensors file)"
    )


def sampler_supported(family: Family, sampler: str) -> bool:
    return sampler in SUPPORTED_SAMPLERS.get(family, ())


# 1. Diffusers folders


def _diffusers_family(folder: Path) -> Family:
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise UnknownModelFormat(
            f"{folder.name}: folder has no model_index.json, so it is not a diffusers model"
        )
    class_name = _read_json(index_file).get("_class_name")
    if class_name not in PIPELINE_FAMILIES:
        raise UnknownModelFormat(
            f"{folder.name}: pipeline class {class_name!r} is not supported "
            f"(supported: {', '.join(sorted(PIPELINE_FAMILIES))})"
        )
    return PIPELINE_FAMILIES[class_name]


def _diffusers_native_size(folder: Path, family: Family) -> tuple[int, int]:
    denoiser = "transformer" if family == "sd3" else "unet"
    try:
        sample_size = _read_json(folder / denoiser / "config.json")["sample_size"]
        vae_blocks = _read_json(folder / "vae" / "config.json")["block_out_channels"]
    except (OSError, KeyError, ValueError) as error:
        default = DEFAULT_NATIVE_SIZE[family]
        logger.warning(
            "%s: cannot read the native size (%s); assuming %dx%d", folder.name, error, default, default
        )
        return default, default
    scale = 2 ** (len(vae_blocks) - 1)
    # sample_size is the latent size: one int, or [height, width] for non-square models.
    height, width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
    return width * scale, height * scale


def _diffusers_unet_channels(folder: Path) -> int | None:
    try:
        return int(_read_json(folder / "unet" / "config.json")["in_channels"])
    except (OSError, KeyError, ValueError, TypeError, UnknownModelFormat):
        return None  # SD3 (a transformer) or an unreadable config: not an inpainting UNet


def _diffusers_is_refiner(folder: Path) -> bool:
    """An SDXL refiner as Stability ships it: the img2img pipeline with no first text encoder and
    time ids that carry an aesthetic score instead of the target size."""
    index = _read_json(folder / "model_index.json")
    return (
        index.get("_class_name") == "StableDiffusionXLImg2ImgPipeline"
        and index.get("requires_aesthetics_score") is True
        and index.get("text_encoder", [None, None])[:2] == [None, None]
    )


def _diffusers_dtype(folder: Path) -> str:
    # The denoiser holds most of the weights; without a variant suffix it is what from_pretrained loads.
    for denoiser in ("unet", "transformer"):
        files = sorted((folder / denoiser).glob("*.safetensors"), key=lambda f: (f.name.count("."), f.name))
        if files:
            try:
                return _majority_dtype(_safetensors_header(files[0]))
            except (OSError, UnknownModelFormat):
                return "unknown"
    return "unknown"


def _card_front_matter(card: Path) -> dict[str, Any]:
    """A model card's YAML front matter, or {} when there is none or it cannot be read."""
    try:
        text = card.read_text()
    except (OSError, UnicodeDecodeError):
        return {}
    if not text.startswith("---"):
        return {}
    try:
        front = yaml.safe_load(text.split("---", 2)[1])
    except yaml.YAMLError as error:
        logger.warning("%s: ignoring unreadable front matter (%s)", card, error)
        return {}
    return front if isinstance(front, dict) else {}


def _card_block(card: Path) -> dict[str, Any]:
    block = _card_front_matter(card).get("genserve")
    return block if isinstance(block, dict) else {}


def _card_license(card: Path) -> str | None:
    """The card's front-matter `license:` (Hugging Face ids: apache-2.0, openrail-m, other, ...)."""
    license_id = _card_front_matter(card).get("license")
    return None if license_id is None else str(license_id)


def _model_card_defaults(card: Path) -> dict[str, Any]:
    """`genserve: {default_cfg_scale, default_steps, default_sampler}` from a model card's YAML front
    matter, as ModelInfo fields; what it leaves out, or cannot be read, is left out."""
    try:
        text = card.read_text()
    except OSError:
        return {}
    if not text.startswith("---"):
        return {}
    front_matter = text.split("---", 2)[1]
    try:
        block = (yaml.safe_load(front_matter) or {}).get("genserve", {}) or {}
        defaults: dict[str, Any] = {}
        if block.get("default_cfg_scale") is not None:
            defaults["default_cfg_scale"] = float(block["default_cfg_scale"])
        if block.get("default_steps") is not None:
            defaults["default_steps"] = int(block["default_steps"])
        if block.get("default_sampler") in SAMPLER_NAMES:
            defaults["default_sampler"] = block["default_sampler"]
        return defaults
    except (yaml.YAMLError, AttributeError, TypeError, ValueError) as error:
        logger.warning("%s: ignoring unreadable front matter (%s)", card, error)
        return {}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UnknownModelFormat(f"{path}: invalid JSON ({error})") from error
    if not isinstance(data, dict):
        raise UnknownModelFormat(f"{path}: expected a JSON object")
    return data


# 2. Video folders


def _video_class(folder: Path) -> str | None:
    """The video pipeline (or MotionAdapter) class a folder holds, or None for anything else."""
    for name in ("model_index.json", "config.json"):
        try:
            class_name = _read_json(folder / name).get("_class_name")
        except (OSError, UnknownModelFormat):
            continue
        if class_name in VIDEO_PIPELINES or class_name in MOTION_ADAPTER_CLASSES:
            return class_name
    return None


def _video_model_info(folder: Path) -> ModelInfo:
    class_name = _video_class(folder)
    card = folder / "README.md"
    block = _card_block(card)
    defaults = _model_card_defaults(card)
    if class_name in MOTION_ADAPTER_CLASSES:
        base_model = block.get("base_model")
        if not isinstance(base_model, str) or not base_model:
            raise UnknownModelFormat(
                f"{folder.name}: a MotionAdapter folder needs `genserve: {{base_model: <image model>}}` in its README.md"
            )
        family, modes = str(block.get("family") or "animatediff"), ("t2v", "v2v")
        if family not in ("animatediff", "animatediff_sdxl"):
            raise UnknownModelFormat(
                f"{folder.name}: a motion adapter's family must be animatediff or animatediff_sdxl"
            )
        if family == "animatediff_sdxl":
            modes = ("t2v",)
        size = None
        dtype = _folder_dtype(folder)
    else:
        family, modes = VIDEO_PIPELINES[class_name]
        base_model = None
        size = _video_denoiser_size(folder, family)
        dtype = _diffusers_dtype(folder)
    spec = VIDEO_FAMILIES[family]
    if size is None:
        native = _positive_int(block.get("native_size"))
        size = (native, native) if native else (spec.default_width, spec.default_height)
    return ModelInfo(
        folder.name,
        folder,
        family,  # type: ignore[arg-type]
        "diffusers",
        size[0],
        size[1],
        dtype,
        **defaults,
        kind="video",
        license=_card_license(card),
        video_modes=modes,
        default_frames=_positive_int(block.get("default_frames")) or spec.default_frames,
        default_fps=_positive_int(block.get("default_fps")) or spec.default_fps,
        base_model=base_model,
    )


def _video_denoiser_size(folder: Path, family: str) -> tuple[int, int] | None:
    """(width, height): the denoiser's sample_size times the VAE's spatial factor, where both are known."""
    try:
        vae = _read_json(folder / "vae" / "config.json")
        for denoiser in ("unet", "transformer"):
            config_file = folder / denoiser / "config.json"
            if config_file.is_file():
                sample_size = _read_json(config_file).get("sample_size")
                break
        else:
            return None
    except (OSError, UnknownModelFormat):
        return None
    if sample_size is None:
        return None
    if family == "wan":
        factor = vae.get("scale_factor_spatial") or 2 ** len(vae.get("temperal_downsample", [0, 0, 0]))
    elif family == "ltx":
        factor = vae.get("patch_size", 1) * 2 ** sum(bool(s) for s in vae.get("spatio_temporal_scaling", ()))
    else:
        factor = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    height, width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size[:2]
    return int(width) * int(factor), int(height) * int(factor)


def _folder_dtype(folder: Path) -> str:
    files = sorted(folder.glob("*.safetensors"), key=lambda f: (f.name.count("."), f.name))
    try:
        return _majority_dtype(_safetensors_header(files[0])) if files else "unknown"
    except (OSError, UnknownModelFormat):
        return "unknown"


def _positive_int(value: Any) -> int | None:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


# 3. Single-file checkpoints


def _single_file_family(keys_and_dtypes: dict[str, tuple[str, list[int]]], path: Path) -> Family:
    keys = keys_and_dtypes.keys()
    if any("joint_blocks." in key for key in keys):
        return "sd3"
    if any(key.startswith(("conditioner.embedders.1.", "model.diffusion_model.label_emb.")) for key in keys):
        return "sdxl"  # OpenCLIP-bigG second encoder, or the UNet's size/crop conditioning embedding
    if any(key.startswith(("cond_stage_model.", "model.diffusion_model.input_blocks.")) for key in keys):
        return "sd15"
    raise UnknownModelFormat(
        f"{path.name}: tensor names match no supported family (SD1.x/2.x, SDXL, SD3); "
        f"first keys: {sorted(keys)[:3]}"
    )


def _single_file_unet_channels(keys_and_dtypes: dict[str, tuple[str, list[int]]]) -> int | None:
    """Input channels of the UNet's first convolution (weight shape [out, in, 3, 3])."""
    _, shape = keys_and_dtypes.get("model.diffusion_model.input_blocks.0.0.weight", ("", []))
    return int(shape[1]) if len(shape) == 4 else None


def _is_sd2(keys_and_dtypes: dict[str, tuple[str, list[int]]]) -> bool:
    # SD1 uses OpenAI CLIP ("cond_stage_model.transformer."), SD2 OpenCLIP ("cond_stage_model.model.").
    return any(key.startswith("cond_stage_model.model.") for key in keys_and_dtypes)


def _safetensors_header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """Tensor name -> (safetensors dtype, shape), read from the header without loading any tensor.

    The format is an 8-byte little-endian header length, then that many bytes of JSON.
    """
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise UnknownModelFormat(f"{path.name}: too short to be a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length > _MAX_HEADER_BYTES:
            raise UnknownModelFormat(f"{path.name}: not a safetensors file (header length {length})")
        raw = file.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UnknownModelFormat(f"{path.name}: unreadable safetensors header ({error})") from error
    if not isinstance(header, dict):
        raise UnknownModelFormat(f"{path.name}: unreadable safetensors header (not a JSON object)")
    return {
        name: (entry.get("dtype", "?"), entry.get("shape", []))
        for name, entry in header.items()
        if name != "__metadata__" and isinstance(entry, dict)
    }


def _majority_dtype(keys_and_dtypes: dict[str, tuple[str, list[int]]]) -> str:
    """The dtype holding the most elements (checkpoints often keep a few small tensors in float32)."""
    elements: Counter[str] = Counter()
    for dtype, shape in keys_and_dtypes.values():
        elements[dtype] += prod(shape)
    if not elements:
        return "unknown"
    dtype = elements.most_common(1)[0][0]
    return _SAFETENSORS_DTYPES.get(dtype, dtype.lower())

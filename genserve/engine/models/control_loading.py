"""Loading control models (models/controls.py describes them) and weight-based annotators.

ControlNets, T2I-Adapters and IP-Adapter image encoders are small next to a base model; they are
kept loaded once used (one copy per name). An IP-Adapter's attention weights go into the base
pipeline's UNet for the batches that use it (`ip_adapter_loaded`) and come out after, so the cached
pipeline is unchanged for every other batch; its scale is per row (conditioning/ip_adapter.py).

Annotators (`<models_dir>/annotators/<name>/`, e.g. a transformers DPTForDepthEstimation folder) are
preprocessed with PIL and numpy: transformers 5's image processors need torchvision, which this
environment cannot import.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from genserve.engine.conditioning.ip_adapter import forget_row_scales, install_row_scales
from genserve.engine.models.controls import ControlInfo
from genserve.schemas.control import IPAdapterOptions


class ControlModels:
    """Loaded control models by name, on one device and dtype."""

    def __init__(self, device: str, dtype: torch.dtype) -> None:
        self.device = device
        self.dtype = dtype
        self._loaded: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, info: ControlInfo) -> Any:
        with self._lock:
            if info.name not in self._loaded:
                self._loaded[info.name] = self._load(info)
            return self._loaded[info.name]

    def _load(self, info: ControlInfo) -> Any:
        if info.kind == "controlnet":
            from diffusers import ControlNetModel, SD3ControlNetModel

            cls = SD3ControlNetModel if info.family == "sd3" else ControlNetModel
            model = cls.from_pretrained(info.path, torch_dtype=self.dtype, local_files_only=True)
        elif info.kind == "t2i_adapter":
            from diffusers import T2IAdapter

            model = T2IAdapter.from_pretrained(info.path, torch_dtype=self.dtype, local_files_only=True)
        else:
            from transformers import CLIPVisionModelWithProjection

            model = CLIPVisionModelWithProjection.from_pretrained(
                info.path / "image_encoder", dtype=self.dtype, local_files_only=True
            )
        return model.to(self.device).eval()

    def encode_images(self, info: ControlInfo, pictures: list[PIL.Image.Image]) -> torch.Tensor:
        """(1, images, D) CLIP image embeddings of the reference pictures (diffusers' encode_image)."""
        encoder = self.get(info)
        pixels = clip_pixels(pictures, encoder.config.image_size).to(device=self.device, dtype=encoder.dtype)
        return encoder(pixels).image_embeds[None]


# CLIP's normalisation (CLIPImageProcessor's image_mean / image_std).
_CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
_CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def clip_pixels(pictures: list[PIL.Image.Image], size: int) -> torch.Tensor:
    """CLIPImageProcessor's steps with PIL: shortest side to `size` (bicubic), centre crop, scale to
    [0, 1], normalise. Shape (images, 3, size, size)."""
    out = []
    for picture in pictures:
        picture = picture.convert("RGB")
        w, h = picture.size
        scale = size / min(w, h)
        picture = picture.resize(
            (max(size, round(w * scale)), max(size, round(h * scale))), PIL.Image.Resampling.BICUBIC
        )
        w, h = picture.size
        left, top = (w - size) // 2, (h - size) // 2
        array = np.asarray(picture.crop((left, top, left + size, top + size))).astype(np.float32) / 255.0
        out.append((array - _CLIP_MEAN) / _CLIP_STD)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def ip_adapter_scale(options: IPAdapterOptions, unet_config: Any) -> float | dict:
    """The scale to set: a float, or InstantStyle's style-only blocks (Wang et al. 2024): only the
    first up block with attention; with SDXL's three transformers there, only the middle one
    ({"up": {"block_0": [0, s, 0]}}, diffusers' InstantStyle example). `ip_adapter_loaded` sets it
    at scale 1 and leaves each row's own scale to `RowScales`."""
    if not options.style_only:
        return options.scale
    for k, block in enumerate(unet_config.up_block_types):
        if "CrossAttn" in block:
            layers = unet_config.layers_per_block
            count = (layers if isinstance(layers, int) else layers[-1 - k]) + 1
            scales = [0.0, options.scale, 0.0] if count == 3 else [options.scale] * count
            return {"up": {f"block_{k}": scales}}
    return options.scale


@contextlib.contextmanager
def ip_adapter_loaded(pipe: Any, info: ControlInfo, options: IPAdapterOptions) -> Iterator[None]:
    """The IP-Adapter's weights in the pipeline's UNet for the duration (image encoder: ours), its
    processors on at scale 1 where `options.style_only` says, each row's scale a `RowScales`."""
    pipe.load_ip_adapter(
        str(info.path),
        subfolder="",
        weight_name=info.weight_name,
        image_encoder_folder=None,
        local_files_only=True,
    )
    try:
        pipe.set_ip_adapter_scale(
            ip_adapter_scale(options.model_copy(update={"scale": 1.0}), pipe.unet.config)
        )
        install_row_scales(pipe.unet)
        yield
    finally:
        forget_row_scales(pipe.unet)
        pipe.unload_ip_adapter()


class Annotators:
    """Weight-based preprocessors from `<models_dir>/annotators/<name>/`, loaded once each."""

    def __init__(self, folders: dict[str, Path], device: str = "cpu") -> None:
        self.folders = folders
        self.device = device
        self._loaded: dict[str, Any] = {}

    def names(self) -> list[str]:
        return sorted(self.folders)

    def folder_for(self, name: str) -> Path | None:
        if name in self.folders:
            return self.folders[name]
        if name.startswith("depth") and "depth" in self.folders:  # depth_midas, depth_zoe, ...
            return self.folders["depth"]
        return None

    def __call__(self, name: str, image: np.ndarray) -> np.ndarray:
        folder = self.folder_for(name)
        if folder is None:
            raise ValueError(f"unknown preprocessor '{name}'")
        if name not in self._loaded:
            from transformers import AutoModelForDepthEstimation

            model = AutoModelForDepthEstimation.from_pretrained(folder, local_files_only=True)
            self._loaded[name] = model.to(self.device).eval()
        return depth_map(self._loaded[name], image)


@torch.inference_mode()
def depth_map(model: Any, image: np.ndarray) -> np.ndarray:
    """A depth estimator's map of `image` (uint8 RGB) as uint8 RGB, near = bright (MiDaS style).
    Input: resized to the model's image size, normalised with mean 0.5 and std 0.5 (DPT's)."""
    size = getattr(model.config, "image_size", 384)
    h, w = image.shape[:2]
    resized = np.asarray(PIL.Image.fromarray(image).resize((size, size), PIL.Image.Resampling.BICUBIC))
    pixels = torch.from_numpy((resized.astype(np.float32) / 255.0 - 0.5) / 0.5).permute(2, 0, 1)[None]
    depth = model(pixel_values=pixels.to(model.device, model.dtype)).predicted_depth.float()
    depth = torch.nn.functional.interpolate(depth[:, None], size=(h, w), mode="bicubic", align_corners=False)[
        0, 0
    ]
    low, high = depth.min(), depth.max()
    normalised = (depth - low) / (high - low) if high > low else torch.zeros_like(depth)
    gray = (normalised.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return np.repeat(gray[:, :, None], 3, axis=2)

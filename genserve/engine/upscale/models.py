"""Loading upscalers and face restorers with spandrel, and running an upscaler on a picture.

spandrel (`ModelLoader`) reads `.safetensors` directly and `.pth`/`.pt`/`.ckpt` only through its
restricted unpickler; it returns an `ImageModelDescriptor` with the scale, the architecture, the
size requirements (minimum side, multiple of, square), a tiling hint, and whether half precision
and bfloat16 work. spandrel is the `upscale` extra (it needs torchvision), so it is imported here,
when a model is first loaded, never by the registry or the API.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image
import torch

from genserve.engine.errors import EngineError, ModelLoadError
from genserve.engine.models.upscalers import UpscalerInfo
from genserve.engine.upscale.tiles import TileProgress, is_out_of_memory, upscale_tiled

if TYPE_CHECKING:
    from spandrel import ImageModelDescriptor

# Tiles at input coordinates, as ComfyUI's ImageUpscaleWithModel: 512 with 32 overlap on a GPU;
# on a CPU smaller tiles waste less on padding and keep memory flat.
DEFAULT_TILE = {"cuda": 512, "cpu": 256}
DEFAULT_OVERLAP = 32
DEFAULT_TILE_BATCH = 4
MIN_TILE = 64
MAX_PASSES = 3  # a 2x model asked for 8x runs three times, as AUTOMATIC1111 does


class UpscalerLoadError(ModelLoadError):
    """An upscaler or face restorer file spandrel cannot load (the message names the file)."""


def load_descriptor(info: UpscalerInfo, device: str, dtype: torch.dtype) -> ImageModelDescriptor:
    """The model in `info.path` on `device`, in `dtype` where its architecture supports it."""
    try:
        from spandrel import ImageModelDescriptor, ModelLoader
    except ImportError as error:  # the `upscale` extra is not installed
        raise UpscalerLoadError(
            f"loading {info.path.name} needs spandrel (pip install 'genserve[upscale]'): {error}"
        ) from None
    try:
        descriptor = ModelLoader(device=torch.device(device)).load_from_file(info.path)
    except Exception as error:  # UnsupportedModelError, a bad pickle, a truncated file
        raise UpscalerLoadError(
            f"{info.path.name}: spandrel cannot load it: {type(error).__name__}: {error}"
        ) from None
    if not isinstance(descriptor, ImageModelDescriptor):
        raise UpscalerLoadError(f"{info.path.name}: not an image model ({type(descriptor).__name__})")
    descriptor.eval()
    return descriptor.to(model_dtype(descriptor, device, dtype))


def model_dtype(descriptor: Any, device: str, dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 when the engine runs in it, on a GPU, and the architecture supports it."""
    if torch.device(device).type == "cpu":
        return torch.float32
    if dtype == torch.float16 and descriptor.supports_half:
        return torch.float16
    if dtype == torch.bfloat16 and descriptor.supports_bfloat16:
        return torch.bfloat16
    if dtype in (torch.float16, torch.bfloat16) and descriptor.supports_half:
        return torch.float16
    return torch.float32


class DescriptorCache:
    """The last few loaded upscalers and face restorers, by name (they are small)."""

    def __init__(self, device: str, dtype: torch.dtype, capacity: int = 3) -> None:
        self.device, self.dtype, self.capacity = device, dtype, capacity
        self._loaded: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, info: UpscalerInfo) -> ImageModelDescriptor:
        with self._lock:
            key = f"{info.name}:{info.path}"
            if key not in self._loaded:
                self._loaded[key] = load_descriptor(info, self.device, self.dtype)
                while len(self._loaded) > self.capacity:
                    self._loaded.popitem(last=False)
            self._loaded.move_to_end(key)
            return self._loaded[key]

    def names(self) -> list[str]:
        return [key.split(":", 1)[0] for key in self._loaded]


def tile_size(descriptor: Any, device: str, asked: int | None = None) -> int:
    """The tile side: asked or the device's default, rounded down to the model's `multiple_of`
    and at least its minimum."""
    requirements = descriptor.size_requirements
    tile = asked or DEFAULT_TILE.get(torch.device(device).type, 256)
    multiple = max(1, requirements.multiple_of)
    tile = max(tile // multiple * multiple, multiple)
    return max(tile, requirements.minimum)


@torch.inference_mode()
def upscale_pixels(
    descriptor: Any,
    pixels: torch.Tensor,
    *,
    tile: int,
    overlap: int = DEFAULT_OVERLAP,
    batch: int = DEFAULT_TILE_BATCH,
    on_progress: TileProgress | None = None,
) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1] → (1, 3, H·scale, W·scale): one pass of the model, tiled unless
    its architecture tiles internally (spandrel's ModelTiling.INTERNAL) or the picture fits one
    tile. A tile that runs out of memory even alone is halved, down to MIN_TILE."""
    from spandrel import ModelTiling

    device = next(descriptor.model.parameters()).device
    dtype = next(descriptor.model.parameters()).dtype
    pixels = pixels.to(device=device, dtype=dtype)

    def call(x: torch.Tensor) -> torch.Tensor:
        return descriptor(x)  # spandrel pads to the size requirements and clamps to [0, 1]

    height, width = pixels.shape[-2:]
    if descriptor.tiling == ModelTiling.INTERNAL or (height <= tile and width <= tile):
        tile = max(height, width)
    while True:
        try:
            overlap_at = min(overlap, tile // 4)
            return upscale_tiled(
                call,
                pixels,
                descriptor.scale,
                tile=tile,
                overlap=overlap_at,
                batch=batch,
                on_progress=on_progress,
            )
        except Exception as error:
            if not is_out_of_memory(error) or tile // 2 < max(MIN_TILE, descriptor.size_requirements.minimum):
                raise
            tile = tile_size(descriptor, str(device), tile // 2)
            batch = 1


def to_pixels(picture: PIL.Image.Image) -> torch.Tensor:
    array = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def to_picture(pixels: torch.Tensor) -> PIL.Image.Image:
    array = (pixels[0].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
    return PIL.Image.fromarray(array)


def upscale_picture(
    descriptor: Any,
    picture: PIL.Image.Image,
    width: int,
    height: int,
    *,
    device: str,
    tile: int | None = None,
    batch: int = DEFAULT_TILE_BATCH,
    on_progress: TileProgress | None = None,
) -> PIL.Image.Image:
    """`picture` upscaled by the model (as many passes as reach width × height, at most
    MAX_PASSES), then resampled with Lanczos to exactly width × height."""
    if descriptor.scale < 1:
        raise EngineError(f"model {descriptor.architecture.id} has scale {descriptor.scale}")
    passes, reach = 0, 1
    while passes < MAX_PASSES and (picture.width * reach < width or picture.height * reach < height):
        reach *= max(descriptor.scale, 1)
        passes += 1
        if descriptor.scale == 1:
            break
    passes = max(passes, 1)
    side = tile_size(descriptor, device, tile)
    with torch.inference_mode():
        pixels = to_pixels(picture)
        for index in range(passes):
            progress = None
            if on_progress is not None:
                progress = lambda done, total, i=index: on_progress(i * total + done, passes * total)  # noqa: E731
            pixels = upscale_pixels(descriptor, pixels, tile=side, batch=batch, on_progress=progress)
    result = to_picture(pixels)
    if result.size != (width, height):
        result = result.resize((width, height), PIL.Image.Resampling.LANCZOS)
    return result

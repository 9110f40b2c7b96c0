"""Control pictures in: each request's ControlNet / T2I-Adapter units and IP-Adapter references
become what its rows carry into the loop (`Row.controls`, `Row.image_embeds`).

A unit's picture goes through its preprocessor (weight-free ones in conditioning/preprocess.py,
weight-based annotators from the models directory), is fitted to the request's size, and is shared
by every row of the request. A T2I-Adapter's features are computed here, once per request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import PIL.Image
import torch

from genserve.engine.conditioning.control import (
    RowControl,
    adapter_features,
    control_map_tensor,
    sd3_control_latents,
)
from genserve.engine.conditioning.latents import encode_pixels
from genserve.engine.conditioning.preprocess import PREPROCESSORS, canonical_name, run_preprocessor
from genserve.engine.loop.denoise import BatchItem
from genserve.engine.loop.row import Row

# name -> (kind, loaded model): "controlnet" or "t2i_adapter"
LoadControl = Callable[[str], tuple[str, Any]]
# annotator name, RGB uint8 picture -> RGB uint8 map (weight-based preprocessors, e.g. depth)
Annotate = Callable[[str, np.ndarray], np.ndarray]
# reference pictures -> (1, images, D) image embeddings
EncodeImages = Callable[[list[PIL.Image.Image]], torch.Tensor]
# an SD3 ControlNet's map (1, 3, H, W) in [0, 1], the ControlNet -> its latents
EncodeMap = Callable[[torch.Tensor, Any], torch.Tensor]


def sd3_map_encoder(pipe: Any) -> EncodeMap:
    """Encodes SD3 control maps with the base pipeline's VAE (the SD3 ControlNet pipeline's phase 3:
    the map normalised to [-1, 1], then `sd3_control_latents` of the VAE's mean)."""

    def encode(image: torch.Tensor, model: Any) -> torch.Tensor:
        if getattr(model.config, "use_pos_embed", True) is False:
            # SD3.5's ControlNets patch-embed with the base transformer's (the pipeline's __init__)
            borrowed = model._get_pos_embed_from_transformer(pipe.transformer)
            model.pos_embed = borrowed.to(device=model.device, dtype=model.dtype)
        dist = encode_pixels(pipe, image * 2 - 1)
        return sd3_control_latents(dist.mean, pipe.vae.config, model).to(image.device)

    return encode


def preprocess_picture(
    name: str | None,
    picture: PIL.Image.Image,
    annotate: Annotate | None = None,
    threshold_a: float | None = None,
    threshold_b: float | None = None,
) -> np.ndarray:
    """The control map of `picture` (uint8 RGB) by the named preprocessor."""
    image = np.asarray(picture.convert("RGB"))
    key = canonical_name(name)
    if key in PREPROCESSORS:
        return run_preprocessor(key, image, threshold_a=threshold_a, threshold_b=threshold_b)
    if annotate is None:
        raise ValueError(f"unknown preprocessor '{name}'")
    return annotate(key, image)


def attach_controls(
    rows: list[Row],
    items: list[BatchItem],
    load_control: LoadControl,
    *,
    width: int,
    height: int,
    device: str,
    annotate: Annotate | None = None,
    encode_map: EncodeMap | None = None,
) -> None:
    """Give every row its request's control units (maps at width x height, on `device`).

    `encode_map` (SD3: `sd3_map_encoder`) turns a ControlNet's map into the latents it takes."""
    for i, item in enumerate(items):
        units = []
        for unit in item.params.controlnets or []:
            kind, model = load_control(unit.model)
            picture = item.control_images.get(unit.image)
            if picture is None:
                raise ValueError(f"the control picture {unit.image} was not loaded")
            control_map = preprocess_picture(
                unit.preprocessor, picture, annotate, unit.threshold_a, unit.threshold_b
            )
            image = control_map_tensor(control_map, width, height).to(device)
            features = adapter_features(model, image) if kind == "t2i_adapter" else None
            if encode_map is not None and kind == "controlnet":
                kind, image = "sd3_controlnet", encode_map(image, model)
            units.append(
                RowControl(model, kind, image, unit.scale, unit.start, unit.end, unit.mode, features)
            )
        if units:
            for row in rows:
                if row.item == i:
                    row.controls = units


def attach_image_embeds(rows: list[Row], items: list[BatchItem], encode_images: EncodeImages) -> None:
    """Each row's IP-Adapter image embeddings, from its request's reference pictures, and its scale."""
    for i, item in enumerate(items):
        ip = item.params.ip_adapter
        if ip is None:
            continue
        pictures = [item.control_images[ref] for ref in ip.images]
        embeds = encode_images(pictures)
        for row in rows:
            if row.item == i:
                row.image_embeds, row.ip_scale = embeds, ip.scale

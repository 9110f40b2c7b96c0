"""A request's pictures in, before the loop; and its images out, after it.

`prepare_picture` turns init_image, mask, outpaint and inpaint options into what the rows start from:
the picture at the request's width × height (what the VAE encodes), the repaint mask at that size,
and how to paste a generated image back. `paste_back` does the last part: the result is composited
with the original through the blurred mask, so pixels outside the mask come back unchanged (the VAE
round-trip alone would change them slightly).

Order (AUTOMATIC1111's): read the mask → invert → outpaint canvas → blur → "only masked" crop, or
fit to the request's size → pre-fill the masked area ("fill").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image

from genserve.engine.stages.geometry import Box, crop_box, fit_picture, pad_canvas, resize
from genserve.engine.stages.masks import blur_mask, composite, fill_masked, read_mask
from genserve.schemas.generation import GenerationParams
from genserve.schemas.image_inputs import InpaintFill, InpaintOptions


@dataclass(frozen=True)
class PasteBack:
    original: np.ndarray  # the picture the result goes into, uint8 (H, W, 3)
    mask: np.ndarray  # blurred repaint mask at the original's size
    box: Box | None  # where the generated image goes ("only masked"); None: the whole picture


@dataclass(frozen=True)
class Picture:
    """What a request's rows start from."""

    image: np.ndarray  # uint8 (height, width, 3): encoded by the VAE
    mask: np.ndarray | None  # float (height, width), 1 = repaint; None for plain img2img
    fill: InpaintFill
    paste: PasteBack | None


def prepare_picture(
    params: GenerationParams, init_image: PIL.Image.Image | None, mask: PIL.Image.Image | None
) -> Picture | None:
    """None for a text-only request. Raises ValueError for inputs that do not fit together."""
    if init_image is None:
        if mask is not None or params.outpaint is not None:
            raise ValueError("a mask or outpaint needs an init_image")
        return None
    width, height = params.width, params.height
    assert width is not None and height is not None  # resolved by the Engine's input checks
    options = params.inpaint or InpaintOptions()
    image = np.asarray(init_image.convert("RGB"))
    repaint = None
    if mask is not None:
        repaint = read_mask(mask)
        if repaint.shape != image.shape[:2]:
            raise ValueError(
                f"mask is {mask.width}x{mask.height}, init_image {init_image.width}x{init_image.height}"
            )
        if options.invert:
            repaint = 1.0 - repaint
    if params.outpaint is not None:
        o = params.outpaint
        image, new_area = pad_canvas(image, o.left, o.top, o.right, o.bottom, o.feather)
        old = np.zeros(new_area.shape, np.float32)
        if repaint is not None:
            old[o.top : o.top + repaint.shape[0], o.left : o.left + repaint.shape[1]] = repaint
        repaint = np.maximum(new_area, old)
    if repaint is None:
        return Picture(fit_picture(image, width, height, params.resize_mode), None, "original", None)
    if not repaint.any():
        raise ValueError("the mask is empty: nothing to inpaint")
    repaint = blur_mask(repaint, options.mask_blur)

    if options.only_masked:
        box = crop_box(repaint, width, height, options.only_masked_padding)
        left, top, right, bottom = box
        work = resize(image[top:bottom, left:right], width, height)
        work_mask = resize(repaint[top:bottom, left:right], width, height)
        paste = PasteBack(image, repaint, box)
    else:
        work = fit_picture(image, width, height, params.resize_mode)
        work_mask = fit_picture(repaint, width, height, params.resize_mode)
        paste = PasteBack(work, work_mask, None)
    if options.fill == "fill":
        work = fill_masked(work, work_mask)
    return Picture(work, work_mask, options.fill, paste)


def paste_back(picture: Picture | None, generated: PIL.Image.Image) -> PIL.Image.Image:
    """The generated image composited into the original through the blurred mask (or as it is)."""
    if picture is None or picture.paste is None:
        return generated
    paste = picture.paste
    pixels = np.asarray(generated.convert("RGB"))
    if paste.box is None:
        placed = pixels
    else:
        left, top, right, bottom = paste.box
        placed = paste.original.copy()
        placed[top:bottom, left:right] = resize(pixels, right - left, bottom - top)
    return PIL.Image.fromarray(composite(paste.original, placed, paste.mask))

"""OpenAI's edit pictures as genserve's init_image and mask.

OpenAI marks where to edit with TRANSPARENT pixels: of the mask, or, without one, of the image
itself. genserve (like AUTOMATIC1111) inpaints where a mask is WHITE, so the mask becomes an L picture
with 255 - alpha. Without any transparency the edit is img2img of the whole picture.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import PIL.Image

from genserve.api.pictures import check_picture
from genserve.artifacts.inputs import InputStore, open_picture
from genserve.config import Limits
from genserve.schemas import LimitError

# Strength when the client names none: a masked edit redraws the masked area from noise; a whole
# picture edit keeps its composition (A1111's default denoising strength).
MASKED_STRENGTH = 1.0
UNMASKED_STRENGTH = 0.75


@dataclass(frozen=True)
class EditPictures:
    init_image: str  # the stored id
    mask: str | None  # the stored id of the white-means-edit mask, if any


def edit_pictures(image: bytes, mask: bytes | None, inputs: InputStore, limits: Limits) -> EditPictures:
    """Check and store the edit's pictures; LimitError names `image` or `mask`."""
    picture = check_picture(image, "image", limits)
    if mask is not None:
        check_picture(mask, "mask", limits)
        opened = open_picture(mask)
        if opened.size != (picture.width, picture.height):
            raise LimitError(
                "mask",
                f"mask is {opened.width}x{opened.height} but image is {picture.width}x{picture.height}; "
                "they must be the same size",
            )
        alpha = _alpha(opened)
        if alpha is None:
            raise LimitError(
                "mask", "mask needs an alpha channel: its fully transparent pixels mark where to edit"
            )
        if alpha.getextrema()[0] > 127:  # the inverted mask would mark nothing
            raise LimitError("mask", "mask has no transparent pixel: nothing marks where to edit")
    else:
        alpha = _alpha(open_picture(image))
        if alpha is not None and alpha.getextrema()[0] == 255:
            alpha = None  # an alpha channel, but nothing transparent: edit the whole picture
    init_id = inputs.put(image)
    if alpha is None:
        return EditPictures(init_id, None)
    return EditPictures(init_id, inputs.put(_white_means_edit(alpha)))


def _alpha(image: PIL.Image.Image) -> PIL.Image.Image | None:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        return image.convert("RGBA").getchannel("A")
    return None


def _white_means_edit(alpha: PIL.Image.Image) -> bytes:
    inverted = alpha.point(lambda value: 255 - value)
    buffer = io.BytesIO()
    inverted.save(buffer, format="PNG")
    return buffer.getvalue()

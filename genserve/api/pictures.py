"""Pictures in a request (init_image, mask): decoded, checked and stored before a job exists.

A request may send a picture as base64, a data URL or the id of an upload; after `store_pictures`
it names each one by id (`sha256:<hex>`), so the stored job, its idempotency hash and the worker all
see the same thing whatever form the client used. Every problem is a LimitError naming the field
(422), so nothing the worker cannot decode is ever queued.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from typing import TypeVar

from genserve.artifacts.inputs import (
    PICTURE_FIELDS,
    InputStore,
    MissingPicture,
    PictureError,
    PictureInfo,
    inspect_picture,
    open_picture,
    repaint_coverage,
)
from genserve.config import Limits
from genserve.schemas import GenerationParams, LimitError
from genserve.schemas.control import nested_picture_refs, with_nested_pictures
from genserve.schemas.image_inputs import InpaintOptions, is_image_hash

_DATA_URL = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?(;[\w-]+=[\w.-]+)*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")

P = TypeVar("P", bound=GenerationParams)


def decode_payload(value: str, field: str, max_bytes: int) -> bytes:
    """The bytes of a data URL or a plain base64 string."""
    match = _DATA_URL.match(value)
    if value.startswith("data:") and match is None:
        raise LimitError(field, f"{field} is a data URL without ';base64,': send the picture base64-encoded")
    payload = _WHITESPACE.sub("", value[match.end() :] if match else value)  # clients wrap long lines
    if len(payload) * 3 // 4 > max_bytes + 3:  # refuse before decoding a huge string
        raise LimitError(
            field,
            f"{field} is about {len(payload) * 3 // 4} bytes; the limit is {max_bytes} (max_upload_bytes)",
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        if value.startswith("sha256:"):
            raise LimitError(
                field, f"{field} is not a valid upload id: expected sha256:<64 hex digits>"
            ) from None
        raise LimitError(
            field, f"{field} is not base64, a data URL or an upload id (sha256:<hex> from POST /v1/uploads)"
        ) from None


def check_picture(data: bytes, field: str, limits: Limits) -> PictureInfo:
    try:
        return inspect_picture(data, limits.max_upload_bytes, limits.max_input_pixels)
    except PictureError as error:
        raise LimitError(field, f"{field}: {error.message}") from None


def store_pictures(params: P, inputs: InputStore, limits: Limits) -> P:
    """`params` with each picture stored and named by its id; checks formats, limits, that an
    upload id exists, and that the mask has the init image's size."""
    sizes: dict[str, tuple[int, int]] = {}
    refs: dict[str, str] = {}
    for field in PICTURE_FIELDS:
        value = getattr(params, field)
        if value is None:
            continue
        if is_image_hash(value):
            sizes[field] = stored_size(inputs, value, field)
            refs[field] = value
            continue
        data = decode_payload(value, field, limits.max_upload_bytes)
        info = check_picture(data, field, limits)
        refs[field] = inputs.put(data)
        sizes[field] = (info.width, info.height)
    if "mask" in sizes and "init_image" in sizes and sizes["mask"] != sizes["init_image"]:
        (mw, mh), (iw, ih) = sizes["mask"], sizes["init_image"]
        raise LimitError("mask", f"mask is {mw}x{mh} but init_image is {iw}x{ih}; they must be the same size")
    if (
        "mask" in refs and "init_image" in refs and params.outpaint is None
    ):  # outpainting repaints its new area whatever the mask
        _check_mask_marks_something(inputs.get(refs["mask"]), params.inpaint)
    params = params.model_copy(update=refs) if refs else params
    return store_control_pictures(params, inputs, limits)


def store_control_pictures(params: P, inputs: InputStore, limits: Limits) -> P:
    """The pictures inside controlnets / ip_adapter stored and named by id (422 naming e.g.
    `controlnets[0].image`)."""
    refs: dict[str, str] = {}
    for field, value in nested_picture_refs(params):
        if is_image_hash(value):
            stored_size(inputs, value, field)
            continue
        data = decode_payload(value, field, limits.max_upload_bytes)
        check_picture(data, field, limits)
        refs[field] = inputs.put(data)
    return with_nested_pictures(params, refs) if refs else params  # type: ignore[return-value]


def _check_mask_marks_something(data: bytes, options: InpaintOptions | None) -> None:
    some, every = repaint_coverage(open_picture(data))
    if options is not None and options.invert:
        some = not every
    if not some:
        what = (
            "black or transparent pixel (invert is on)"
            if options and options.invert
            else "white or opaque pixel"
        )
        raise LimitError("mask", f"the mask marks nothing to inpaint: it has no {what}")


def stored_size(inputs: InputStore, ref: str, field: str) -> tuple[int, int]:
    try:
        return inputs.size(ref)
    except MissingPicture:
        raise LimitError(
            field, f"{field}: no upload has the id {ref}; POST the picture to /v1/uploads"
        ) from None
    except PictureError as error:
        raise LimitError(
            field, f"{field}: the stored picture {ref} cannot be read: {error.message}"
        ) from None


def size_from_picture(
    params: GenerationParams, picture: tuple[int, int], limits: Limits, multiple: int = 8
) -> tuple[int, int]:
    """Width and height for a request that left one or both out: the init image's size plus the
    outpaint margins (a given side keeps the picture's aspect ratio), scaled down into the limits,
    to a multiple of `multiple`."""
    width, height = picture
    if params.outpaint is not None:
        width += params.outpaint.left + params.outpaint.right
        height += params.outpaint.top + params.outpaint.bottom
    if params.width is not None:
        width, height = params.width, height * params.width / width
    elif params.height is not None:
        width, height = width * params.height / height, params.height
    scale = min(
        1.0,
        limits.max_width / width,
        limits.max_height / height,
        math.sqrt(limits.max_pixels / (width * height)),
    )
    w = params.width or _to_multiple(width * scale, multiple)
    h = params.height or _to_multiple(height * scale, multiple)
    if w > limits.max_width or h > limits.max_height or w * h > limits.max_pixels:  # rounding went up
        w = params.width or max(multiple, int(width * scale) // multiple * multiple)
        h = params.height or max(multiple, int(height * scale) // multiple * multiple)
    return w, h


def _to_multiple(value: float, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)

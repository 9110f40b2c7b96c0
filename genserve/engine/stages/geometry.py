"""Where pixels go: fitting a picture to the request's size, the "only masked" crop, the outpaint canvas.

Pure functions on numpy arrays (uint8 pictures (H, W, 3), float masks (H, W) in [0, 1]) and PIL.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import PIL.Image

ResizeMode = Literal["resize", "crop", "fill"]
Box = tuple[int, int, int, int]  # left, top, right, bottom (right and bottom exclusive)

_LANCZOS = PIL.Image.Resampling.LANCZOS


def fit_picture(image: np.ndarray, width: int, height: int, mode: ResizeMode) -> np.ndarray:
    """AUTOMATIC1111's resize modes: stretch ("resize"); scale to cover and centre-crop ("crop"); scale
    to fit, centre, and stretch the edge pixels into the rest ("fill")."""
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image
    if mode == "resize":
        return resize(image, width, height)
    if mode == "crop":
        scale = max(width / w, height / h)
        sw, sh = max(width, round(w * scale)), max(height, round(h * scale))
        scaled = resize(image, sw, sh)
        left, top = (sw - width) // 2, (sh - height) // 2
        return scaled[top : top + height, left : left + width]
    scale = min(width / w, height / h)
    sw, sh = max(1, min(width, round(w * scale))), max(1, min(height, round(h * scale)))
    scaled = resize(image, sw, sh)
    left, top = (width - sw) // 2, (height - sh) // 2
    pad = ((top, height - sh - top), (left, width - sw - left)) + ((0, 0),) * (image.ndim - 2)
    return np.pad(scaled, pad, mode="edge")


def resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Lanczos resize of a uint8 picture or a float mask, keeping the dtype."""
    if image.shape[1] == width and image.shape[0] == height:
        return image
    if image.dtype == np.uint8:
        return np.asarray(PIL.Image.fromarray(image).resize((width, height), _LANCZOS))
    resized = np.asarray(
        PIL.Image.fromarray(image.astype(np.float32), mode="F").resize((width, height), _LANCZOS)
    )
    return np.clip(resized, 0.0, 1.0)


def crop_box(mask: np.ndarray, width: int, height: int, padding: int) -> Box:
    """ "Only masked": the mask's bounding box plus `padding`, grown to the aspect ratio of
    width × height (so the crop scales to the request's size undistorted), kept inside the picture."""
    ys, xs = np.nonzero(mask > 0)
    if len(xs) == 0:
        raise ValueError("the mask is empty: nothing to inpaint")
    H, W = mask.shape
    left, top = max(0, int(xs.min()) - padding), max(0, int(ys.min()) - padding)
    right, bottom = min(W, int(xs.max()) + 1 + padding), min(H, int(ys.max()) + 1 + padding)
    box_w, box_h = right - left, bottom - top
    aspect = width / height
    if box_w / box_h < aspect:  # too narrow: widen
        left, right = _grow(left, right, round(box_h * aspect), W)
    else:  # too flat: heighten
        top, bottom = _grow(top, bottom, round(box_w / aspect), H)
    return left, top, right, bottom


def _grow(start: int, end: int, size: int, limit: int) -> tuple[int, int]:
    """Grow [start, end) around its centre to `size` (at most `limit`), shifted to stay in [0, limit)."""
    size = min(size, limit)
    start = max(0, min((start + end - size) // 2, limit - size))
    return start, start + size


def pad_canvas(
    image: np.ndarray, left: int, top: int, right: int, bottom: int, feather: int
) -> tuple[np.ndarray, np.ndarray]:
    """Outpainting: the canvas grown by the margins, its new area filled by stretching the edge pixels
    outwards, and a mask that is 1 on the new area and fades to 0 over `feather` pixels into the old."""
    canvas = np.pad(image, ((top, bottom), (left, right), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    # Distance (in pixels) of each old pixel from the nearest new edge; new edges only, not the frame.
    ys, xs = np.mgrid[0:h, 0:w]
    far = np.full((h, w), np.inf)
    for margin, distance in ((left, xs + 1), (right, w - xs), (top, ys + 1), (bottom, h - ys)):
        if margin:
            far = np.minimum(far, distance)
    inner = np.clip(1.0 - far / feather, 0.0, 1.0) if feather else np.zeros((h, w))
    mask = np.ones(canvas.shape[:2], dtype=np.float32)
    mask[top : top + h, left : left + w] = inner
    return canvas, mask

"""Control-map preprocessors that need no weights: pure functions from an RGB picture to a map.

Each takes an RGB uint8 array (H, W, 3) and returns one (H, W, 3) uint8, as sd-webui-controlnet's
model-free preprocessors do (`scripts/preprocessor/model_free_preprocessors.py`, `annotator/*`):

- `canny`: exactly `cv2.Canny(image, low, high)` on the RGB picture (A1111 defaults 100/200; no
  pre-blur, L1 gradient), white edges on black.
- `invert`: 255 - image (a white-background line drawing becomes the black-background map
  ControlNets were trained on).
- `tile_resample`: a plain downscale by `threshold_a` (1 = unchanged), for tile ControlNets.
- `scribble_xdog`: extended difference of Gaussians (Winnemoeller 2012), thresholded at
  `threshold_a` (A1111 default 32).
- `shuffle`: a seeded random smooth warp of the picture (content shuffle).
- `inpaint`: the picture with masked pixels marked (A1111 sets them to -1 in [-1, 1]; here they are
  0 in a uint8 map, and `inpaint_control_tensor` gives the -1 version for control_v11p_sd15_inpaint).
- `none`: the picture itself, a precomputed map.

Weight-based annotators (depth) live in `annotators.py`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Preprocessor = Callable[..., np.ndarray]


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3]).astype(np.uint8)


def canny(image: np.ndarray, threshold_a: float = 100, threshold_b: float = 200, **_: object) -> np.ndarray:
    import cv2

    edges = cv2.Canny(_rgb(image), float(threshold_a), float(threshold_b))
    return _rgb(edges)


def invert(image: np.ndarray, **_: object) -> np.ndarray:
    return 255 - _rgb(image)


def tile_resample(image: np.ndarray, threshold_a: float = 1.0, **_: object) -> np.ndarray:
    import cv2

    image = _rgb(image)
    factor = max(1.0, float(threshold_a))
    if factor == 1.0:
        return image
    h, w = image.shape[:2]
    small = cv2.resize(
        image, (max(1, int(w / factor)), max(1, int(h / factor))), interpolation=cv2.INTER_AREA
    )
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def scribble_xdog(image: np.ndarray, threshold_a: float = 32, **_: object) -> np.ndarray:
    import cv2

    gray = _rgb(image).astype(np.float32)
    g1 = cv2.GaussianBlur(gray, (0, 0), 0.5)
    g2 = cv2.GaussianBlur(gray, (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255)
    return _rgb(((dog < 255 - float(threshold_a)) * 255).astype(np.uint8))


def shuffle(image: np.ndarray, seed: int = 0, **_: object) -> np.ndarray:
    """A1111's ContentShuffleDetector: remap pixels along a smooth random flow field."""
    import cv2

    image = _rgb(image)
    h, w = image.shape[:2]
    rng = np.random.default_rng(seed)
    f = 256 if max(h, w) >= 256 else max(4, max(h, w) // 4)

    def field(size: int) -> np.ndarray:
        noise = rng.uniform(0, 1, (max(1, h // f) + 2, max(1, w // f) + 2)).astype(np.float32)
        return cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC) * size

    x = field(w)
    y = field(h)
    return cv2.remap(image, x, y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def inpaint(image: np.ndarray, mask: np.ndarray | None = None, **_: object) -> np.ndarray:
    image = _rgb(image).copy()
    if mask is not None:
        image[np.asarray(mask).reshape(image.shape[:2]) > 127] = 0
    return image


def none(image: np.ndarray, **_: object) -> np.ndarray:
    return _rgb(image)


PREPROCESSORS: dict[str, Preprocessor] = {
    "none": none,
    "canny": canny,
    "invert": invert,
    "tile_resample": tile_resample,
    "scribble_xdog": scribble_xdog,
    "shuffle": shuffle,
    "inpaint": inpaint,
}

# A1111 spellings accepted for the same functions.
ALIASES: dict[str, str] = {
    "tile": "tile_resample",
    "scribble": "scribble_xdog",
    "inpaint_only": "inpaint",
    "content_shuffle": "shuffle",
    "invert (from white bg & black line)": "invert",
}


def canonical_name(name: str | None) -> str:
    key = (name or "none").strip().lower()
    return ALIASES.get(key, key)


def run_preprocessor(name: str | None, image: np.ndarray, **options: object) -> np.ndarray:
    key = canonical_name(name)
    if key not in PREPROCESSORS:
        raise KeyError(key)
    return PREPROCESSORS[key](image, **{k: v for k, v in options.items() if v is not None})

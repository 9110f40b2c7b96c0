"""Face restoration: detect → align → restore → paste back, as AUTOMATIC1111 does with facexlib
(`modules/face_restoration_utils.py`), without facexlib (it downloads weights at run time).

1. Detect: an operator-supplied OpenCV YuNet ONNX model in `<models_dir>/facedetect/`, run by
   `cv2.FaceDetectorYN`; it gives a box and 5 landmarks (eyes, nose tip, mouth corners) per face.
   Tests and callers with their own detector pass `Face`s directly.
2. Align: the similarity transform (rotation, uniform scale, shift) that takes the 5 landmarks
   closest to FFHQ's 5-point template at 512 px (least median of squares), applied with
   cv2.warpAffine: the 512×512 crop GFPGAN, RestoreFormer and CodeFormer are trained on.
3. Restore: the spandrel model on the crop ([0, 1] in and out; the descriptor normalises).
4. Paste back: the restored crop warped back with the inverse transform, blended through a mask
   that is 1 inside the crop and fades out over its outer 10% (a feathered square), times
   `visibility`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import PIL.Image
import torch

from genserve.engine.errors import EngineError

# facexlib's 5-point template for 512×512 FFHQ crops: left eye, right eye (as seen), nose tip,
# mouth corners (as seen: left, right).
FFHQ_TEMPLATE_512 = np.array(
    [[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935], [201.26117, 371.41043],
     [313.08905, 371.15118]],
    dtype=np.float32,
)  # fmt: skip
FACE_SIZE = 512
MIN_EYE_DISTANCE = 5.0  # pixels: smaller faces are left alone (facexlib's eye_dist_threshold)
_FEATHER = 0.1  # of the crop side

Restorer = Callable[[torch.Tensor], torch.Tensor]  # (1, 3, S, S) in [0, 1] → the same


@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]  # x, y, width, height
    landmarks: np.ndarray  # (5, 2): eyes, nose, mouth corners, in the template's order
    score: float = 1.0


class YuNetDetector:
    """cv2.FaceDetectorYN on an operator-supplied YuNet ONNX file (no download at run time)."""

    def __init__(self, path: Path, score_threshold: float = 0.7) -> None:
        if not hasattr(cv2, "FaceDetectorYN"):
            raise EngineError("this OpenCV build has no FaceDetectorYN (needs OpenCV >= 4.5.4)")
        try:
            self._detector = cv2.FaceDetectorYN.create(str(path), "", (320, 320), score_threshold)
        except cv2.error as error:
            raise EngineError(
                f"{Path(path).name}: OpenCV cannot load it as a YuNet face detector: {error}"
            ) from None

    def detect(self, picture: PIL.Image.Image) -> list[Face]:
        rgb = np.asarray(picture.convert("RGB"))
        self._detector.setInputSize((rgb.shape[1], rgb.shape[0]))
        _, found = self._detector.detect(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        if found is None:
            return []
        return [
            Face(tuple(row[:4]), row[4:14].reshape(5, 2).astype(np.float32), float(row[14])) for row in found
        ]


def align_matrix(landmarks: np.ndarray, size: int = FACE_SIZE) -> np.ndarray:
    """The 2×3 similarity transform from picture coordinates to the aligned `size`² crop."""
    template = FFHQ_TEMPLATE_512 * (size / 512.0)
    matrix, _ = cv2.estimateAffinePartial2D(np.asarray(landmarks, np.float32), template, method=cv2.LMEDS)
    if matrix is None:
        raise EngineError("cannot align a face from its landmarks")
    return matrix


def feathered_mask(size: int) -> np.ndarray:
    """(size, size) float mask: 1 inside, a linear fade over the outer `_FEATHER` of each side."""
    fade = max(1, int(size * _FEATHER))
    ramp = np.minimum(np.arange(size) + 0.5, np.arange(size)[::-1] + 0.5) / fade
    line = np.clip(ramp, 0.0, 1.0).astype(np.float32)
    return line[:, None] * line[None, :]


def restore_faces(
    picture: PIL.Image.Image,
    faces: list[Face],
    restorer: Restorer,
    *,
    visibility: float = 1.0,
    size: int = FACE_SIZE,
) -> PIL.Image.Image:
    """Every face in `faces` aligned, restored and pasted back, blended by `visibility`."""
    image = np.asarray(picture.convert("RGB")).astype(np.float32) / 255.0
    height, width = image.shape[:2]
    out = image.copy()
    mask = feathered_mask(size)
    for face in faces:
        eyes = np.linalg.norm(face.landmarks[0] - face.landmarks[1])
        if eyes < MIN_EYE_DISTANCE or visibility <= 0:
            continue
        matrix = align_matrix(face.landmarks, size)
        crop = cv2.warpAffine(
            image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101
        )
        with torch.inference_mode():
            restored = restorer(torch.from_numpy(crop).permute(2, 0, 1).unsqueeze(0).contiguous())
        restored_np = restored[0].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
        inverse = cv2.invertAffineTransform(matrix)
        back = cv2.warpAffine(restored_np, inverse, (width, height), flags=cv2.INTER_LINEAR)
        weight = (
            cv2.warpAffine(mask, inverse, (width, height), flags=cv2.INTER_LINEAR)[..., None] * visibility
        )
        out = out * (1.0 - weight) + back * weight
    return PIL.Image.fromarray((out.clip(0, 1) * 255.0).round().astype(np.uint8))


def descriptor_restorer(descriptor: object) -> Restorer:
    """A spandrel face descriptor as a Restorer, in its own dtype and device."""
    parameter = next(descriptor.model.parameters())  # type: ignore[attr-defined]

    def restore(crop: torch.Tensor) -> torch.Tensor:
        return descriptor(crop.to(device=parameter.device, dtype=parameter.dtype))  # type: ignore[operator]

    return restore

"""The post-decode stage: `face_restore`, then `upscale` (or the other way round with
`upscale_first`), on one picture. The Engine runs it on every image of a job that asks; an upscale
job (worker/upscale.py) runs it on its one picture. Models load on first use and stay cached."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import PIL.Image
import torch

from genserve.engine.errors import EngineError
from genserve.engine.models.upscalers import UpscalerInfo
from genserve.engine.upscale.faces import FACE_SIZE, Face, YuNetDetector, descriptor_restorer, restore_faces
from genserve.engine.upscale.models import DescriptorCache, upscale_picture
from genserve.engine.upscale.tiles import TileProgress
from genserve.schemas.upscale import FaceRestoreOptions, UpscaleOptions

# Upscaler names that are plain resampling, no model (A1111's "Lanczos" and "Nearest").
RESAMPLERS = {"lanczos": PIL.Image.Resampling.LANCZOS, "nearest": PIL.Image.Resampling.NEAREST}


class PostStage:
    def __init__(
        self,
        upscalers: Mapping[str, UpscalerInfo] | None = None,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        face_detector: Path | None = None,
    ) -> None:
        self.upscalers = dict(upscalers or {})
        self.device = device
        self.face_detector = face_detector
        self._cache = DescriptorCache(device, dtype)
        self._detector: YuNetDetector | None = None
        self.face_size = FACE_SIZE  # the aligned crop restorers are trained on (tests use less)

    def update(self, upscalers: Mapping[str, UpscalerInfo], face_detector: Path | None = None) -> None:
        self.upscalers = dict(upscalers)
        if face_detector != self.face_detector:
            self.face_detector, self._detector = face_detector, None

    def knows(self, name: str) -> bool:
        return name in self.upscalers

    def loaded(self) -> list[str]:
        return self._cache.names()

    def info(self, name: str, kind: str) -> UpscalerInfo:
        info = self.upscalers.get(name)
        if info is None or info.kind != kind:
            known = ", ".join(sorted(n for n, i in self.upscalers.items() if i.kind == kind)) or "none"
            raise EngineError(f"{kind.replace('_', ' ')} '{name}' is not registered; known: {known}")
        return info

    def upscale(
        self, picture: PIL.Image.Image, options: UpscaleOptions, on_progress: TileProgress | None = None
    ) -> PIL.Image.Image:
        width, height = round(picture.width * options.scale), round(picture.height * options.scale)
        return self.resize(picture, options.model, width, height, tile=options.tile, on_progress=on_progress)

    def resize(
        self,
        picture: PIL.Image.Image,
        name: str,
        width: int,
        height: int,
        *,
        tile: int | None = None,
        on_progress: TileProgress | None = None,
    ) -> PIL.Image.Image:
        """`picture` at exactly width × height through upscaler `name` (the hires fix's pixel upscaler),
        or resampled with Pillow for the built-in names "lanczos" and "nearest"."""
        if name in RESAMPLERS:
            return picture.resize((width, height), RESAMPLERS[name])
        descriptor = self._cache.get(self.info(name, "upscaler"))
        return upscale_picture(
            descriptor, picture, width, height, device=self.device, tile=tile, on_progress=on_progress
        )

    def restore_faces(
        self, picture: PIL.Image.Image, options: FaceRestoreOptions, faces: list[Face] | None = None
    ) -> PIL.Image.Image:
        """Faces found by the detector (or the `faces` given) restored and pasted back."""
        descriptor = self._cache.get(self.info(options.model, "face_restorer"))
        if faces is None:
            faces = self._find_faces(picture)
        restorer = descriptor_restorer(descriptor)
        return restore_faces(picture, faces, restorer, visibility=options.visibility, size=self.face_size)

    def apply(
        self,
        picture: PIL.Image.Image,
        upscale: UpscaleOptions | None,
        face_restore: FaceRestoreOptions | None,
        *,
        upscale_first: bool = False,
        on_progress: TileProgress | None = None,
    ) -> PIL.Image.Image:
        if upscale is not None and upscale_first:
            picture = self.upscale(picture, upscale, on_progress)
        if face_restore is not None:
            picture = self.restore_faces(picture, face_restore)
        if upscale is not None and not upscale_first:
            picture = self.upscale(picture, upscale, on_progress)
        return picture

    def _find_faces(self, picture: PIL.Image.Image) -> list[Face]:
        if self.face_detector is None:
            raise EngineError(
                "face restoration needs a face detector: put an OpenCV YuNet ONNX file "
                "(face_detection_yunet_2023mar.onnx) in <models_dir>/facedetect/"
            )
        if self._detector is None:
            self._detector = YuNetDetector(self.face_detector)
        return self._detector.detect(picture)


def post_process_batch(stage: PostStage, items: list, outcomes: list) -> None:
    """Each request's images through its `face_restore` and `upscale`, in place (BatchItem,
    ItemOutcome); a request that left the batch keeps its error."""
    for item, outcome in zip(items, outcomes, strict=True):
        upscale, faces = getattr(item.params, "upscale", None), getattr(item.params, "face_restore", None)
        if outcome.error is None and (upscale is not None or faces is not None):
            outcome.images = [stage.apply(image, upscale, faces) for image in outcome.images]


def register_hires_upscaler(stage: PostStage, params: object) -> None:
    """A hires fix that names an upscaler model gets it as a pixel upscaler (stages/upscale.py's
    PIXEL_UPSCALERS, the hook the hires fix resamples through)."""
    from genserve.engine.stages.plan import is_latent_upscaler
    from genserve.engine.stages.upscale import PIXEL_UPSCALERS

    hires = getattr(params, "hires", None)
    if hires is None or is_latent_upscaler(hires.upscaler) or hires.upscaler in ("lanczos", "nearest"):
        return
    name = hires.upscaler
    stage.info(name, "upscaler")  # unknown: EngineError before the batch runs
    PIXEL_UPSCALERS[name] = lambda picture, width, height: stage.resize(picture, name, width, height)

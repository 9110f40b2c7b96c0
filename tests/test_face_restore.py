"""Face restoration: 5-landmark alignment to the FFHQ template, restore, feathered paste-back.
Faces and landmarks are injected (no detector weights); the restorer is a tiny random-weight
RestoreFormer loaded through spandrel, run on 128-pixel crops to stay fast."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

pytest.importorskip("spandrel")

from safetensors.torch import save_file  # noqa: E402
from spandrel.architectures.RestoreFormer import RestoreFormer  # noqa: E402

from genserve.engine.errors import EngineError  # noqa: E402
from genserve.engine.models.upscalers import scan_upscalers  # noqa: E402
from genserve.engine.upscale.faces import FFHQ_TEMPLATE_512, Face, YuNetDetector, align_matrix, restore_faces  # noqa: E402
from genserve.engine.upscale.stage import PostStage  # noqa: E402
from genserve.schemas.upscale import FaceRestoreOptions  # noqa: E402

SIZE = 128


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = RestoreFormer(
        n_embed=32, embed_dim=32, ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=32, head_size=2
    )
    root = tmp_path_factory.mktemp("models")
    (root / "upscale").mkdir()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        root / "upscale" / "tiny-restoreformer.safetensors",
    )
    return root


def _face_at(cx: float, cy: float, scale: float, angle_deg: float) -> Face:
    """A face whose landmarks are the template turned by `angle_deg`, scaled and centred at (cx, cy)."""
    angle = np.radians(angle_deg)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * scale
    points = (FFHQ_TEMPLATE_512 - 256.0) @ rotation.T + [cx, cy]
    side = 512 * scale
    return Face((cx - side / 2, cy - side / 2, side, side), points.astype(np.float32))


def test_alignment_recovers_the_similarity() -> None:
    face = _face_at(150, 90, 0.25, 12)
    matrix = align_matrix(face.landmarks)
    mapped = np.c_[face.landmarks, np.ones(5)] @ matrix.T
    assert np.abs(mapped - FFHQ_TEMPLATE_512).max() < 0.05
    assert abs(np.hypot(*matrix[0, :2]) - 4.0) < 1e-3  # 1 / 0.25


def test_restore_changes_the_face_only(models_dir: Path) -> None:
    torch.set_num_threads(1)
    stage = PostStage(scan_upscalers(models_dir))
    stage.face_size = SIZE
    info = stage.upscalers["tiny-restoreformer"]
    assert (info.kind, info.architecture, info.scale) == ("face_restorer", "RestoreFormer", 1)
    rng = np.random.default_rng(0)
    picture = PIL.Image.fromarray(rng.integers(0, 255, (160, 240, 3), dtype=np.uint8))
    face = _face_at(120, 80, 0.12, -8)  # a face about 60 pixels wide
    out = np.asarray(
        stage.restore_faces(picture, FaceRestoreOptions(model="tiny-restoreformer"), [face])
    ).astype(int)
    before = np.asarray(picture).astype(int)
    changed = np.abs(out - before).sum(axis=2) > 0
    x, y, w, h = face.box
    assert changed[int(y + h * 0.4), int(x + w * 0.5)]  # between the eyes and the mouth
    assert not changed[:, :40].any() and not changed[:, 200:].any()  # far from the face: untouched
    none = stage.restore_faces(picture, FaceRestoreOptions(model="tiny-restoreformer", visibility=0), [face])
    assert np.array_equal(np.asarray(none), np.asarray(picture))
    half = np.asarray(
        stage.restore_faces(picture, FaceRestoreOptions(model="tiny-restoreformer", visibility=0.5), [face])
    ).astype(int)
    centre = (int(y + h * 0.4), int(x + w * 0.5))
    assert abs((half[centre] - before[centre]) - (out[centre] - before[centre]) / 2).max() <= 2


def test_restore_faces_blends_with_a_feathered_edge() -> None:
    picture = PIL.Image.new("RGB", (200, 200), (0, 0, 0))
    white = lambda crop: torch.ones_like(crop)  # noqa: E731 - a "restorer" that paints the crop white
    out = np.asarray(restore_faces(picture, [_face_at(100, 100, 0.2, 0)], white, size=SIZE))[..., 0]
    assert out[100, 100] == 255 and out[0, 0] == 0
    row = out[100, :100]
    assert 0 < row[(row > 0) & (row < 255)].size  # a ramp, not a hard edge


def test_a_face_restorer_needs_the_operator_detector(models_dir: Path, tmp_path: Path) -> None:
    stage = PostStage(scan_upscalers(models_dir))
    with pytest.raises(EngineError, match="facedetect"):
        stage.restore_faces(PIL.Image.new("RGB", (64, 64)), FaceRestoreOptions(model="tiny-restoreformer"))
    bogus = tmp_path / "yunet.onnx"
    bogus.write_bytes(b"not onnx")
    with pytest.raises(EngineError, match="yunet.onnx"):
        YuNetDetector(bogus)
    with pytest.raises(EngineError, match="not registered"):
        stage.restore_faces(PIL.Image.new("RGB", (64, 64)), FaceRestoreOptions(model="gfpgan"), [])


def test_gfpgan_at_full_size_restores_a_512_crop() -> None:
    """spandrel's GFPGAN is hard-coded full size (86M parameters): random weights, one face, once."""
    from spandrel import ModelLoader
    from spandrel.architectures.GFPGAN import GFPGAN

    from genserve.engine.upscale.faces import descriptor_restorer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    descriptor = ModelLoader().load_from_state_dict(GFPGAN().state_dict()).eval()
    assert (descriptor.architecture.id, descriptor.purpose, descriptor.size_requirements.minimum) == (
        "GFPGAN",
        "FaceSR",
        512,
    )
    picture = PIL.Image.new("RGB", (256, 256), (120, 90, 80))
    face = _face_at(128, 128, 0.25, 5)
    out = np.asarray(restore_faces(picture, [face], descriptor_restorer(descriptor))).astype(int)
    assert (np.abs(out - np.asarray(picture).astype(int)).sum(axis=2) > 0)[128, 128]
    assert np.array_equal(out[:20, :20], np.asarray(picture)[:20, :20])

"""Face restoration through the API (issue 19 item 4): `face_restore` without the operator's face
detector is a 422 naming the field, on an upscale job and on an image job; with a detector file in
<models_dir>/facedetect/, an upscale job restores the face the detector finds and leaves the rest of
the picture alone. The detector is replaced by one that returns an injected face (no YuNet weights
here); the restorer is a tiny random-weight RestoreFormer loaded through spandrel."""

from __future__ import annotations

import base64
import io
import threading
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

pytest.importorskip("spandrel")

from fastapi.testclient import TestClient  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from spandrel.architectures.RestoreFormer import RestoreFormer  # noqa: E402

from genserve.artifacts.images import ImageStore  # noqa: E402
from genserve.config import Settings  # noqa: E402
from genserve.engine.engine import Engine  # noqa: E402
from genserve.engine.models.registry import scan_models  # noqa: E402
from genserve.engine.upscale.faces import FFHQ_TEMPLATE_512, Face  # noqa: E402
from genserve.store.jobs import JobStore  # noqa: E402
from genserve.worker.loop import Worker  # noqa: E402

RESTORER = "tiny-restoreformer"
# A face about 60 pixels wide, centred at (120, 80) in a 240×160 picture, turned by -8 degrees.
CENTRE, SCALE, ANGLE = (120.0, 80.0), 0.12, -8.0


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from genserve.engine.models.fixtures import write_tiny_pipeline

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("models")
    write_tiny_pipeline("sd15", root / "tiny-sd15")
    (root / "upscale").mkdir()
    model = RestoreFormer(
        n_embed=32, embed_dim=32, ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=32, head_size=2
    )
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        root / "upscale" / f"{RESTORER}.safetensors",
    )
    return root


def settings_for(models_dir: Path, data_dir: Path) -> Settings:
    return Settings(
        data_dir=data_dir,
        models_dir=models_dir,
        builtin_models=False,
        default_model="tiny-sd15",
        workers=0,
        heartbeat_seconds=0.5,
    )


def api(settings: Settings) -> TestClient:
    from genserve.api.app import create_app

    return TestClient(create_app(settings, supervise_workers=False))


def injected_face() -> Face:
    angle = np.radians(ANGLE)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * SCALE
    points = (FFHQ_TEMPLATE_512 - 256.0) @ rotation.T + list(CENTRE)
    side = 512 * SCALE
    return Face((CENTRE[0] - side / 2, CENTRE[1] - side / 2, side, side), points.astype(np.float32))


def noise_picture() -> tuple[np.ndarray, str]:
    pixels = np.random.default_rng(0).integers(0, 255, (160, 240, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
    return pixels, base64.b64encode(buffer.getvalue()).decode()


def test_face_restore_without_a_detector_is_a_422_naming_the_field(models_dir: Path, tmp_path: Path) -> None:
    _, image = noise_picture()
    with api(settings_for(models_dir, tmp_path / "data")) as client:
        for path, body in (
            ("/v1/upscale", {"image": image, "face_restore": {"model": RESTORER}}),
            ("/v1/jobs", {"prompt": "x", "steps": 2, "face_restore": {"model": RESTORER}}),
        ):
            response = client.post(path, json=body)
            assert response.status_code == 422, response.text
            detail = response.json()["detail"][0]
            assert detail["loc"][-1] == "face_restore" and "facedetect" in detail["msg"], detail
        unknown = client.post("/v1/upscale", json={"image": image, "face_restore": {"model": "gfpgan"}})
        assert unknown.status_code == 422 and "face restorer 'gfpgan' is not registered" in unknown.text


def test_an_upscale_job_restores_the_detected_face_only(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import genserve.engine.upscale.stage as stage

    class InjectedDetector:
        """Stands in for YuNet: the operator's file is there, the faces are the test's."""

        def __init__(self, path: Path) -> None:
            self.path = path

        def detect(self, picture: PIL.Image.Image) -> list[Face]:
            return [injected_face()]

    monkeypatch.setattr(stage, "YuNetDetector", InjectedDetector)
    monkeypatch.setattr(stage, "FACE_SIZE", 128)  # a smaller aligned crop keeps the CPU run short
    torch.set_num_threads(1)
    detect_dir = tmp_path / "models"
    detect_dir.mkdir()
    for entry in models_dir.iterdir():
        (detect_dir / entry.name).symlink_to(entry)
    (detect_dir / "facedetect").mkdir()
    (detect_dir / "facedetect" / "face_detection_yunet_2023mar.onnx").write_bytes(b"stand-in")
    settings = settings_for(detect_dir, tmp_path / "data")
    before, image = noise_picture()
    with api(settings) as client:
        created = client.post("/v1/upscale", json={"image": image, "face_restore": {"model": RESTORER}})
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        store = JobStore.from_url(settings.resolved_store_url)
        worker = Worker(
            settings, store, Engine(scan_models(settings.models_dir), device="cpu"),
            ImageStore(settings.images_dir), "worker-faces",
        )  # fmt: skip
        worker.work(threading.Event(), until_idle=True)
        worker.leases.close()
        store.close()
        job = client.get(f"/v1/upscale/{job_id}").json()
        assert job["state"] == "succeeded", job.get("error")
        out = np.asarray(
            PIL.Image.open(io.BytesIO(client.get(job["images"][0]["url"]).content)).convert("RGB")
        )
    assert out.shape == before.shape  # face restoration alone keeps the size
    changed = np.abs(out.astype(int) - before.astype(int)).sum(axis=2) > 0
    x, y, w, h = injected_face().box
    assert changed[int(y + h * 0.4), int(x + w * 0.5)]  # between the eyes and the mouth
    assert not changed[:, :40].any() and not changed[:, 200:].any()  # far from the face: untouched

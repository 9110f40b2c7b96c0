"""Control through the API (issue 18): unit pictures stored by hash before the job exists and loaded
by the worker; 422s naming the field (family, unknown model or preprocessor, key's allowed list);
GET /v1/controls, /v1/preprocessors and POST /v1/preprocess."""

from __future__ import annotations

import base64
import io
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from genserve.artifacts.images import ImageStore
from genserve.config import Settings
from genserve.engine.engine import Engine
from genserve.engine.models.control_fixtures import (
    write_tiny_controlnet,
    write_tiny_sd3_controlnet,
    write_tiny_t2i_adapter,
)
from genserve.engine.models.registry import scan_models
from genserve.store.jobs import JobStore
from genserve.worker.loop import Worker

torch.set_num_threads(1)
FAST = {"steps": 3, "cfg_scale": 3.0, "seed": 1, "prompt": "a red circle"}


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def b64(image: Image.Image) -> str:
    return base64.b64encode(png(image)).decode()


def picture(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def models(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("control-api-models")
    for entry in tiny_models_dir.iterdir():
        (root / entry.name).symlink_to(entry)
    write_tiny_controlnet(root / "tiny-sd15", root / "controlnet" / "cn-sd15", "sd15", seed=1)
    write_tiny_controlnet(root / "tiny-sdxl", root / "controlnet" / "cn-sdxl", "sdxl", seed=3)
    write_tiny_t2i_adapter(root / "tiny-sd15", root / "t2i_adapter" / "t2i-sd15", "sd15", seed=4)
    write_tiny_sd3_controlnet(root / "tiny-sd3", root / "controlnet" / "cn-sd3", seed=5)
    return root


@pytest.fixture
def settings(models: Path, tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        models_dir=models,
        store_url=f"sqlite:///{tmp_path / 'store.db'}",
        builtin_models=False,
        default_model="tiny-sd15",
        workers=0,
        heartbeat_seconds=0.5,
        retry_backoff_seconds=0.01,
    )


@pytest.fixture
def client(settings: Settings) -> TestClient:
    from genserve.api.app import create_app

    return TestClient(create_app(settings, supervise_workers=False))


def run_queue(settings: Settings) -> list:
    store = JobStore.from_url(settings.resolved_store_url)
    engine = Engine(scan_models(settings.models_dir), device="cpu", dtype="float32")
    seen: list = []
    generate = engine.generate_batch

    def record(items, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.extend(items)
        return generate(items, *args, **kwargs)

    engine.generate_batch = record  # type: ignore[method-assign]
    worker = Worker(settings, store, engine, ImageStore(settings.images_dir), "worker-test")
    worker.work(threading.Event(), until_idle=True)
    worker.leases.close()
    store.close()
    return seen


def field_of(response) -> str:  # noqa: ANN001
    assert response.status_code == 422, response.text
    return response.json()["detail"][0]["loc"][-1]


def test_a_controlled_job_runs_through_the_queue(client: TestClient, settings: Settings) -> None:
    control = picture(3)
    response = client.post(
        "/v1/jobs",
        json={
            **FAST,
            "controlnets": [
                {
                    "model": "cn-sd15",
                    "image": b64(control),
                    "preprocessor": "canny",
                    "scale": 0.8,
                    "end": 0.7,
                },
                {"model": "t2i-sd15", "image": "data:image/png;base64," + b64(picture(4))},
            ],
        },
    )
    assert response.status_code == 202, response.text
    job = response.json()
    units = job["params"]["controlnets"]
    assert all(u["image"].startswith("sha256:") for u in units)  # stored by hash before the job
    plain = client.post("/v1/jobs", json=FAST).json()
    seen = run_queue(settings)
    assert len(seen) == 2  # one batch: controls stay out of the batch key
    item = next(i for i in seen if i.params.controlnets)
    assert set(item.control_images) == {units[0]["image"], units[1]["image"]}
    assert np.array_equal(
        np.asarray(item.control_images[units[0]["image"]].convert("RGB")), np.asarray(control)
    )
    for job_id in (job["id"], plain["id"]):
        assert client.get(f"/v1/jobs/{job_id}").json()["state"] == "succeeded"


def test_an_sd3_controlled_job_shares_a_batch_with_a_plain_one(
    client: TestClient, settings: Settings
) -> None:
    sd3 = {**FAST, "model": "tiny-sd3"}
    unit = {"model": "cn-sd3", "image": b64(picture(7)), "scale": 0.9, "start": 0.2}
    controlled = client.post("/v1/jobs", json={**sd3, "controlnets": [unit]})
    assert controlled.status_code == 202, controlled.text
    plain = client.post("/v1/jobs", json=sd3).json()
    seen = run_queue(settings)
    assert len(seen) == 2 and sum(bool(i.params.controlnets) for i in seen) == 1  # one batch
    for job_id in (controlled.json()["id"], plain["id"]):
        assert client.get(f"/v1/jobs/{job_id}").json()["state"] == "succeeded"


def test_refusals_name_the_field(client: TestClient) -> None:
    image = b64(picture())
    unit = {"model": "cn-sd15", "image": image}
    assert field_of(
        client.post("/v1/jobs", json={**FAST, "controlnets": [{**unit, "model": "cn-sdxl"}]})
    ) == ("controlnets[0].model")
    bad = client.post("/v1/jobs", json={**FAST, "controlnets": [unit, {**unit, "model": "nope"}]})
    assert field_of(bad) == "controlnets[1].model" and "unknown control model" in bad.text
    wrong = client.post("/v1/jobs", json={**FAST, "controlnets": [{**unit, "preprocessor": "openpose_full"}]})
    assert field_of(wrong) == "controlnets[0].preprocessor"
    assert field_of(
        client.post("/v1/jobs", json={**FAST, "controlnets": [{**unit, "image": "not base64!"}]})
    ) == ("controlnets[0].image")
    sd3 = client.post("/v1/jobs", json={**FAST, "model": "tiny-sd3", "controlnets": [unit]})
    assert field_of(sd3) == "controlnets[0].model" and "is sd3" in sd3.text
    on_sd15 = client.post("/v1/jobs", json={**FAST, "controlnets": [{**unit, "model": "cn-sd3"}]})
    assert field_of(on_sd15) == "controlnets[0].model" and "sd3 controlnet" in on_sd15.text
    adapter = {**unit, "model": "t2i-sd15"}
    t2i = client.post("/v1/jobs", json={**FAST, "model": "tiny-sd3", "controlnets": [adapter]})
    assert field_of(t2i) == "controlnets[0].model" and "not supported yet" in t2i.text
    window = client.post("/v1/jobs", json={**FAST, "controlnets": [{**unit, "start": 0.8, "end": 0.2}]})
    assert window.status_code == 422


def test_controls_and_preprocessors_are_listed(client: TestClient) -> None:
    listed = {c["name"]: (c["kind"], c["family"]) for c in client.get("/v1/controls").json()["data"]}
    assert listed == {
        "cn-sd15": ("controlnet", "sd15"),
        "cn-sdxl": ("controlnet", "sdxl"),
        "cn-sd3": ("controlnet", "sd3"),
        "t2i-sd15": ("t2i_adapter", "sd15"),
    }
    names = client.get("/v1/preprocessors").json()
    assert {"canny", "invert", "none", "scribble_xdog", "shuffle", "tile_resample"} <= set(
        names["weight_free"]
    )
    assert "controlnet" not in {m["name"] for m in client.get("/v1/models").json()["data"]}


def test_preprocess_returns_the_detected_map(client: TestClient) -> None:
    import cv2

    image = picture(5)
    response = client.post("/v1/preprocess", json={"image": b64(image), "preprocessor": "canny"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    detected = np.asarray(Image.open(io.BytesIO(response.content)).convert("L"))
    assert np.array_equal(detected, cv2.Canny(np.asarray(image), 100, 200))
    faint = np.full((64, 64, 3), 40, np.uint8)
    faint[16:48, 16:48] = 60  # a step of 20 levels: no edge at 100/200, an edge at 10/20
    edges = {}
    for low, high in ((100, 200), (10, 20)):
        body = {
            "image": b64(Image.fromarray(faint)),
            "preprocessor": "canny",
            "threshold_a": low,
            "threshold_b": high,
        }
        edges[low] = (
            np.asarray(Image.open(io.BytesIO(client.post("/v1/preprocess", json=body).content))) > 0
        ).sum()
    assert edges[100] == 0 and edges[10] > 0
    assert field_of(client.post("/v1/preprocess", json={"image": b64(image), "preprocessor": "nope"})) == (
        "preprocessor"
    )


def test_depth_annotator_from_the_models_folder(client: TestClient, settings: Settings) -> None:
    """A weight-based preprocessor: a tiny random DPT in <models_dir>/annotators/depth/."""
    from transformers import DPTConfig, DPTForDepthEstimation

    folder = settings.models_dir / "annotators" / "depth"
    if not folder.exists():
        torch.manual_seed(0)
        config = DPTConfig(
            image_size=32,
            patch_size=16,
            hidden_size=32,
            num_hidden_layers=2,
            backbone_out_indices=[0, 1],
            num_attention_heads=4,
            intermediate_size=37,
            neck_hidden_sizes=[16, 32],
            fusion_hidden_size=32,
        )
        DPTForDepthEstimation(config).save_pretrained(folder)
    assert "depth" in client.get("/v1/preprocessors").json()["annotators"]
    response = client.post("/v1/preprocess", json={"image": b64(picture(6)), "preprocessor": "depth_midas"})
    assert response.status_code == 200, response.text
    depth = np.asarray(Image.open(io.BytesIO(response.content)))
    assert depth.shape == (64, 64, 3) and depth.max() == 255 and depth.min() == 0


def test_key_allowed_controls(tmp_path: Path) -> None:
    from genserve.auth.keys import KeyLimits, KeyStore
    from genserve.auth.limits import check_allowed_controls
    from genserve.schemas import GenerationParams, LimitError

    keys = KeyStore.from_url(f"sqlite:///{tmp_path / 'keys.db'}")
    key, _ = keys.create("carol", limits=KeyLimits(allowed_controls=["cn-sd15"]))
    assert keys.get(key.id).limits.allowed_controls == ["cn-sd15"]
    sha = "sha256:" + "0" * 64
    params = GenerationParams(
        prompt="x", controlnets=[{"model": "cn-sd15", "image": sha}, {"model": "t2i-sd15", "image": sha}]
    )
    with pytest.raises(LimitError) as refused:
        check_allowed_controls(params, ["cn-sd15"])
    assert refused.value.field == "controlnets[1].model"
    check_allowed_controls(params, None)
    with pytest.raises(LimitError) as refused:
        check_allowed_controls(
            GenerationParams(prompt="x", ip_adapter={"model": "ip", "images": [sha]}), ["cn-sd15"]
        )
    assert refused.value.field == "ip_adapter.model"


def test_keys_cli_sets_allowed_controls(tmp_path: Path) -> None:
    from genserve.auth.keys import KeyStore
    from tests.helpers import keys_cli

    created = keys_cli(tmp_path, "create", "dora", "--control", "cn-sd15", "--control", "ip-sd15")
    assert created.exit_code == 0, created.output
    keys = KeyStore.from_url(f"sqlite:///{tmp_path / 'genserve.db'}")
    [key] = keys.list()
    assert key.limits.allowed_controls == ["cn-sd15", "ip-sd15"]

"""Pictures in, end to end: a picture sent to the API reaches the engine decoded, through the queue,
a restart, and a worker that finds it missing. The API runs in-process (TestClient) and a worker
runs the queue on the tiny SD1.5 model, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import hashlib
import io
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from genserve.artifacts.images import ImageStore
from genserve.config import Settings
from genserve.engine.engine import Engine
from genserve.engine.models.registry import scan_models
from genserve.store.jobs import JobStore
from genserve.worker.loop import Worker

FAST = {"steps": 4, "cfg_scale": 3.0, "seed": 1}


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def settings(tiny_models_dir: Path, tmp_path: Path, store_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        models_dir=tiny_models_dir,
        store_url=store_url,
        builtin_models=False,
        default_model="tiny-sd15",
        workers=0,
        heartbeat_seconds=0.5,
        retry_backoff_seconds=0.01,
    )


def api(settings: Settings) -> TestClient:
    from genserve.api.app import create_app

    return TestClient(create_app(settings, supervise_workers=False))


class SeenItems:
    """Wraps the engine's generate_batch to record what each batch item carried."""

    def __init__(self, engine: Engine) -> None:
        self.items: list = []
        self._generate = engine.generate_batch
        engine.generate_batch = self  # type: ignore[method-assign]

    def __call__(self, items, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        self.items.extend(items)
        return self._generate(items, *args, **kwargs)


def run_queue(settings: Settings) -> SeenItems:
    """A fresh worker (as after a restart) runs everything queued, then stops."""
    import threading

    store = JobStore.from_url(settings.resolved_store_url)
    engine = Engine(scan_models(settings.models_dir), device="cpu")
    seen = SeenItems(engine)
    worker = Worker(settings, store, engine, ImageStore(settings.images_dir), "worker-test")
    worker.work(threading.Event(), until_idle=True)
    worker.leases.close()
    store.close()
    return seen


def test_upload_job_image_and_the_engine_gets_the_decoded_pictures(settings):
    picture = Image.new("RGB", (64, 48), (220, 20, 20))
    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (16, 8, 48, 40))
    with api(settings) as client:
        upload = client.post("/v1/uploads", files={"file": ("p.png", png(picture), "image/png")}).json()
        job = client.post(
            "/v1/jobs",
            json={"prompt": "a green circle", "init_image": upload["id"], "mask": base64.b64encode(png(mask)).decode(),
                  "strength": 0.5, **FAST},
        )  # fmt: skip
        assert job.status_code == 202, job.text
        plain = client.post(
            "/v1/jobs", json={"prompt": "a blue star", "width": 64, "height": 48, **FAST}
        ).json()
        seen = run_queue(settings)
        done = client.get(f"/v1/jobs/{job.json()['id']}").json()
        assert done["state"] == "succeeded", done["error"]
        assert (done["params"]["init_image"], done["params"]["mask"]) == (upload["id"], sha(png(mask)))
        assert (done["params"]["width"], done["params"]["height"]) == (64, 48)  # from the picture
        image = client.get(done["images"][0]["url"])
        assert image.status_code == 200
        assert "Denoising strength: 0.5" in Image.open(io.BytesIO(image.content)).text["parameters"]
        assert client.get(f"/v1/jobs/{plain['id']}").json()["state"] == "succeeded"
    by_prompt = {item.params.prompt: item for item in seen.items}
    item = by_prompt["a green circle"]
    assert item.init_image.size == (64, 48) and item.init_image.getpixel((0, 0)) == (220, 20, 20)
    assert item.mask.getpixel((20, 20)) == 255 and item.mask.getpixel((0, 0)) == 0
    assert by_prompt["a blue star"].init_image is None and by_prompt["a blue star"].mask is None


def test_a_queued_job_runs_after_a_restart_from_the_hash_alone(settings):
    picture = png(Image.new("RGB", (64, 64), (10, 200, 10)))
    with api(settings) as client:
        job_id = client.post(
            "/v1/jobs", json={"prompt": "x", "init_image": base64.b64encode(picture).decode(), **FAST}
        ).json()["id"]
    # The API process is gone; only the store row (with the hash) and the artifact store remain.
    seen = run_queue(settings)
    with api(settings) as client:
        done = client.get(f"/v1/jobs/{job_id}").json()
    assert done["state"] == "succeeded", done["error"]
    assert png(seen.items[0].init_image) == png(Image.open(io.BytesIO(picture)).convert("RGB"))


def test_a_picture_missing_at_the_worker_fails_its_job_not_the_worker(settings):
    picture = png(Image.new("RGB", (64, 64), (10, 10, 200)))
    with api(settings) as client:
        doomed = client.post(
            "/v1/jobs", json={"prompt": "x", "init_image": base64.b64encode(picture).decode(), **FAST}
        ).json()["id"]
        fine = client.post("/v1/jobs", json={"prompt": "y", "width": 64, "height": 64, **FAST}).json()["id"]
        digest = sha(picture).removeprefix("sha256:")
        (settings.inputs_dir / digest[:2] / digest).unlink()  # lost from the artifact store
        seen = run_queue(settings)
        failed = client.get(f"/v1/jobs/{doomed}").json()
        assert failed["state"] == "failed"
        assert failed["error"].startswith(f"init_image {sha(picture)} cannot be loaded")
        assert "not in the artifact store" in failed["error"]
        assert client.get(f"/v1/jobs/{fine}").json()["state"] == "succeeded"
    assert [item.params.prompt for item in seen.items] == ["y"]  # never reached the engine


def test_a_damaged_picture_fails_its_job_with_the_reason(settings):
    picture = png(Image.new("RGB", (64, 64), (10, 10, 200)))
    with api(settings) as client:
        job_id = client.post(
            "/v1/jobs", json={"prompt": "x", "init_image": base64.b64encode(picture).decode(), **FAST}
        ).json()["id"]
        digest = sha(picture).removeprefix("sha256:")
        (settings.inputs_dir / digest[:2] / digest).write_bytes(picture[:-20])
        run_queue(settings)
        failed = client.get(f"/v1/jobs/{job_id}").json()
    assert failed["state"] == "failed" and "damaged (its hash differs)" in failed["error"]


def noise_picture(size: tuple[int, int], seed: int = 0) -> Image.Image:
    import numpy as np

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("only_masked", [False, True])
def test_inpainting_through_the_api_keeps_every_pixel_outside_the_mask(settings, only_masked):
    import numpy as np

    picture = noise_picture((64, 64))  # noise: any change from the VAE round-trip would show
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (24, 16, 48, 40))
    with api(settings) as client:
        body = {
            "prompt": "a yellow star",
            "init_image": base64.b64encode(png(picture)).decode(),
            "mask": base64.b64encode(png(mask)).decode(),
            "strength": 0.9,
            "inpaint": {"mask_blur": 0, "only_masked": only_masked, "only_masked_padding": 8},
            **FAST,
        }
        job_id = client.post("/v1/jobs", json=body).json()["id"]
        run_queue(settings)
        done = client.get(f"/v1/jobs/{job_id}").json()
        assert done["state"] == "succeeded", done["error"]
        result = np.asarray(
            Image.open(io.BytesIO(client.get(done["images"][0]["url"]).content)).convert("RGB")
        )
    original, inside = np.asarray(picture), np.asarray(mask) > 128
    assert np.array_equal(result[~inside], original[~inside])
    assert not np.array_equal(result[inside], original[inside])

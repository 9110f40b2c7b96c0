"""Upscaling end to end against a live server: /v1/models and /sdapi/v1/upscalers list the
upscaler; POST /v1/upscale queues a job of kind "upscale" with per-tile progress; an image job's
`upscale` option runs after decode; A1111's extras endpoints through the real `webuiapi` client;
unknown names are 422. A random-weight Real-ESRGAN Compact (spandrel) stands in for a real model."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
from PIL import Image

pytest.importorskip("spandrel")

import torch  # noqa: E402
import webuiapi  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from spandrel.architectures.Compact import Compact  # noqa: E402

from tests.helpers import LiveServer, read_events, wait_job  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from genserve.engine.models.fixtures import write_tiny_pipeline

    models = tmp_path_factory.mktemp("models")
    write_tiny_pipeline("sd15", models / "tiny-sd15")
    (models / "upscale").mkdir()
    torch.manual_seed(0)
    compact = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2)
    save_file(
        {k: v.contiguous() for k, v in compact.state_dict().items()},
        models / "upscale" / "compact-2x.safetensors",
    )
    save_file({"nothing.weight": torch.zeros(1)}, models / "upscale" / "mystery.safetensors")
    live = LiveServer(models_dir=models, data_dir=tmp_path_factory.mktemp("data")).start()
    yield live
    live.kill_all()


def _png_b64(size=(40, 30), colour=(200, 30, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_models_and_a1111_list_the_upscaler(server):
    with server.client() as client:
        rows = {m["name"]: m for m in client.get("/v1/models").json()["data"]}
        upscalers = client.get("/sdapi/v1/upscalers").json()
    assert rows["compact-2x"]["kind"] == "upscaler"
    assert (rows["compact-2x"]["architecture"], rows["compact-2x"]["scale"]) == ("Compact", 2)
    assert "mystery" not in rows  # spandrel's architectures do not know it: skipped with a warning
    assert rows["tiny-sd15"]["kind"] == "image"
    assert [u["name"] for u in upscalers] == ["None", "Lanczos", "Nearest", "compact-2x"]
    assert upscalers[-1]["scale"] == 2


def test_an_upscale_job_reports_each_batch_of_tiles(server):
    body = {"image": _png_b64((80, 60)), "upscale": {"model": "compact-2x", "scale": 2, "tile": 32}}
    with server.client() as client:
        created = client.post("/v1/upscale", json=body)
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        events = read_events(client, job_id)
        job = client.get(f"/v1/upscale/{job_id}").json()
        picture = Image.open(io.BytesIO(client.get(job["images"][0]["url"]).content))
    assert job["state"] == "succeeded", job["error"]
    assert picture.size == (160, 120)
    progress = [e.data for e in events if e.type == "progress"]
    assert progress and all(p["stage"] == "upscale" for p in progress)
    assert progress[-1]["step"] == progress[-1]["steps"] > 1  # tiles: 80x60 in 32-pixel tiles


def test_unknown_names_are_422_naming_the_field(server):
    with server.client() as client:
        for model in ("mystery", "nope"):
            response = client.post("/v1/upscale", json={"image": _png_b64(), "upscale": {"model": model}})
            assert response.status_code == 422
            assert "upscale" in response.text and model in response.text
        response = client.post("/v1/jobs", json={"prompt": "x", "steps": 2, "upscale": {"model": "nope"}})
        assert response.status_code == 422 and "upscaler 'nope' is not registered" in response.text


def test_an_image_job_is_upscaled_after_decode(server):
    with server.client() as client:
        body = {
            "prompt": "a red circle",
            "steps": 2,
            "width": 64,
            "height": 64,
            "upscale": {"model": "compact-2x", "scale": 2},
        }
        created = client.post("/v1/jobs", json=body)
        assert created.status_code == 202, created.text
        job = wait_job(client, created.json()["id"])
        assert job["state"] == "succeeded", job["error"]
        picture = Image.open(io.BytesIO(client.get(job["images"][0]["url"]).content))
    assert picture.size == (128, 128)


def test_webuiapi_extras(server):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    single = api.extra_single_image(
        Image.new("RGB", (40, 30), (10, 200, 10)), upscaler_1="compact-2x", upscaling_resize=2
    )
    assert single.images[0].size == (80, 60)
    batch = api.extra_batch_images(
        [Image.new("RGB", (20, 20), "red"), Image.new("RGB", (24, 16), "blue")],
        upscaler_1="Lanczos",
        upscaling_resize=3,
    )
    assert [image.size for image in batch.images] == [(60, 60), (72, 48)]
    exact = api.extra_single_image(
        Image.new("RGB", (40, 30)),
        resize_mode=1,
        upscaling_resize_w=100,
        upscaling_resize_h=100,
        upscaler_1="compact-2x",
    )
    assert exact.images[0].size == (100, 100)
    with pytest.raises(RuntimeError, match="422"):
        api.extra_single_image(Image.new("RGB", (8, 8)), upscaler_1="nope")
    assert httpx.get(f"{server.url}/sdapi/v1/upscalers").status_code == 200


def test_the_hires_fix_upscales_with_a_model(server):
    with server.client() as client:
        body = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64,
                "hires": {"scale": 2, "upscaler": "compact-2x", "strength": 0.5}}  # fmt: skip
        created = client.post("/v1/jobs", json=body)
        assert created.status_code == 202, created.text
        job = wait_job(client, created.json()["id"])
        assert job["state"] == "succeeded", job["error"]
        picture = Image.open(io.BytesIO(client.get(job["images"][0]["url"]).content))
        unknown = client.post("/v1/jobs", json={**body, "hires": {"scale": 2, "upscaler": "nope"}})
    assert picture.size == (128, 128)
    assert unknown.status_code == 422 and "hires" in unknown.text


def test_an_upscale_job_can_be_canceled(server):
    body = {"image": _png_b64((400, 400)), "upscale": {"model": "compact-2x", "scale": 4, "tile": 32}}
    with server.client() as client:
        job_id = client.post("/v1/upscale", json=body).json()["id"]
        canceled = client.delete(f"/v1/upscale/{job_id}")
        assert canceled.status_code == 200
        events = read_events(client, job_id)
        assert client.get(f"/v1/upscale/{job_id}").json()["state"] == "canceled"
        assert client.get("/v1/upscale/nope").status_code == 404
    assert events[-1].type == "canceled"


def test_a1111_hires_fix_takes_an_upscaler_model_by_name(server):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler", steps=2)
    result = api.txt2img(prompt="a red circle", width=64, height=64, steps=2, enable_hr=True, hr_scale=2,
                         hr_upscaler="compact-2x", denoising_strength=0.5)  # fmt: skip
    assert result.images[0].size == (128, 128)
    with pytest.raises(RuntimeError, match="is not available; use one of: .*Nearest, compact-2x"):
        api.txt2img(prompt="x", width=64, height=64, steps=2, enable_hr=True, hr_upscaler="R-ESRGAN 4x+")

"""sd-webui-controlnet's API on genserve, driven by the real `webuiapi` client against a live server:
ControlNetUnit in txt2img/img2img (alwayson_scripts), controlnet_model_list/module_list/detect."""

from __future__ import annotations

from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import webuiapi
from PIL import Image

from genserve.engine.models.control_fixtures import write_tiny_controlnet
from tests.helpers import LiveServer

FAST = {"width": 64, "height": 64, "steps": 3, "seed": 7, "cfg_scale": 4.0}


def picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def server(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("a1111-control-models")
    for entry in tiny_models_dir.iterdir():
        (root / entry.name).symlink_to(entry)
    write_tiny_controlnet(root / "tiny-sd15", root / "controlnet" / "cn-sd15", "sd15", seed=1)
    live = LiveServer(models_dir=root, data_dir=tmp_path_factory.mktemp("data")).start()
    yield live
    live.kill_all()


@pytest.fixture(scope="module")
def api(server) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler", steps=3)


def job_params(server, info: dict) -> dict:
    with httpx.Client(base_url=server.url) as client:
        return client.get(f"/v1/jobs/{info['job_id']}").json()["params"]


def test_webuiapi_sees_the_controlnet_extension(api: webuiapi.WebUIApi) -> None:
    assert api.has_controlnet  # /sdapi/v1/scripts lists "controlnet m2m"
    assert api.controlnet_model_list() == ["cn-sd15"]
    assert {"none", "canny", "invert", "tile_resample"} <= set(api.controlnet_module_list())
    assert api.controlnet_version() == 2


def test_txt2img_with_a_controlnet_unit(api: webuiapi.WebUIApi, server) -> None:
    unit = webuiapi.ControlNetUnit(
        image=picture(1),
        module="canny",
        model="cn-sd15 [0123abcd]",
        weight=0.8,
        guidance_end=0.7,
        control_mode=1,
    )
    controlled = api.txt2img(prompt="a red circle", controlnet_units=[unit], **FAST)
    plain = api.txt2img(prompt="a red circle", **FAST)  # webuiapi sends ControlNet with no args
    [stored] = job_params(server, controlled.info)["controlnets"]
    assert stored["image"].startswith("sha256:")
    assert {k: stored[k] for k in ("model", "preprocessor", "threshold_a", "scale", "end", "mode")} == {
        "model": "cn-sd15",
        "preprocessor": "canny",
        "threshold_a": 64.0,  # webuiapi's default, sent as A1111 would use it
        "scale": 0.8,
        "end": 0.7,
        "mode": "prompt",
    }
    assert job_params(server, plain.info)["controlnets"] is None
    assert np.abs(np.asarray(controlled.image).astype(int) - np.asarray(plain.image)).max() > 0


def test_img2img_unit_without_image_uses_the_init_image(api: webuiapi.WebUIApi, server) -> None:
    init = picture(2)
    unit = webuiapi.ControlNetUnit(module="none", model="cn-sd15", control_mode=2)
    result = api.img2img(images=[init], prompt="x", denoising_strength=0.6, controlnet_units=[unit], **FAST)
    params = job_params(server, result.info)
    assert params["controlnets"][0]["image"] == params["init_image"]
    assert params["controlnets"][0]["mode"] == "control"


def test_unknown_controlnet_model_is_422(api: webuiapi.WebUIApi, server) -> None:
    unit = webuiapi.ControlNetUnit(image=picture(1), model="control_v11p_sd15_canny [d14c016b]")
    with httpx.Client(base_url=server.url, timeout=60) as client:
        response = client.post(
            "/sdapi/v1/txt2img",
            json={"prompt": "x", **FAST, "alwayson_scripts": {"ControlNet": {"args": [unit.to_dict()]}}},
        )
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][-1] == "controlnets[0].model"


def test_detect_runs_the_preprocessor(api: webuiapi.WebUIApi) -> None:
    image = picture(3)
    result = api.controlnet_detect([image], module="canny", threshold_a=100, threshold_b=200)
    detected = result.images[0].convert("L")  # webuiapi decodes the base64 PNGs
    assert np.array_equal(np.asarray(detected), cv2.Canny(np.asarray(image), 100, 200))

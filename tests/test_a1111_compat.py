"""The AUTOMATIC1111 API subset, driven by the `webuiapi` client package against a live server."""

from __future__ import annotations

import base64
import io
import threading
import time

import pytest
import webuiapi
from PIL import Image

from tests.helpers import LiveServer

FAST = {"width": 64, "height": 64, "steps": 3}


@pytest.fixture(scope="module")
def server(tiny_models_dir, tmp_path_factory):
    live = LiveServer(models_dir=tiny_models_dir, data_dir=tmp_path_factory.mktemp("data")).start()
    yield live
    live.kill_all()  # nothing to keep: a graceful stop would only cost seconds


def make_api(server, client_id: str | None = None) -> webuiapi.WebUIApi:
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler a", steps=3)
    if client_id:
        api.session.headers["X-Client-Id"] = client_id
    return api


@pytest.fixture(scope="module")
def api(server):
    return make_api(server)


def in_thread(target, *args, **kwargs):
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(value=target(*args, **kwargs)))
    thread.start()
    return thread, result


def test_txt2img_returns_images_and_the_parameter_string(api):
    result = api.txt2img(prompt="a red circle", negative_prompt="blue", seed=5, batch_size=2, **FAST)
    assert len(result.images) == 2
    assert all(image.size == (64, 64) for image in result.images)
    assert result.info["all_seeds"] == [5, 6] and result.info["sd_model_name"] == "tiny-sd15"
    assert result.info["infotexts"][0] == (
        "a red circle\nNegative prompt: blue\n"
        "Steps: 3, Sampler: Euler a, CFG scale: 7.0, Seed: 5, Size: 64x64, Model: tiny-sd15"
    )
    assert result.parameters["prompt"] == "a red circle"
    assert result.images[1].text["parameters"] == result.info["infotexts"][1]


def test_override_settings_model_applies_to_that_request_only(api, server):
    other = make_api(server)
    override, override_result = in_thread(
        api.txt2img, prompt="x", override_settings={"sd_model_checkpoint": "tiny-sdxl"}, **FAST
    )
    plain = other.txt2img(prompt="y", **FAST)
    override.join(timeout=120)
    assert override_result["value"].info["sd_model_name"] == "tiny-sdxl"
    assert plain.info["sd_model_name"] == "tiny-sd15"
    assert api.txt2img(prompt="z", **FAST).info["sd_model_name"] == "tiny-sd15"
    assert api.util_get_current_model() == "tiny-sd15"


def test_options_model_is_per_caller(server):
    alice, bob = make_api(server, "alice"), make_api(server, "bob")
    alice.util_set_model("tiny-sdxl")
    assert alice.util_get_current_model() == "tiny-sdxl"
    assert bob.util_get_current_model() == "tiny-sd15"
    assert alice.txt2img(prompt="x", **FAST).info["sd_model_name"] == "tiny-sdxl"
    assert bob.txt2img(prompt="x", **FAST).info["sd_model_name"] == "tiny-sd15"


def test_progress_by_id_task_with_the_current_preview(api):
    payload = {"prompt": "slow", "width": 64, "height": 64, "steps": 30, "force_task_id": "task-progress"}
    thread, result = in_thread(api.post_and_get_api_result, f"{api.baseurl}/txt2img", payload, False)
    seen = None
    deadline = time.monotonic() + 60
    while seen is None and time.monotonic() < deadline:
        progress = api.session.get(f"{api.baseurl}/progress", params={"id_task": "task-progress"})
        body = progress.json() if progress.status_code == 200 else {}
        if body.get("current_image") and 0 < body["progress"] < 1:
            seen = body
        time.sleep(0.05)
    api.interrupt()  # no need to wait for the rest
    thread.join(timeout=120)
    assert seen is not None, "no progress with a preview image was seen"
    assert seen["state"]["sampling_steps"] == 30 and seen["current_task"] == "task-progress"
    assert Image.open(io.BytesIO(base64.b64decode(seen["current_image"]))).size[0] > 0
    done = api.session.get(f"{api.baseurl}/progress", params={"id_task": "task-progress"}).json()
    assert done["completed"] is True and done["progress"] == 1.0 and done["state"]["job_count"] == 0
    assert done["state"]["interrupted"] is True and result["value"].info["id_task"] == "task-progress"
    missing = api.session.get(f"{api.baseurl}/progress", params={"id_task": "no-such-task"})
    assert missing.status_code == 404


def test_interrupt_stops_the_callers_job(server):
    api = make_api(server, "interrupter")
    thread, result = in_thread(api.txt2img, prompt="long", width=64, height=64, steps=60)
    deadline = time.monotonic() + 60
    while api.get_progress()["progress"] <= 0:
        assert time.monotonic() < deadline, "the job never progressed"
        time.sleep(0.02)
    assert make_api(server, "bystander").interrupt()["interrupted"] == []
    assert len(api.interrupt()["interrupted"]) == 1
    thread.join(timeout=60)
    assert result["value"].images == [] and result["value"].info["interrupted"] is True


def test_models_samplers_options(api):
    assert {"tiny-sd15", "tiny-sdxl", "tiny-sd3"} <= set(api.util_get_model_names())
    assert {"Euler a", "Euler", "DPM++ 2M Karras", "DDIM"} <= set(api.util_get_sampler_names())
    assert api.get_options()["sd_model_checkpoint"] == "tiny-sd15"
    assert {"automatic", "karras"} <= set(api.util_get_scheduler_names())


def test_img2img_is_501_until_it_exists(api):
    with pytest.raises(RuntimeError) as caught:
        api.img2img(images=[Image.new("RGB", (64, 64))], prompt="x", **FAST)
    status, text = caught.value.args
    assert status == 501 and "img2img is not implemented" in text


def test_unsupported_requests_are_422(api):
    for arguments, text in (
        ({"sampler_name": "LMS"}, "not available"),
        ({"enable_hr": True}, "hires fix"),
        ({"width": 100}, "multiple of 8"),
    ):
        with pytest.raises(RuntimeError) as caught:
            api.txt2img(prompt="x", **{**FAST, **arguments})
        assert caught.value.args[0] == 422 and text in caught.value.args[1]

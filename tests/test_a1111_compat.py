"""The AUTOMATIC1111 API subset, driven by the `webuiapi` client package against a live server."""

from __future__ import annotations

import base64
import hashlib
import io
import threading
import time

import httpx
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


def sent_id(image: Image.Image) -> str:
    """The id genserve gives the picture webuiapi sends (it re-encodes it as PNG)."""
    return "sha256:" + hashlib.sha256(base64.b64decode(webuiapi.raw_b64_img(image))).hexdigest()


def job_params(server, info: dict) -> dict:
    return httpx.get(f"{server.url}/v1/jobs/{info['job_id']}").json()["params"]


def test_img2img_with_webuiapi(api, server):
    picture = Image.new("RGB", (64, 64), (220, 20, 20))
    result = api.img2img(images=[picture], prompt="a green circle", denoising_strength=0.5, seed=3, **FAST)
    assert len(result.images) == 1 and result.images[0].size == (64, 64)
    assert result.info["denoising_strength"] == 0.5
    assert result.info["infotexts"][0].endswith("Model: tiny-sd15, Denoising strength: 0.5")
    assert result.images[0].text["parameters"] == result.info["infotexts"][0]
    assert result.parameters["init_images"] is None  # not sent back unless include_init_images
    params = job_params(server, result.info)
    assert params["init_image"] == sent_id(picture) and params["strength"] == 0.5
    assert (params["mask"], params["inpaint"], params["resize_mode"]) == (None, None, "resize")


def test_inpainting_fields_map_onto_the_schema(api, server):
    picture = Image.new("RGB", (64, 64), (20, 20, 220))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))  # white: inpaint here (A1111's convention)
    result = api.img2img(
        images=[picture],
        mask_image=mask,
        prompt="a yellow star",
        denoising_strength=0.75,
        mask_blur=6,
        inpainting_fill=2,
        inpaint_full_res=False,
        inpaint_full_res_padding=16,
        inpainting_mask_invert=1,
        resize_mode=1,
        **FAST,
    )
    assert result.images[0].size == (64, 64)
    assert "Denoising strength: 0.75, Mask blur: 6" in result.info["infotexts"][0]
    params = job_params(server, result.info)
    assert params["mask"] == sent_id(mask) and params["resize_mode"] == "crop"
    assert params["inpaint"] == {
        "mask_blur": 6,
        "fill": "latent_noise",
        "invert": True,
        "only_masked": False,
        "only_masked_padding": 16,
    }


def test_bad_img2img_requests_are_422_naming_the_a1111_field(api):
    picture = Image.new("RGB", (64, 64))
    for arguments, field in (
        ({"resize_mode": 3}, "resize_mode"),
        ({"mask_image": Image.new("L", (32, 32), 255)}, "mask"),
        ({"images": [picture, Image.new("RGB", (64, 64), (1, 2, 3))]}, "init_images"),
        ({"denoising_strength": 1.5}, "denoising_strength"),
        ({"denoising_strength": 0.1}, "denoising_strength"),  # int(3 × 0.1) = 0 steps
        ({"inpainting_fill": 7, "mask_image": Image.new("L", (64, 64), 255)}, "inpainting_fill"),
    ):
        with pytest.raises(RuntimeError) as caught:
            api.img2img(**{"images": [picture], "prompt": "x", **FAST, **arguments})
        status, text = caught.value.args
        assert status == 422 and f'"{field}"' in text, (arguments, text)
    raw = api.session.post(
        f"{api.baseurl}/img2img", json={"prompt": "x", "init_images": ["bm90IGEgcGljdHVyZQ=="]}
    )
    assert raw.status_code == 422 and raw.json()["detail"][0]["loc"] == ["body", "init_images"]
    assert "not a PNG, JPEG or WebP" in raw.json()["detail"][0]["msg"]


def test_hires_and_refiner_fields_map_onto_the_schema():
    from genserve.api.a1111_inputs import HiresFields, hires_fields
    from genserve.api.routes.a1111 import _model_name, _sampler
    from genserve.schemas.image_inputs import HiresOptions, RefinerOptions

    fields = HiresFields(
        enable_hr=True,
        hr_scale=1.5,
        hr_upscaler="Latent (bicubic)",
        hr_second_pass_steps=5,
        denoising_strength=0.4,
        hr_sampler_name="DPM++ 2M",
        refiner_checkpoint="tiny-sdxl [0123abcd]",
        refiner_switch_at=0.7,
    )
    assert hires_fields(fields, _sampler, _model_name) == {
        "hires": HiresOptions(
            scale=1.5, upscaler="latent_bicubic", steps=5, strength=0.4, sampler="dpmpp_2m"
        ),
        "refiner": RefinerOptions(model="tiny-sdxl", switch_at=0.7),
    }
    sized = HiresFields(enable_hr=True, hr_resize_x=128, hr_resize_y=96, hr_upscaler="Lanczos")
    assert hires_fields(sized, _sampler, _model_name)["hires"] == HiresOptions(
        width=128, height=96, upscaler="lanczos"
    )
    assert hires_fields(HiresFields(hr_scale=3), _sampler, _model_name) == {}  # enable_hr off


def test_unsupported_requests_are_422(api):
    for arguments, text in (
        ({"sampler_name": "LMS"}, "not available"),
        ({"enable_hr": True, "hr_resize_x": 4096, "hr_resize_y": 4096}, '"loc":["body","enable_hr"]'),
        ({"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler 'R-ESRGAN 4x+' is not available"),
        ({"enable_hr": True, "hr_scale": 9}, '"loc":["body","hr_scale"]'),
        ({"width": 100}, "multiple of 8"),
    ):
        with pytest.raises(RuntimeError) as caught:
            api.txt2img(prompt="x", **{**FAST, **arguments})
        assert caught.value.args[0] == 422 and text in caught.value.args[1]


def test_txt2img_enable_hr_returns_the_larger_picture(api):
    result = api.txt2img(
        prompt="a red circle",
        seed=2,
        enable_hr=True,
        hr_scale=2,
        hr_second_pass_steps=2,
        denoising_strength=0.5,
        **FAST,
    )
    assert result.image.size == (128, 128)
    parameters = result.info["infotexts"][0]
    assert (
        "Size: 64x64" in parameters and "Hires upscale: 2.0" in parameters and "Hires steps: 2" in parameters
    )


def test_webuiapi_inpainting_keeps_every_pixel_outside_the_white_mask(api):
    import numpy as np

    rng = np.random.default_rng(5)
    picture = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 40, 48))
    result = api.img2img(
        images=[picture], mask_image=mask, prompt="a yellow star", denoising_strength=0.9, mask_blur=0,
        inpainting_fill=1, inpaint_full_res=False, seed=2, **FAST,
    )  # fmt: skip
    out, original, inside = (
        np.asarray(result.images[0].convert("RGB")),
        np.asarray(picture),
        np.asarray(mask) > 0,
    )
    assert np.array_equal(out[~inside], original[~inside])
    assert not np.array_equal(out[inside], original[inside])


def test_img2img_progress_counts_the_steps_that_run(api):
    picture = "data:image/png;base64," + webuiapi.raw_b64_img(Image.new("RGB", (64, 64), (9, 90, 9)))
    payload = {"prompt": "x", "init_images": [picture], "denoising_strength": 0.5, "steps": 10,
               "width": 64, "height": 64, "force_task_id": "task-img2img"}  # fmt: skip
    assert api.session.post(f"{api.baseurl}/img2img", json=payload).status_code == 200
    done = api.session.get(f"{api.baseurl}/progress", params={"id_task": "task-img2img"}).json()
    assert done["completed"] is True and done["progress"] == 1.0
    assert done["state"]["sampling_steps"] == 5 and done["state"]["sampling_step"] == 5  # int(10 × 0.5)

"""The OpenAI Images API, driven by the official `openai` package against a live server."""

from __future__ import annotations

import base64
import hashlib
import io

import httpx
import openai
import pytest
from PIL import Image

from tests.helpers import LiveServer

FAST = {"steps": 3}


@pytest.fixture(scope="module")
def server(tiny_models_dir, tmp_path_factory):
    live = LiveServer(
        models_dir=tiny_models_dir,
        data_dir=tmp_path_factory.mktemp("data"),
        env={"GENSERVE_LIMITS__MAX_WIDTH": "512", "GENSERVE_LIMITS__MAX_HEIGHT": "512"},
    ).start()
    yield live
    live.kill_all()  # nothing to keep: a graceful stop would only cost seconds


@pytest.fixture(scope="module")
def client(server):
    # Auth is off on loopback; the client insists on a key all the same.
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_b64_json_images_with_parameters(client):
    raw = client.images.with_raw_response.generate(
        model="tiny-sd15",
        prompt="a red circle",
        n=2,
        size="64x64",
        response_format="b64_json",
        extra_body={**FAST, "seed": 7, "negative_prompt": "blue", "sampler": "euler_a"},
    )
    assert len(raw.headers["x-trace-id"]) == 32
    result = raw.parse()
    assert result.created > 0 and result.size == "64x64" and result.output_format == "png"
    assert len(result.data) == 2
    for index, item in enumerate(result.data):
        image = decode(item.b64_json)
        assert image.format == "PNG" and image.size == (64, 64)
        assert f"Seed: {7 + index}" in image.text["parameters"]
        assert "Negative prompt: blue" in image.text["parameters"]
        assert "Sampler: Euler a" in image.text["parameters"]


def test_url_format_and_jpeg_webp_output(client, server):
    result = client.images.generate(
        model="tiny-sd15", prompt="a lighthouse", size="64x64", response_format="url",
        output_format="jpeg", output_compression=80, extra_body=FAST,
    )  # fmt: skip
    url = result.data[0].url
    assert url.startswith(server.url + "/v1/images/") and "format=jpeg" in url
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(response.content)).format == "JPEG"

    webp = client.images.generate(prompt="a lighthouse", size="auto", output_format="webp", extra_body=FAST)
    image = decode(webp.data[0].b64_json)
    assert image.format == "WEBP" and image.size == (64, 64)  # auto: the default model's native size
    assert webp.output_format == "webp"


def test_stream_maps_previews_to_partial_images(client):
    stream = client.images.generate(
        model="tiny-sd15", prompt="a fox", size="64x64", stream=True, partial_images=2,
        extra_body={"steps": 6, "seed": 1},
    )  # fmt: skip
    events = list(stream)
    types = [event.type for event in events]
    assert types == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], types
    assert [event.partial_image_index for event in events[:2]] == [0, 1]
    for event in events:
        image = decode(event.b64_json)
        assert image.format == "PNG" and image.size == (64, 64)
    assert events[-1].size == "64x64" and events[-1].output_format == "png"


@pytest.mark.parametrize(
    ("arguments", "param", "text"),
    [
        ({"size": "100x100"}, "size", "multiple of 8"),
        ({"size": "1024x1024"}, "size", "max_width"),
        ({"size": "big"}, "size", "WIDTHxHEIGHT"),
        ({"model": "dall-e-3"}, "model", "not registered"),
        ({"n": 11}, "n", "less than or equal to 10"),
        ({"background": "transparent"}, "background", "opaque"),
        ({"extra_body": {"strength": 0.5}}, "strength", "Unrecognized request argument"),
        ({"extra_body": {"sampler": "plms"}}, "sampler", "euler"),
    ],
)
def test_what_the_model_cannot_do_is_an_openai_error(client, arguments, param, text):
    arguments = {"model": "tiny-sd15", "size": "64x64", **arguments}
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="x", **arguments)
    error = caught.value
    assert error.status_code == 400
    assert error.body["param"] == param and error.body["type"] == "invalid_request_error"
    assert text in error.body["message"], error.body


def test_models_list_reads_as_openai_models(client):
    ids = {model.id for model in client.models.list()}
    assert {"tiny-sd15", "tiny-sdxl", "tiny-sd3"} <= ids


def test_other_routes_keep_their_error_shape(server):
    response = httpx.post(server.url + "/v1/jobs", json={"prompt": "x", "width": 100}, timeout=30)
    assert response.status_code == 422 and "detail" in response.json()


# POST /v1/images/edits


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def stored_params(server, job_id: str) -> dict:
    return httpx.get(f"{server.url}/v1/jobs/{job_id}", timeout=30).json()["params"]


def stored_picture(server, picture_id: str) -> Image.Image:
    response = httpx.get(f"{server.url}/v1/uploads/{picture_id}", timeout=30)
    assert response.status_code == 200
    return Image.open(io.BytesIO(response.content))


def test_edit_with_a_mask_inpaints_where_the_mask_is_transparent(client, server):
    picture = png_bytes(Image.new("RGB", (64, 48), (30, 30, 200)))
    mask = Image.new("RGBA", (64, 48), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 8, 48, 40))  # transparent: edit here
    raw = client.images.with_raw_response.edit(
        image=("picture.png", picture, "image/png"),
        mask=("mask.png", png_bytes(mask), "image/png"),
        prompt="a yellow star",
        model="tiny-sd15",
        n=2,
        extra_body={**FAST, "seed": 4},
    )
    result = raw.parse()
    assert len(result.data) == 2 and result.size == "64x48"  # size auto: the picture's
    assert all(decode(item.b64_json).size == (64, 48) for item in result.data)
    params = stored_params(server, raw.headers["x-job-id"])
    assert params["init_image"] == "sha256:" + hashlib.sha256(picture).hexdigest()
    assert params["strength"] == 1.0 and params["inpaint"]["fill"] == "fill"
    white_means_edit = stored_picture(server, params["mask"])
    assert white_means_edit.mode == "L" and white_means_edit.size == (64, 48)
    assert white_means_edit.getpixel((20, 20)) == 255 and white_means_edit.getpixel((2, 2)) == 0


def test_edit_without_a_mask_uses_the_images_transparency_or_else_is_img2img(client, server):
    holed = Image.new("RGBA", (64, 64), (200, 30, 30, 255))
    holed.paste((0, 0, 0, 0), (0, 0, 32, 64))
    raw = client.images.with_raw_response.edit(
        image=("holed.png", png_bytes(holed), "image/png"), prompt="a fox", size="64x64", extra_body=FAST
    )
    params = stored_params(server, raw.headers["x-job-id"])
    assert stored_picture(server, params["mask"]).getpixel((5, 5)) == 255
    opaque = png_bytes(Image.new("RGB", (64, 64), (10, 120, 10)))
    raw = client.images.with_raw_response.edit(
        image=("opaque.png", opaque, "image/png"),
        prompt="a fox",
        size="64x64",
        extra_body={**FAST, "strength": 0.5},
    )
    params = stored_params(server, raw.headers["x-job-id"])
    assert (params["mask"], params["inpaint"], params["strength"]) == (None, None, 0.5)


def test_edit_streams_partial_images(client):
    picture = png_bytes(Image.new("RGB", (64, 64), (30, 30, 200)))
    stream = client.images.edit(
        image=("p.png", picture, "image/png"), prompt="a fox", stream=True, partial_images=2,
        extra_body={"steps": 6, "seed": 1},
    )  # fmt: skip
    types = [event.type for event in stream]
    assert types == ["image_edit.partial_image"] * 2 + ["image_edit.completed"], types


@pytest.mark.parametrize(
    ("arguments", "param", "text"),
    [
        ({"mask": ("m.png", png_bytes(Image.new("RGB", (64, 64))), "image/png")}, "mask", "alpha channel"),
        ({"mask": ("m.png", png_bytes(Image.new("RGBA", (32, 32))), "image/png")}, "mask", "same size"),
        (
            {"mask": ("m.png", png_bytes(Image.new("RGBA", (64, 64), (0, 0, 0, 255))), "image/png")},
            "mask",
            "no transparent pixel",
        ),
        ({"image": ("p.gif", b"GIF89a....", "image/gif")}, "image", "GIF pictures are not accepted"),
        ({"image": ("p.png", b"\x89PNG\r\n\x1a\n broken", "image/png")}, "image", "corrupt"),
        ({"extra_body": {"strength": 2}}, "strength", "less than or equal to 1"),
        ({"extra_body": {"style": "vivid"}}, "style", "Unrecognized request argument"),
        ({"n": 11}, "n", "less than or equal to 10"),
    ],
)
def test_bad_edits_are_openai_errors_naming_the_param(client, arguments, param, text):
    arguments = {"image": ("p.png", png_bytes(Image.new("RGB", (64, 64))), "image/png"), **arguments}
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(prompt="x", model="tiny-sd15", **arguments)
    error = caught.value
    assert error.body["param"] == param and error.body["type"] == "invalid_request_error"
    assert text in error.body["message"], error.body


def test_edit_of_two_images_and_of_none(server):
    picture = png_bytes(Image.new("RGB", (64, 64)))
    two = httpx.post(
        f"{server.url}/v1/images/edits",
        data={"prompt": "x"},
        files=[("image[]", ("a.png", picture, "image/png")), ("image[]", ("b.png", picture, "image/png"))],
        timeout=30,
    )
    assert two.status_code == 400 and two.json()["error"]["param"] == "image"
    none = httpx.post(
        f"{server.url}/v1/images/edits", data={"prompt": "x"}, files={"x": ("a", b"b")}, timeout=30
    )
    assert none.status_code == 422 and none.json()["error"]["param"] == "image"


def test_edit_keeps_the_pixels_away_from_the_transparent_area(client):
    import numpy as np

    rng = np.random.default_rng(3)
    picture = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (24, 24, 40, 40))
    result = client.images.edit(
        image=("p.png", png_bytes(picture), "image/png"), mask=("m.png", png_bytes(mask), "image/png"),
        prompt="a yellow star", model="tiny-sd15", extra_body={**FAST, "seed": 9},
    )  # fmt: skip
    out, original = np.asarray(decode(result.data[0].b64_json).convert("RGB")), np.asarray(picture)
    far = np.ones((64, 64), dtype=bool)
    far[8:56, 8:56] = False  # 16 px from the edited square: beyond the default 4 px mask blur
    assert np.array_equal(out[far], original[far])
    assert not np.array_equal(out[24:40, 24:40], original[24:40, 24:40])

"""Pictures in (issue 16): uploads, pictures sent with a job, and every bad input refused with a
4xx naming the field. The API runs in-process without a worker, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import hashlib
import io
import json

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from PIL import Image

from genserve.config import Settings
from tests.test_s3_artifacts import aws_env, s3_endpoint  # noqa: F401 - fixtures

PNG_MEDIA = "image/png"


def picture(size=(64, 48), color=(200, 30, 30), fmt="PNG", mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color if mode != "L" else 255).save(buffer, format=fmt)
    return buffer.getvalue()


def noise_png(size: tuple[int, int]) -> bytes:
    import random

    rng = random.Random(0)
    image = Image.frombytes("RGB", size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * 3)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_settings(models_dir, data_dir, store_url: str, **limits) -> Settings:
    return Settings(
        data_dir=data_dir,
        models_dir=models_dir,
        store_url=store_url,
        default_model="tiny-sd15",
        builtin_models=False,
        workers=0,
        limits={"max_width": 512, "max_height": 512, "max_pixels": 256 * 512, **limits},
    )


def serve(settings: Settings):
    from genserve.api.app import create_app

    return TestClient(create_app(settings, supervise_workers=False))


@pytest.fixture
def client(tiny_models_dir, tmp_path):
    """On SQLite: where the store does not matter."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    with serve(make_settings(tiny_models_dir, tmp_path / "data", url, max_upload_bytes=64 * 1024)) as client:
        yield client


@pytest.fixture
def app_settings(tiny_models_dir, tmp_path, store_url):
    return make_settings(tiny_models_dir, tmp_path / "data", store_url, max_upload_bytes=64 * 1024)


@pytest.fixture
def store_client(app_settings):
    """On SQLite and PostgreSQL: where what the store keeps matters."""
    with serve(app_settings) as client:
        yield client


def upload(client, data: bytes, name="p.png", media=PNG_MEDIA):
    return client.post("/v1/uploads", files={"file": (name, data, media)})


def job(client, **body):
    return client.post("/v1/jobs", json={"prompt": "a red circle", "steps": 4, **body})


def assert_field_error(response, status: int, field: str, text: str) -> None:
    assert response.status_code == status, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", field], error
    assert text in error["msg"], error["msg"]


# Uploads


def test_upload_answers_the_content_hash_and_the_same_id_twice(client):
    data = picture((64, 48))
    first = upload(client, data)
    assert first.status_code == 201, first.text
    assert first.json() == {"id": sha(data), "width": 64, "height": 48, "format": "png", "bytes": len(data)}
    assert upload(client, data, name="other-name.png").json()["id"] == sha(data)
    stored = client.get(f"/v1/uploads/{sha(data)}")
    assert stored.status_code == 200 and stored.content == data
    assert stored.headers["content-type"] == PNG_MEDIA


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_jpeg_and_webp_uploads(client, fmt):
    data = picture((40, 24), fmt=fmt)
    answer = upload(client, data, name=f"p.{fmt.lower()}", media=f"image/{fmt.lower()}")
    assert answer.status_code == 201, answer.text
    assert answer.json()["format"] == fmt.lower() and answer.json()["width"] == 40


def test_exif_orientation_is_applied_to_the_reported_size(client):
    image = Image.new("RGB", (64, 32), (10, 200, 10))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° on display: the engine sees a 32x64 picture
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    answer = upload(client, buffer.getvalue(), name="p.jpg", media="image/jpeg")
    assert (answer.json()["width"], answer.json()["height"]) == (32, 64)


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (picture(fmt="GIF"), "GIF pictures are not accepted"),
        (picture(fmt="BMP"), "BMP pictures are not accepted"),
        (b"hello, not a picture", "not a PNG, JPEG or WebP picture"),
        (picture((64, 64))[:60], "corrupt or truncated"),
        (b"", "empty"),
    ],
    ids=["gif", "bmp", "text", "truncated", "empty"],
)
def test_bad_uploads_are_422_naming_the_file_field(client, data, text):
    assert_field_error(upload(client, data), 422, "file", text)


def test_upload_over_the_byte_limit_is_413(client):
    big = noise_png((160, 160))  # ~77 kB of noise: over the 64 kB limit, under the body slack
    assert len(big) > 64 * 1024
    assert_field_error(upload(client, big), 413, "file", "limit")


def test_upload_body_far_over_the_limit_is_refused_before_parsing(client):
    huge = b"x" * (2 * 1024 * 1024)
    response = client.post(
        "/v1/uploads", content=huge, headers={"content-type": "multipart/form-data; boundary=x"}
    )
    assert_field_error(response, 413, "file", "limit")


def test_upload_over_the_pixel_limit_is_422(tiny_models_dir, tmp_path):
    settings = make_settings(
        tiny_models_dir, tmp_path, f"sqlite:///{tmp_path}/s.db", max_input_pixels=64 * 64
    )
    with serve(settings) as small:
        assert_field_error(upload(small, picture((65, 64))), 422, "file", "max_input_pixels")


def test_upload_needs_multipart_with_a_file_field(client):
    not_multipart = client.post("/v1/uploads", json={"file": b64(picture())})
    assert_field_error(not_multipart, 415, "file", "multipart/form-data")
    no_file = client.post("/v1/uploads", files={"other": ("p.png", picture(), PNG_MEDIA)})
    assert_field_error(no_file, 422, "file", "missing")
    text_field = client.post("/v1/uploads", data={"file": "just text"}, files={"x": ("a", b"b")})
    assert_field_error(text_field, 422, "file", "not a file")


def test_unknown_upload_is_404(client):
    assert client.get("/v1/uploads/sha256:" + "0" * 64).status_code == 404
    assert client.get("/v1/uploads/sha256:nothex").status_code == 422


# Pictures sent with a job


@pytest.mark.parametrize("form", ["base64", "data_url", "upload_id"])
def test_job_keeps_only_the_hash_whatever_form_the_picture_came_in(store_client, app_settings, form):
    client = store_client
    data = picture((64, 48))
    value = {"base64": b64(data), "data_url": "data:image/png;base64," + b64(data), "upload_id": sha(data)}
    if form == "upload_id":
        upload(client, data)
    response = job(client, init_image=value[form], strength=0.5, width=64, height=48)
    assert response.status_code == 202, response.text
    assert response.json()["params"]["init_image"] == sha(data)
    shown = client.get(f"/v1/jobs/{response.json()['id']}").json()
    assert shown["params"]["init_image"] == sha(data) and shown["params"]["strength"] == 0.5
    assert client.get(f"/v1/uploads/{sha(data)}").content == data
    engine = sa.create_engine(app_settings.resolved_store_url)
    with engine.connect() as conn:
        raw = conn.execute(sa.text("SELECT params FROM jobs WHERE id = :id"), {"id": response.json()["id"]})
        row = raw.scalar_one()
    engine.dispose()
    text = row if isinstance(row, str) else json.dumps(row)
    assert sha(data) in text and b64(data)[:40] not in text and len(text) < 2000


def test_same_picture_as_base64_or_upload_id_is_the_same_request(store_client):
    client = store_client
    data = picture((64, 48), color=(1, 2, 3))
    first = job(client, init_image=b64(data), width=64, height=48, request_id="same-picture")
    assert first.status_code == 202, first.text
    again = job(client, init_image=sha(data), width=64, height=48, request_id="same-picture")
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    other = job(client, init_image=b64(picture((64, 48))), width=64, height=48, request_id="same-picture")
    assert other.status_code == 409


def test_mask_and_init_image_are_stored_and_named_by_hash(client):
    image, mask = picture((64, 48)), picture((64, 48), mode="L")
    response = job(client, init_image=b64(image), mask=b64(mask), inpaint={"mask_blur": 2})
    assert response.status_code == 202, response.text
    params = response.json()["params"]
    assert (params["init_image"], params["mask"]) == (sha(image), sha(mask))
    assert params["inpaint"]["mask_blur"] == 2


@pytest.mark.parametrize(
    ("body", "field", "text"),
    [
        ({"init_image": "sha256:" + "a" * 64}, "init_image", "no upload has the id"),
        ({"init_image": "sha256:xyz"}, "init_image", "not a valid upload id"),
        ({"init_image": "%%% not base64 %%%"}, "init_image", "not base64, a data URL or an upload id"),
        ({"init_image": "data:image/png,rawbytes"}, "init_image", "without ';base64,'"),
        ({"init_image": b64(b"plain text")}, "init_image", "not a PNG, JPEG or WebP"),
        ({"init_image": b64(picture(fmt="GIF"))}, "init_image", "GIF"),
        ({"init_image": b64(picture((64, 64))[:70])}, "init_image", "corrupt or truncated"),
        ({"init_image": b64(noise_png((160, 160)))}, "init_image", "max_upload_bytes"),
        ({"init_image": b64(picture()), "mask": b64(picture((32, 32)))}, "mask", "same size"),
        ({"init_image": b64(picture()), "mask": "!!"}, "mask", "not base64"),
        ({"init_image": b64(picture()), "mask": b64(picture(color=(0, 0, 0)))}, "mask", "marks nothing"),
        (
            {"init_image": b64(picture()), "mask": b64(picture(mode="L")), "inpaint": {"invert": True}},
            "mask",
            "marks nothing to inpaint: it has no black or transparent pixel (invert is on)",
        ),
        (
            {"init_image": b64(picture()), "mask": b64(picture(mode="RGBA", color=(255, 255, 255, 0)))},
            "mask",
            "marks nothing",  # white but fully transparent: the alpha decides
        ),
        ({"mask": b64(picture())}, "mask", "needs an init_image"),
        ({"outpaint": {"left": 16}}, "outpaint", "needs an init_image"),
        ({"init_image": b64(picture()), "inpaint": {"mask_blur": 2}}, "inpaint", "need a mask"),
        ({"init_image": b64(picture()), "strength": 0.2}, "strength", "runs no step"),
        ({"init_image": b64(picture()), "hires": {"scale": 2}}, "hires", "second pass of a text-to-image"),
    ],
    ids=[
        "unknown-upload",
        "malformed-id",
        "not-base64",
        "data-url-not-base64",
        "not-a-picture",
        "gif",
        "truncated",
        "too-large",
        "mask-size",
        "mask-not-base64",
        "mask-all-black",
        "mask-all-white-inverted",
        "mask-all-transparent",
        "mask-alone",
        "outpaint-alone",
        "inpaint-without-mask",
        "strength-runs-no-step",
        "hires-with-init-image",
    ],
)
def test_bad_pictures_in_a_job_are_422_naming_the_field(client, body, field, text):
    response = job(client, **body)
    assert_field_error(response, 422, field, text)
    assert client.get("/v1/jobs").json()["total"] == 0  # nothing reached the queue


def test_pixel_limit_applies_to_pictures_in_a_job(tiny_models_dir, tmp_path):
    settings = make_settings(
        tiny_models_dir, tmp_path, f"sqlite:///{tmp_path}/s.db", max_input_pixels=64 * 64
    )
    with serve(settings) as small:
        response = job(small, init_image=b64(picture((128, 64))))
        assert_field_error(response, 422, "init_image", "max_input_pixels")


# Size from the picture


@pytest.mark.parametrize(
    ("size", "body", "expected"),
    [
        ((72, 40), {}, (72, 40)),  # the picture's own size
        ((70, 43), {}, (72, 40)),  # to multiples of 8
        ((64, 48), {"outpaint": {"left": 16, "right": 16, "bottom": 8}}, (96, 56)),  # plus the margins
        ((128, 64), {"width": 64}, (64, 32)),  # one side given: the other keeps the aspect ratio
        ((128, 64), {"height": 128}, (256, 128)),
        ((1000, 500), {}, (512, 256)),  # scaled down into max_width 512, max_pixels 256×512
        ((600, 600), {}, (360, 360)),  # max_pixels: 600² scaled to √(256×512) ≈ 362 → 360
    ],
)
def test_size_resolves_from_the_init_image(client, size, body, expected):
    response = job(client, init_image=b64(picture(size)), **body)
    assert response.status_code == 202, response.text
    params = response.json()["params"]
    assert (params["width"], params["height"]) == expected


def test_an_explicit_size_wins_over_the_picture(client):
    response = job(client, init_image=b64(picture((72, 40))), width=64, height=64)
    assert (response.json()["params"]["width"], response.json()["params"]["height"]) == (64, 64)


# Restart


def test_a_queued_job_survives_a_restart_with_only_the_hash(app_settings):
    data = picture((64, 48), color=(9, 9, 9))
    with serve(app_settings) as before:
        job_id = job(before, init_image=b64(data)).json()["id"]
    with serve(app_settings) as after:
        shown = after.get(f"/v1/jobs/{job_id}").json()
        assert shown["state"] == "queued" and shown["params"]["init_image"] == sha(data)
        assert after.get(f"/v1/uploads/{sha(data)}").content == data


# Cost


def test_estimate_counts_only_the_steps_that_run(client):
    from genserve.scheduler.cost import StepTiming
    from genserve.store.calibration import CalibrationStore

    store = client.app.state.services.store
    CalibrationStore(store.engine).save(StepTiming("cpu", "tiny-sd15", 64, 48, 1, 0.4, 0.1, "calibrated", 3))
    body = {"prompt": "x", "model": "tiny-sd15", "steps": 20, "width": 64, "height": 48, "device": "cpu"}
    txt2img = client.post("/v1/estimate", json=body).json()
    half = client.post("/v1/estimate", json={**body, "init_image": b64(picture()), "strength": 0.5}).json()
    assert txt2img["seconds_per_batch"] == pytest.approx(0.4 + 20 * 0.1)
    # 10 of the 20 steps, plus a VAE encode guessed at a quarter of O
    assert half["seconds_per_batch"] == pytest.approx(0.4 + 10 * 0.1 + 0.25 * 0.4)
    assert 0.5 < half["seconds_per_batch"] / txt2img["seconds_per_batch"] < 0.65


# The S3 artifact store


def test_pictures_in_s3_are_shared_between_api_and_worker(s3_endpoint, aws_env, tmp_path):  # noqa: F811
    import boto3

    from genserve.artifacts.inputs import MissingPicture
    from genserve.artifacts.s3 import S3InputStore, make_input_store

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="genserve-images")
    url = "s3://genserve-images/prod"
    api_side = make_input_store(
        Settings(data_dir=tmp_path / "api", artifact_url=url, s3_endpoint_url=s3_endpoint)
    )
    assert isinstance(api_side, S3InputStore)
    data = picture((40, 24))
    assert api_side.put(data) == sha(data) and api_side.put(data) == sha(data)
    keys = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket="genserve-images")["Contents"]
    assert [item["Key"] for item in keys] == ["prod/inputs/" + sha(data).removeprefix("sha256:")]
    worker_side = S3InputStore(url, tmp_path / "worker-cache", endpoint_url=s3_endpoint)
    assert worker_side.exists(sha(data)) and worker_side.get(sha(data)) == data
    assert worker_side.size(sha(data)) == (40, 24)
    missing = "sha256:" + "1" * 64
    assert not worker_side.exists(missing)
    with pytest.raises(MissingPicture):
        worker_side.get(missing)

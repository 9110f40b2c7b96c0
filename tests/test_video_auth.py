"""Video jobs under API keys (issue 17 item 2: auth, quotas, tracing): a video needs a key, another
key's video is 404 on /v1/video/jobs and OpenAI's /v1/videos, a key's model and size limits are 422s
naming the field, its GPU-seconds quota is a 429, and a W3C traceparent becomes the job's trace id.
Nothing runs: every check is at submission."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from genserve.auth.keys import KeyLimits, KeyStore
from genserve.config import Settings

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
BODY = {"model": "tiny-ltx", "prompt": "a dog", "num_frames": 9, "width": 32, "height": 32, "steps": 2}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from genserve.engine.models.fixtures import write_tiny_pipeline
    from genserve.engine.models.video_fixtures import write_tiny_video_pipeline

    root = tmp_path_factory.mktemp("video-auth-models")
    write_tiny_pipeline("sd15", root / "tiny-sd15")
    write_tiny_video_pipeline("ltx", root / "tiny-ltx")
    return root


@pytest.fixture
def client(models_dir: Path, tmp_path: Path):
    from genserve.api.app import create_app

    settings = Settings(
        data_dir=tmp_path / "data",
        models_dir=models_dir,
        builtin_models=False,
        default_model="tiny-sd15",
        default_video_model="tiny-ltx",
        workers=0,
        auth="on",
    )
    with TestClient(create_app(settings, supervise_workers=False)) as test_client:
        test_client.keys = KeyStore.from_url(settings.resolved_store_url)
        yield test_client


def token(client: TestClient, name: str, **limits: object) -> dict[str, str]:
    _, secret = client.keys.create(name, limits=KeyLimits(rate_per_second=1000, **limits))
    return {"Authorization": f"Bearer {secret}"}


def test_a_video_needs_a_key_and_belongs_to_it(client: TestClient) -> None:
    assert client.post("/v1/video/jobs", json=BODY).status_code == 401
    alice, bob = token(client, "alice"), token(client, "bob")
    created = client.post("/v1/video/jobs", json=BODY, headers=alice)
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    assert client.get(f"/v1/video/jobs/{job_id}", headers=alice).status_code == 200
    assert client.get(f"/v1/video/jobs/{job_id}", headers=bob).status_code == 404
    assert client.get(f"/v1/videos/{job_id}", headers=bob).status_code == 404
    assert client.delete(f"/v1/video/jobs/{job_id}", headers=bob).status_code == 404
    assert client.get("/v1/video/jobs", headers=bob).json()["total"] == 0
    assert client.get("/v1/video/jobs", headers=alice).json()["total"] == 1


def test_a_keys_model_and_size_limits_are_422s_naming_the_field(client: TestClient) -> None:
    images_only = token(client, "images-only", allowed_models=["tiny-sd15"])
    response = client.post("/v1/video/jobs", json=BODY, headers=images_only)
    assert response.status_code == 422
    detail = response.json()["detail"][0]
    assert detail["loc"][-1] == "model" and "may use only the models ['tiny-sd15']" in detail["msg"]
    small = token(client, "small", max_width=16)
    response = client.post("/v1/video/jobs", json=BODY, headers=small)
    assert response.status_code == 422
    detail = response.json()["detail"][0]
    assert detail["loc"][-1] == "width" and "maximum width 16" in detail["msg"]


def test_the_gpu_seconds_quota_is_a_429(client: TestClient) -> None:
    frugal = token(client, "frugal", gpu_seconds_per_day=0.000001)
    response = client.post("/v1/video/jobs", json=BODY, headers=frugal)
    assert response.status_code == 429 and "GPU-seconds quota" in response.json()["detail"]
    assert int(response.headers["retry-after"]) >= 1


def test_a_traceparent_becomes_the_videos_trace_id(client: TestClient) -> None:
    headers = {**token(client, "traced"), "traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"}
    response = client.post("/v1/video/jobs", json=BODY, headers=headers)
    assert response.status_code == 202, response.text
    assert response.headers["X-Trace-Id"] == TRACE_ID

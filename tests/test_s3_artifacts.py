"""The S3 artifact store against moto's standalone S3 server (`moto_server`), not real AWS."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from genserve.config import Settings
from tests.helpers import free_port, wait_for

pytest.importorskip("boto3")


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    server = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    if not Path(server).exists():
        pytest.skip("moto_server (pip install 'moto[server]') is not installed")
    port = free_port()
    process = subprocess.Popen(
        [server, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    import httpx

    def up() -> bool:
        try:
            return httpx.get(url, timeout=1).status_code < 500
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, timeout=30, interval=0.2, message="moto_server")
        yield url
    finally:
        process.kill()
        process.wait()


@pytest.fixture
def aws_env(monkeypatch):
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)


def test_images_written_by_a_worker_are_read_by_another_replica(s3_endpoint, aws_env, tmp_path):
    import boto3

    from genserve.artifacts.s3 import S3ImageStore, make_image_store

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="genserve-images")
    settings = Settings(
        data_dir=tmp_path / "worker", artifact_url="s3://genserve-images/prod", s3_endpoint_url=s3_endpoint
    )
    worker_side = make_image_store(settings)
    assert isinstance(worker_side, S3ImageStore)
    worker_side.save("job1-0", b"\x89PNG first")
    worker_side.save("job1-0", b"\x89PNG again")  # a re-run overwrites: one object per image id
    keys = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket="genserve-images")["Contents"]
    assert [item["Key"] for item in keys] == ["prod/job1-0.png"]

    api_side = S3ImageStore("s3://genserve-images/prod", tmp_path / "api-cache", endpoint_url=s3_endpoint)
    assert api_side.exists("job1-0")
    assert api_side.path("job1-0").read_bytes() == b"\x89PNG again"
    assert not api_side.exists("job2-0") and not api_side.path("job2-0").exists()
    with pytest.raises(ValueError):
        api_side.path("../escape")


def test_default_is_the_shared_directory(tmp_path):
    from genserve.artifacts.images import ImageStore
    from genserve.artifacts.s3 import make_image_store

    store = make_image_store(Settings(data_dir=tmp_path))
    assert type(store) is ImageStore and store.root == tmp_path / "images"


def test_segment_frames_made_on_one_machine_are_stitched_on_another(s3_endpoint, aws_env, tmp_path):
    import boto3
    import numpy as np

    from genserve.artifacts.s3 import S3VideoStore, make_video_store

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="genserve-videos")
    settings = Settings(
        data_dir=tmp_path / "one", artifact_url="s3://genserve-videos/prod", s3_endpoint_url=s3_endpoint
    )
    one = make_video_store(settings)
    assert isinstance(one, S3VideoStore)
    frames = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    one.save_frames("seg-s000.npz", frames)
    one.save_record("vid.json", {"frames": 5})
    other = S3VideoStore("s3://genserve-videos/prod", tmp_path / "two", endpoint_url=s3_endpoint)
    assert np.array_equal(other.load_frames("seg-s000.npz"), frames)
    assert other.load_record("vid.json") == {"frames": 5} and other.load_record("none.json") is None
    assert not other.exists("missing.mp4")
    keys = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket="genserve-videos")["Contents"]
    assert sorted(item["Key"] for item in keys) == ["prod/videos/seg-s000.npz", "prod/videos/vid.json"]

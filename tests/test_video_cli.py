"""`genserve video` and `genserve plan --video`: a clip made in this process on a tiny LTX model (one
pass and a long clip of segments), decoded back; the same through a server's API; the cost plan."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from genserve.cli import app
from genserve.engine.video.encode import probe_video

FAST = ["--steps", "2", "--seed", "3", "--width", "32", "--height", "32"]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from genserve.engine.models.video_fixtures import write_tiny_video_pipeline

    root = tmp_path_factory.mktemp("cli-video-models")
    write_tiny_video_pipeline("ltx", root / "tiny-ltx")
    return root


@pytest.fixture
def env(models_dir: Path, tmp_path: Path) -> dict[str, str]:
    return {
        "GENSERVE_MODELS_DIR": str(models_dir),
        "GENSERVE_DATA_DIR": str(tmp_path / "data"),
        "GENSERVE_BUILTIN_MODELS": "false",
        "GENSERVE_DEFAULT_MODEL": "tiny-ltx",
        "GENSERVE_DEFAULT_VIDEO_MODEL": "tiny-ltx",
        "GENSERVE_DEVICE": "cpu",
        "GENSERVE_TORCH_THREADS": "1",
    }


def invoke(env: dict[str, str], *args: str):
    return CliRunner().invoke(app, list(args), env=env)


def test_video_locally_writes_a_clip_that_decodes_to_the_frames_asked(env, tmp_path):
    out = tmp_path / "clip.mp4"
    result = invoke(env, "video", "a red ball", "-o", str(out), "--frames", "9", "--fps", "8", *FAST)
    assert result.exit_code == 0, result.output
    info = probe_video(out.read_bytes())
    assert (info.frames, info.fps, info.codec) == (9, pytest.approx(8), "h264")
    assert (info.width, info.height) == (32, 32)
    assert "wrote" in result.output and "9 frames at 8 fps" in result.output


def test_long_clip_locally_runs_its_segments_in_order_and_stitches_them(env, tmp_path):
    # extend on LTX: 9-frame segments continuing the last 2 frames; 15 frames asked, trimmed to them.
    out = tmp_path / "long.gif"
    args = ["--frames", "15", "--long-segment-frames", "9", "--overlap", "2", "--strategy", "extend"]
    result = invoke(env, "video", "a long walk", "-o", str(out), *args, *FAST)
    assert result.exit_code == 0, result.output
    info = probe_video(out.read_bytes())
    assert info.frames == 15 and info.codec == "gif"  # the suffix picked the container


def test_keyframe_and_bad_requests_name_the_field(env, tmp_path):
    picture = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (220, 20, 20)).save(picture)
    out = tmp_path / "i2v.webm"
    result = invoke(
        env, "video", "a red ball", "-o", str(out), "--mode", "i2v", "--keyframe", f"{picture}@0",
        "--frames", "9", *FAST,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert probe_video(out.read_bytes()).frames == 9
    wrong = invoke(env, "video", "x", "-o", str(tmp_path / "x.mp4"), "--frames", "10", *FAST)
    assert wrong.exit_code == 2 and "num_frames" in wrong.output and "8N+1" in wrong.output
    suffix = invoke(env, "video", "x", "-o", str(tmp_path / "x.avi"))
    assert suffix.exit_code == 2 and "suffix" in suffix.output
    missing = invoke(env, "video", "x", "--mode", "i2v", "--keyframe", "nope.png@0", "-o", str(out), *FAST)
    assert missing.exit_code == 2 and "keyframes[0]" in missing.output


def test_plan_video_prints_gpu_seconds_and_cost_per_video_second(env):
    result = invoke(
        env, "plan", "--video", "--model", "tiny-ltx", "--frames", "17", "--fps", "8", "--gpu-price", "2.5"
    )
    assert result.exit_code == 0, result.output
    assert "cost per video-second" in result.output and "GPU-seconds per clip" in result.output
    assert "seconds of video" in result.output and "2.125 s" in result.output  # 17 frames at 8 fps
    # A family that is not installed: its published defaults (Wan: 81 frames at 16 fps, 832x480).
    wan = invoke(env, "plan", "--video", "--model", "wan-14b", "--family", "wan", "--gpu-price", "3")
    assert wan.exit_code == 0, wan.output
    assert "832x480, 81 frames at 16 fps" in wan.output and "5.062 s" in wan.output
    unknown = invoke(env, "plan", "--video", "--model", "nope")
    assert unknown.exit_code == 2 and "--family" in unknown.output


def test_video_with_server_submits_follows_events_and_downloads(env, tmp_path, monkeypatch):
    """--server: the API in this process (TestClient as the HTTP client), a worker thread runs the job."""
    import httpx
    from fastapi.testclient import TestClient

    from genserve.api.app import create_app
    from genserve.config import Settings
    from genserve.store.jobs import JobStore
    from tests.test_video_api import run_queue

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings(workers=0, heartbeat_seconds=0.5)
    client = TestClient(create_app(settings, supervise_workers=False), base_url="http://genserve")

    def work() -> None:  # run what is queued once the CLI has submitted it, until it has ended
        store = JobStore.from_url(settings.resolved_store_url)  # the client is the CLI's alone
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            jobs, _ = store.list_jobs(kinds=("video",))
            if jobs and jobs[0].state in ("succeeded", "failed", "canceled"):
                break
            if jobs:
                run_queue(settings)
            time.sleep(0.1)
        store.close()

    monkeypatch.setattr(httpx, "Client", lambda **kwargs: client)
    picture = io.BytesIO()
    Image.new("RGB", (32, 32), (20, 20, 220)).save(picture, format="PNG")
    (tmp_path / "blue.png").write_bytes(picture.getvalue())
    with client:
        worker = threading.Thread(target=work)
        worker.start()
        out = tmp_path / "remote.mp4"
        result = invoke(
            env, "video", "a blue ball", "-o", str(out), "--mode", "i2v", "--keyframe",
            f"{tmp_path / 'blue.png'}@0", "--frames", "9", "--server", "http://genserve", *FAST,
        )  # fmt: skip
        worker.join()
    assert result.exit_code == 0, result.output
    assert probe_video(out.read_bytes()).frames == 9

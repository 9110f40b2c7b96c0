"""AnimateDiff keyframes through SparseCtrl on tiny random-weight models: the registry's reading of a
SparseControlNetModel in controlnet/, the engine against diffusers' AnimateDiffSparseControlNetPipeline,
one clip through /v1/video/jobs decoded back, and the 422s."""

from __future__ import annotations

import base64
import io
import threading
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from fastapi.testclient import TestClient

from genserve.config import Settings
from genserve.engine.models.controls import scan_controls
from genserve.engine.models.registry import read_model_info

MODEL = "tiny-animatediff"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from genserve.engine.models.control_fixtures import write_tiny_controlnet
    from genserve.engine.models.fixtures import write_tiny_pipeline
    from genserve.engine.models.video_fixtures import write_tiny_sparsectrl, write_tiny_video_pipeline

    root = tmp_path_factory.mktemp("sparsectrl-models")
    write_tiny_pipeline("sd15", root / "tiny-sd15")
    for kind in ("animatediff", "animatediff_sdxl", "ltx"):
        write_tiny_video_pipeline(kind, root / f"tiny-{kind.replace('_', '-')}")
    write_tiny_video_pipeline("motion_adapter", root / "tiny-motion", base_model="tiny-sd15")
    write_tiny_sparsectrl(root / "controlnet" / "tiny-sparsectrl-rgb", kind="rgb")
    write_tiny_sparsectrl(root / "controlnet" / "tiny-sparsectrl-scribble", kind="scribble")
    write_tiny_controlnet(root / "tiny-sd15", root / "controlnet" / "tiny-controlnet", "sd15")
    # A SparseCtrl made for another base: wider first block than the tiny UNet's 16 channels.
    other = root / "controlnet" / "sparsectrl-other-base"
    write_tiny_sparsectrl(other, kind="rgb")
    config = (
        (other / "config.json")
        .read_text()
        .replace('"block_out_channels": [\n    16,', '"block_out_channels": [\n    24,')
    )
    assert config != (other / "config.json").read_text()
    (other / "config.json").write_text(config)
    return root


def _picture(colour: tuple[int, int, int], size: int = 32) -> PIL.Image.Image:
    picture = PIL.Image.new("RGB", (size, size), (20, 20, 20))
    picture.paste(colour, (6, 6, 20, 20))
    return picture


def _b64(picture: PIL.Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# 1. The registry


def test_sparsectrl_models_are_controls_of_the_animatediff_family(models_dir: Path) -> None:
    controls = scan_controls(models_dir)
    for name in ("tiny-sparsectrl-rgb", "tiny-sparsectrl-scribble"):
        assert (controls[name].kind, controls[name].family) == ("sparsectrl", "animatediff")
    assert controls["tiny-controlnet"].kind == "controlnet"  # image ControlNets are unchanged
    assert read_model_info(models_dir / MODEL).video_modes == ("t2v", "v2v")  # keyframes need a SparseCtrl


# 2. The engine against diffusers


@pytest.fixture(scope="module")
def engine():
    from genserve.engine.video.pipelines import VideoEngine

    return VideoEngine(max_loaded=1)


def _engine_clip(
    engine, models_dir: Path, sparsectrl: str, keyframes: list, strength: float = 1.0, seed: int = 5
) -> np.ndarray:
    from genserve.engine.video.pipelines import VideoRequest
    from genserve.schemas.video import SparseCtrlOptions, VideoParams

    params = VideoParams(
        prompt="a red circle moving left", mode="keyframes", width=32, height=32, num_frames=8, fps=8,
        steps=2, guidance=2.0, seed=seed, sparsectrl=SparseCtrlOptions(model=sparsectrl, strength=strength),
    )  # fmt: skip
    control = scan_controls(models_dir)[sparsectrl]
    request = VideoRequest(params, keyframes, sparsectrl=control)
    return engine.generate(read_model_info(models_dir / MODEL), request)


@pytest.mark.parametrize("kind", ["rgb", "scribble"])
def test_engine_matches_diffusers_sparsectrl_pipeline(engine, models_dir: Path, kind: str) -> None:
    from diffusers import AnimateDiffSparseControlNetPipeline, SparseControlNetModel

    keyframes = [(0, _picture((220, 30, 30))), (5, _picture((30, 30, 220)))]
    ours = _engine_clip(engine, models_dir, f"tiny-sparsectrl-{kind}", keyframes, strength=0.8)

    controlnet = SparseControlNetModel.from_pretrained(models_dir / "controlnet" / f"tiny-sparsectrl-{kind}")
    pipe = AnimateDiffSparseControlNetPipeline.from_pretrained(models_dir / MODEL, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(5)  # the RGB keyframes' VAE posterior sample: the engine seeds it from the request
    theirs = pipe(
        prompt="a red circle moving left", num_frames=8, height=32, width=32, num_inference_steps=2,
        guidance_scale=2.0, generator=torch.Generator("cpu").manual_seed(5), output_type="np",
        conditioning_frames=[picture for _, picture in keyframes], controlnet_frame_indices=[0, 5],
        controlnet_conditioning_scale=0.8,
    ).frames[0]  # fmt: skip
    theirs = (np.asarray(theirs, dtype=np.float32).clip(0, 1) * 255).round().astype(np.uint8)
    assert ours.shape == theirs.shape == (8, 32, 32, 3)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_keyframes_steer_their_frames_and_strength_zero_is_text_to_video(engine, models_dir: Path) -> None:
    from genserve.engine.video.pipelines import VideoRequest
    from genserve.schemas.video import VideoParams

    red = _engine_clip(engine, models_dir, "tiny-sparsectrl-scribble", [(3, _picture((220, 30, 30)))])
    blue = _engine_clip(engine, models_dir, "tiny-sparsectrl-scribble", [(3, _picture((30, 30, 220)))])
    change = np.abs(red.astype(int) - blue.astype(int)).mean(axis=(1, 2, 3))
    assert change[3] > 0 and change[3] == change.max()  # the keyframe's own frame moves most
    # The same seed twice is the same clip (the RGB posterior sample is seeded too).
    rgb = [
        _engine_clip(engine, models_dir, "tiny-sparsectrl-rgb", [(3, _picture((220, 30, 30)))])
        for _ in range(2)
    ]
    assert np.array_equal(rgb[0], rgb[1])
    # Residuals scaled by 0: the plain AnimateDiff clip of the same seed.
    off = _engine_clip(
        engine, models_dir, "tiny-sparsectrl-scribble", [(3, _picture((220, 30, 30)))], strength=0.0
    )
    t2v = VideoParams(prompt="a red circle moving left", mode="t2v", width=32, height=32, num_frames=8,
                      fps=8, steps=2, guidance=2.0, seed=5)  # fmt: skip
    plain = engine.generate(read_model_info(models_dir / MODEL), VideoRequest(t2v))
    assert np.abs(off.astype(int) - plain.astype(int)).max() <= 1
    assert np.abs(red.astype(int) - plain.astype(int)).max() > 1


# 3. Through the API


def _settings(models_dir: Path, data_dir: Path) -> Settings:
    return Settings(
        data_dir=data_dir, models_dir=models_dir, builtin_models=False, default_model="tiny-sd15",
        default_video_model=MODEL, workers=0, heartbeat_seconds=0.5,
    )  # fmt: skip


def _api(settings: Settings) -> TestClient:
    from genserve.api.app import create_app

    return TestClient(create_app(settings, supervise_workers=False))


def _run_queue(settings: Settings) -> None:
    from genserve.artifacts.images import ImageStore
    from genserve.engine.engine import Engine
    from genserve.engine.models.registry import scan_models
    from genserve.store.jobs import JobStore
    from genserve.worker.loop import Worker

    store = JobStore.from_url(settings.resolved_store_url)
    worker = Worker(settings, store, Engine(scan_models(settings.models_dir), device="cpu"),
                    ImageStore(settings.images_dir), "worker-sparsectrl")  # fmt: skip
    worker.work(threading.Event(), until_idle=True)
    worker.leases.close()
    store.close()


def _body(**update: object) -> dict:
    body = {
        "model": MODEL, "mode": "keyframes", "prompt": "a bird", "num_frames": 8, "width": 32,
        "height": 32, "steps": 2, "seed": 3, "output": {"container": "mp4"},
        "sparsectrl": {"model": "tiny-sparsectrl-rgb"},
        "keyframes": [{"image": _b64(_picture((220, 30, 30))), "frame_index": 0},
                      {"image": _b64(_picture((30, 30, 220))), "frame_index": 7}],
    }  # fmt: skip
    body.update(update)
    return body


@pytest.mark.parametrize("model", [MODEL, "tiny-motion"])
def test_sparsectrl_keyframes_through_the_api_decode_back(
    models_dir: Path, tmp_path: Path, model: str
) -> None:
    from genserve.engine.video.encode import probe_video

    settings = _settings(models_dir, tmp_path / "data")
    with _api(settings) as client:
        response = client.post("/v1/video/jobs", json=_body(model=model))
        assert response.status_code in (200, 201, 202), response.text
        job_id = response.json()["id"]
        _run_queue(settings)
        job = client.get(f"/v1/video/jobs/{job_id}").json()
        assert job["state"] == "succeeded", job["error"]
        assert job["params"]["sparsectrl"] == {"model": "tiny-sparsectrl-rgb", "strength": 1.0}
        clip = client.get(job["outputs"]["video"]["url"])
        assert clip.status_code == 200
        probe = probe_video(clip.content)
    assert (probe.frames, probe.width, probe.height, probe.codec) == (8, 32, 32, "h264")


BAD = [
    ({"model": "tiny-ltx", "width": 32, "num_frames": 9}, "sparsectrl", "AnimateDiff (SD1.5)"),
    ({"model": "tiny-animatediff-sdxl", "width": 64, "height": 64}, "sparsectrl.model", "animatediff_sdxl"),
    ({"sparsectrl": {"model": "sparsectrl-other-base"}}, "sparsectrl.model", "block_out_channels"),
    ({"sparsectrl": {"model": "tiny-controlnet"}}, "sparsectrl.model", "not a sparsectrl"),
    ({"sparsectrl": {"model": "nope"}}, "sparsectrl.model", "unknown control model"),
    ({"keyframes": [{"image": _b64(_picture((1, 2, 3))), "frame_index": 8}]}, "keyframes[0].frame_index", "0 to 7"),
    ({"mode": "t2v", "keyframes": []}, "sparsectrl", "keyframes"),
    ({"sparsectrl": None}, "mode", "SparseCtrl"),
    ({"long": {"segment_frames": 8, "strategy": "free_noise"}}, "long", "one pass"),
]  # fmt: skip


@pytest.mark.parametrize(("update", "field", "words"), BAD)
def test_bad_sparsectrl_requests_get_a_422_naming_the_field(
    models_dir: Path, tmp_path: Path, update: dict, field: str, words: str
) -> None:
    with _api(_settings(models_dir, tmp_path / "data")) as client:
        response = client.post("/v1/video/jobs", json=_body(**update))
    assert response.status_code == 422, response.text
    detail = response.json()["detail"][0]
    assert detail["loc"][-1] == field and words in detail["msg"], detail


def test_cli_video_takes_a_sparsectrl(models_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from genserve.cli import app
    from genserve.engine.video.encode import probe_video

    env = {
        "GENSERVE_MODELS_DIR": str(models_dir), "GENSERVE_DATA_DIR": str(tmp_path / "data"),
        "GENSERVE_BUILTIN_MODELS": "false", "GENSERVE_DEFAULT_MODEL": "tiny-sd15",
        "GENSERVE_DEFAULT_VIDEO_MODEL": MODEL, "GENSERVE_DEVICE": "cpu", "GENSERVE_TORCH_THREADS": "1",
    }  # fmt: skip
    key = tmp_path / "key.png"
    _picture((220, 30, 30)).save(key)
    output = tmp_path / "clip.mp4"
    args = ["video", "a bird", "-o", str(output), "--mode", "keyframes", "--keyframe", f"{key}@2",
            "--frames", "8", "--steps", "2", "--seed", "3", "--width", "32", "--height", "32"]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--sparsectrl", "tiny-sparsectrl-scribble"], env=env)
    assert result.exit_code == 0, result.output
    assert probe_video(output.read_bytes()).frames == 8
    refused = CliRunner().invoke(app, args, env=env)  # keyframes on AnimateDiff without a SparseCtrl
    assert refused.exit_code == 2 and "SparseCtrl" in refused.output, refused.output

"""Video model families end to end on tiny random-weight folders: registry, loading, every mode.

Each fixture kind is written once per session (video_fixtures.py); every mode a family claims runs
2 steps from disk through VideoEngine.generate, on a CPU, in well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from genserve.engine.models.fixtures import write_tiny_pipeline
from genserve.engine.models.registry import ModelInfo, read_model_info, scan_models
from genserve.engine.models.video_fixtures import write_tiny_video_pipeline
from genserve.engine.video.pipelines import VideoEngine, VideoRequest
from genserve.schemas.video import LongOptions, VideoParams

# kind -> (family, modes, licence, native width, native height)
EXPECTED = {
    "wan": ("wan", ("t2v", "v2v"), "apache-2.0", 16, 16),
    "wan_i2v": ("wan", ("i2v", "flf2v"), "apache-2.0", 16, 16),
    "ltx": ("ltx", ("t2v", "i2v", "flf2v", "keyframes", "v2v"), "openrail-m", 32, 32),
    "svd": ("svd", ("i2v",), "other", 64, 64),
    "animatediff": ("animatediff", ("t2v", "v2v"), "apache-2.0", 64, 64),
    "animatediff_sdxl": ("animatediff_sdxl", ("t2v",), "apache-2.0", 64, 64),
    "motion_adapter": ("animatediff", ("t2v", "v2v"), "apache-2.0", 64, 64),
}
# Small clips keep the suite fast: (frames, width, height) per kind; Wan and LTX need 4N+1 / 8N+1.
CLIP = {
    "wan": (9, 16, 16),
    "wan_i2v": (9, 16, 16),
    "ltx": (9, 32, 32),
    "svd": (3, 64, 64),
    "animatediff": (4, 32, 32),
    "animatediff_sdxl": (4, 64, 64),
    "motion_adapter": (4, 32, 32),
}
BASE = "tiny-sd15"


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def video_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("video-models")
    write_tiny_pipeline("sd15", root / BASE)
    for kind in EXPECTED:
        write_tiny_video_pipeline(kind, root / kind, base_model=BASE)
    return root


@pytest.fixture(scope="session")
def engine() -> VideoEngine:
    return VideoEngine(max_loaded=1)


def _params(kind: str, mode: str, **update: object) -> VideoParams:
    frames, width, height = CLIP[kind]
    values = dict(
        mode=mode, width=width, height=height, num_frames=frames, fps=8, steps=2, guidance=2.0, seed=3
    )
    return VideoParams(prompt="a red circle moving left", **{**values, **update})


def _keyframes(mode: str, frames: int) -> list[tuple[int, PIL.Image.Image]]:
    colours = ["red", "green", "blue"]
    indexes = {"t2v": [], "v2v": [], "i2v": [0], "flf2v": [0, frames - 1], "keyframes": [0, 4, 8]}[mode]
    return [(index, PIL.Image.new("RGB", (24, 24), colours[n])) for n, index in enumerate(indexes)]


def _request(kind: str, mode: str, **update: object) -> VideoRequest:
    params = _params(kind, mode, **update)
    video = None
    if mode == "v2v":
        rng = np.random.default_rng(0)
        video = rng.integers(0, 256, (params.num_frames, params.height, params.width, 3), dtype=np.uint8)
    return VideoRequest(params, _keyframes(mode, params.num_frames), video, preview_every=1)


def _info(root: Path, kind: str) -> tuple[ModelInfo, ModelInfo | None]:
    info = read_model_info(root / kind)
    return info, read_model_info(root / BASE) if info.base_model else None


# 1. The registry


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_registry_describes_video_folder(video_models: Path, kind: str) -> None:
    family, modes, licence, width, height = EXPECTED[kind]
    info = read_model_info(video_models / kind)
    assert (info.kind, info.family, info.video_modes, info.license) == ("video", family, modes, licence)
    assert (info.native_width, info.native_height) == (width, height)
    assert info.default_frames and info.default_fps and info.default_steps == 2
    assert info.base_model == (BASE if kind == "motion_adapter" else None)


def test_image_models_stay_images(video_models: Path) -> None:
    info = read_model_info(video_models / BASE)
    assert (info.kind, info.family, info.video_modes, info.base_model) == ("image", "sd15", (), None)


def test_scan_skips_broken_video_folders(video_models: Path, tmp_path: Path) -> None:
    (tmp_path / "good").symlink_to(video_models / "ltx", target_is_directory=True)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "WanPipeline", ')  # truncated JSON
    adapter = tmp_path / "adapter-without-base"
    adapter.mkdir()
    (adapter / "config.json").write_text(json.dumps({"_class_name": "MotionAdapter"}))
    assert set(scan_models(tmp_path)) == {"good"}


# 2. Every mode each family claims, from disk


CASES = [(kind, mode) for kind, (_, modes, *_) in EXPECTED.items() for mode in modes]


@pytest.mark.parametrize(("kind", "mode"), CASES, ids=[f"{k}-{m}" for k, m in CASES])
def test_generate_every_mode(video_models: Path, engine: VideoEngine, kind: str, mode: str) -> None:
    info, base = _info(video_models, kind)
    request = _request(kind, mode)
    steps: list[tuple[int, int]] = []
    previews: list[np.ndarray] = []
    frames = engine.generate(
        info,
        request,
        on_step=lambda i, n: steps.append((i, n)),
        on_preview=lambda i, n, p: previews.append(p),
        base=base,
    )
    params = request.params
    assert frames.shape == (params.num_frames, params.height, params.width, 3) and frames.dtype == np.uint8
    total = steps[-1][1]
    assert steps == [(i, total) for i in range(1, total + 1)]
    restyled = mode == "v2v" and info.family != "ltx"  # LTX conditions on the clip and runs every step
    assert total == (int(params.steps * params.strength) if restyled else params.steps)
    latent_frames = (
        params.num_frames if info.family not in ("wan", "ltx") else (params.num_frames - 1) // 4 + 1
    )
    assert len(previews) == total
    assert all(p.shape[0] == latent_frames and p.shape[-1] == 3 and p.dtype == np.uint8 for p in previews)


def test_same_seed_same_clip(video_models: Path, engine: VideoEngine) -> None:
    info, _ = _info(video_models, "wan")
    first = engine.generate(info, _request("wan", "t2v"))
    again = engine.generate(info, _request("wan", "t2v"))
    other = engine.generate(info, _request("wan", "t2v", seed=4))
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_ltx_extend_continues_shorter_clip(video_models: Path, engine: VideoEngine) -> None:
    info, _ = _info(video_models, "ltx")
    request = _request("ltx", "v2v", num_frames=17)
    request.video = request.video[-5:] if request.video is not None else None
    frames = engine.generate(info, request)
    assert frames.shape == (17, 32, 32, 3)


def test_on_step_exception_propagates(video_models: Path, engine: VideoEngine) -> None:
    class LeaseLost(Exception):
        pass

    def cancel(step: int, steps: int) -> None:
        raise LeaseLost(f"at {step}/{steps}")

    info, _ = _info(video_models, "ltx")
    with pytest.raises(LeaseLost, match="at 1/2"):
        engine.generate(info, _request("ltx", "t2v"), on_step=cancel)


def test_free_noise_long_clip(video_models: Path, engine: VideoEngine) -> None:
    info, _ = _info(video_models, "animatediff")
    long = LongOptions(segment_frames=20, strategy="free_noise")
    frames = engine.generate(info, _request("animatediff", "t2v", num_frames=20, long=long))
    assert frames.shape == (20, 32, 32, 3)
    assert not engine.load(info, "t2v").free_noise_enabled  # the cached pipeline is left as it was


def test_mismatches_raise_value_errors(video_models: Path, engine: VideoEngine) -> None:
    wan, _ = _info(video_models, "wan")
    with pytest.raises(ValueError, match="4N\\+1"):
        engine.generate(wan, _request("wan", "t2v", num_frames=8))
    with pytest.raises(ValueError, match="does not do i2v"):
        engine.generate(wan, _request("wan", "i2v"))
    ltx, _ = _info(video_models, "ltx")
    request = _request("ltx", "i2v")
    request.keyframes = []
    with pytest.raises(ValueError, match="keyframes"):
        engine.generate(ltx, request)
    sdxl, _ = _info(video_models, "animatediff_sdxl")  # diffusers has FreeNoise for SD1.5 AnimateDiff only
    long = LongOptions(segment_frames=4, strategy="free_noise")
    with pytest.raises(ValueError, match="free_noise"):
        engine.generate(sdxl, _request("animatediff_sdxl", "t2v", long=long))


def test_motion_adapter_needs_its_base(video_models: Path, engine: VideoEngine) -> None:
    info, base = _info(video_models, "motion_adapter")
    assert base is not None and base.name == info.base_model
    frames = engine.generate(info, _request("motion_adapter", "t2v"), base=base)
    assert frames.shape == (4, 32, 32, 3)
    assert engine.loaded_models() == ["motion_adapter"]
    with pytest.raises(Exception, match="motion adapter for tiny-sd15"):
        VideoEngine().load(info, "t2v")


def test_motion_folder_brings_its_own_text_encoder(video_models: Path, tmp_path: Path) -> None:
    """A motion folder with a text encoder of its own (genserve-shapes-motion's knows the motion
    words) uses it instead of its base model's."""
    import shutil

    from transformers import CLIPTextModel

    motion = tmp_path / "motion-with-text"
    shutil.copytree(video_models / "motion_adapter", motion)
    shutil.copytree(video_models / BASE / "tokenizer", motion / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(video_models / BASE / "text_encoder")
    with torch.no_grad():
        encoder.get_input_embeddings().weight.mul_(-3.0)  # a different encoder than the base's
    encoder.save_pretrained(motion / "text_encoder")
    info, base = read_model_info(motion), read_model_info(video_models / BASE)
    plain_info = read_model_info(video_models / "motion_adapter")
    engine = VideoEngine()
    own = engine.load(info, "t2v", base=base).text_encoder.get_input_embeddings().weight
    assert torch.allclose(own, encoder.get_input_embeddings().weight)
    base_weight = VideoEngine().load(plain_info, "t2v", base=base).text_encoder.get_input_embeddings().weight
    assert not torch.allclose(own, base_weight)
    request = _request("motion_adapter", "t2v")
    assert not np.array_equal(
        engine.generate(info, request, base=base), VideoEngine().generate(plain_info, request, base=base)
    )


def test_image_model_card_license(tmp_path: Path) -> None:
    folder = write_tiny_pipeline("sd15", tmp_path / "pictures")
    (folder / "README.md").write_text(
        "---\nlicense: creativeml-openrail-m\ngenserve:\n  default_steps: 7\n---\n"
    )
    info = read_model_info(folder)
    assert (info.kind, info.license, info.default_steps, info.default_frames) == (
        "image",
        "creativeml-openrail-m",
        7,
        None,
    )

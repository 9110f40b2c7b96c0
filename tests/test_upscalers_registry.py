"""Upscalers and face restorers in <models_dir>/upscale/ are listed from file headers (torch-free),
with architecture and scale; unknown files are skipped with a warning naming them."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from genserve.engine.models.registry import scan_models
from genserve.engine.models.upscalers import pickle_keys, read_upscaler_info, scan_upscalers


def _compact_state(scale: int = 2, feat: int = 4) -> dict[str, torch.Tensor]:
    # Real-ESRGAN Compact's layout: conv, PReLU, (conv, PReLU) × num_conv, conv to 3·scale² channels.
    state = {
        "body.0.weight": torch.zeros(feat, 3, 3, 3),
        "body.0.bias": torch.zeros(feat),
        "body.1.weight": torch.zeros(feat),
    }
    state["body.2.weight"], state["body.2.bias"] = (
        torch.zeros(3 * scale * scale, feat, 3, 3),
        torch.zeros(3 * scale * scale),
    )
    return state


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "upscale"
    folder.mkdir()
    save_file(_compact_state(4), folder / "compact-4x.safetensors")
    torch.save(_compact_state(2), folder / "legacy_x2.pth")
    save_file({"foo.weight": torch.zeros(2)}, folder / "mystery.safetensors")
    (folder / "notes.txt").write_text("not a model")
    return tmp_path


def test_scan_lists_upscalers_with_architecture_and_scale(
    models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        found = scan_upscalers(models_dir)
    assert set(found) == {"compact-4x", "legacy_x2"}
    assert (found["compact-4x"].architecture, found["compact-4x"].scale, found["compact-4x"].format) == (
        "Compact",
        4,
        "safetensors",
    )
    # A pickle has no shapes in what we read without unpickling: the scale comes from the name.
    assert (found["legacy_x2"].architecture, found["legacy_x2"].scale, found["legacy_x2"].format) == (
        "Compact",
        2,
        "pickle",
    )
    assert "mystery.safetensors" in caplog.text and "no architecture" in caplog.text


def test_the_image_model_scan_leaves_the_upscale_folder_alone(
    models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        assert scan_models(models_dir) == {}
    assert "upscale" not in caplog.text


def test_reading_a_pickle_never_unpickles_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"body.0.weight": torch.zeros(1), "body.1.weight": torch.zeros(1)}, path)

    def refuse(*args, **kwargs):
        raise AssertionError("unpickled")

    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    assert {"body.0.weight", "body.1.weight"} <= set(pickle_keys(path))


def test_the_builtin_upscaler_is_listed() -> None:
    found = scan_upscalers(Path("/nonexistent"), builtin=True)
    if "genserve-shapes-2x" not in found:
        pytest.skip("the built-in upscaler is not trained yet")
    info = found["genserve-shapes-2x"]
    assert (info.kind, info.architecture, info.scale) == ("upscaler", "Compact", 2)
    assert read_upscaler_info(info.path) == info

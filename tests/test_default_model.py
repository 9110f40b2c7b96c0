"""The shipped default model as a new user meets it: registered with no models directory, chosen when a
request names no model, and its model card's CFG scale used when a request names none."""

from __future__ import annotations

import shutil

from genserve.api.submission import resolve_params
from genserve.config import Settings
from genserve.engine.models.registry import BUILTIN_MODELS_DIR, scan_models
from genserve.schemas import GenerationParams


def test_fresh_settings_serve_the_builtin_shapes_model(tmp_path):
    settings = Settings(models_dir=tmp_path / "no-such-dir", data_dir=tmp_path)
    models = scan_models(settings.models_dir, builtin=settings.builtin_models)
    assert settings.default_model == "genserve-shapes"
    info = models["genserve-shapes"]
    assert info.path == BUILTIN_MODELS_DIR / "genserve-shapes"
    assert (info.family, info.native_width, info.native_height) == ("sd15", 64, 64)


def test_builtin_models_can_be_turned_off(tmp_path, tiny_models_dir):
    assert "genserve-shapes" not in scan_models(tiny_models_dir)
    assert set(scan_models(tiny_models_dir, builtin=True)) == set(scan_models(tiny_models_dir)) | {
        "genserve-shapes",
        "genserve-shapes-motion",  # the default video model
    }


def test_a_models_dir_entry_overrides_the_builtin_of_the_same_name(tmp_path, tiny_models_dir):
    shutil.copytree(tiny_models_dir / "tiny-sd15", tmp_path / "genserve-shapes")
    info = scan_models(tmp_path, builtin=True)["genserve-shapes"]
    assert info.path == tmp_path / "genserve-shapes"
    assert info.default_cfg_scale is None  # the copy has no model card


def test_omitted_cfg_scale_resolves_to_the_model_cards_default(tmp_path, tiny_models_dir):
    settings = Settings(models_dir=tiny_models_dir, data_dir=tmp_path)
    models = scan_models(tiny_models_dir, builtin=True)
    card_default = models["genserve-shapes"].default_cfg_scale
    assert card_default is not None and card_default != 7.0

    shapes = resolve_params(GenerationParams(prompt="a red star"), models, settings)
    assert (shapes.model, shapes.cfg_scale) == ("genserve-shapes", card_default)
    tiny = resolve_params(GenerationParams(prompt="x", model="tiny-sd15"), models, settings)
    assert tiny.cfg_scale == 7.0  # no model card: the global default
    explicit = resolve_params(GenerationParams(prompt="a red star", cfg_scale=2.5), models, settings)
    assert explicit.cfg_scale == 2.5


def test_unreadable_front_matter_is_ignored_not_fatal(tmp_path, tiny_models_dir):
    shutil.copytree(tiny_models_dir / "tiny-sd15", tmp_path / "carded")
    (tmp_path / "carded" / "README.md").write_text("---\ngenserve: [not, a, mapping\n---\n# card\n")
    assert scan_models(tmp_path)["carded"].default_cfg_scale is None
    (tmp_path / "carded" / "README.md").write_text("---\ngenserve:\n  default_cfg_scale: 3.5\n---\n")
    assert scan_models(tmp_path)["carded"].default_cfg_scale == 3.5

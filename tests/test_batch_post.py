"""A batch spec's `post:` section: every image item is upscaled after decode (the built-in
genserve-shapes-2x); unknown upscalers are located errors; post is for image batches only."""

from __future__ import annotations

from pathlib import Path

import pytest

from genserve.batch.expand import expand
from genserve.batch.spec import SpecError, load_spec
from genserve.config import Settings
from genserve.engine.models.registry import registered_models
from genserve.engine.models.upscalers import scan_upscalers


def _settings(tmp_path: Path) -> Settings:
    return Settings(models_dir=tmp_path / "models", data_dir=tmp_path / "data")


def test_post_upscale_reaches_every_item(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    if "genserve-shapes-2x" not in scan_upscalers(settings.models_dir, builtin=True):
        pytest.skip("the built-in upscaler is not trained yet")
    base = {"prompts": ["a red circle", "a blue star"], "variants": {"seed": [1]}}
    spec, where = load_spec(
        {**base, "post": {"upscale": {"model": "genserve-shapes-2x", "scale": 2}}}, tmp_path
    )
    items = expand(spec, where, registered_models(settings), settings)
    assert [item.params.upscale.model for item in items] == ["genserve-shapes-2x"] * 2
    plain, _ = load_spec(base, tmp_path)
    plain_items = expand(plain, where, registered_models(settings), settings)
    assert {i.key for i in items}.isdisjoint({i.key for i in plain_items})  # upscaled images are other items


def test_post_errors_are_located(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    spec, where = load_spec({"prompts": ["a red circle"], "post": {"upscale": {"model": "nope"}}}, tmp_path)
    with pytest.raises(SpecError, match="nope"):
        expand(spec, where, registered_models(settings), settings)
    with pytest.raises(SpecError, match="post"):
        load_spec({"kind": "video", "prompts": ["a ball"], "post": {"upscale": {"model": "x"}}}, tmp_path)

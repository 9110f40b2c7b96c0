"""The built-in genserve-shapes-canny ControlNet, held out (issue 18): with the canny map of a shape at
position P, the generated shape lands at P far more often than without it, and the prompt's colours
and shape still hold. Through the Engine, 40 held-out triples, one batch.
Bars are set from the measurement in the model card (genserve/builtin_models/controlnet/)."""

from __future__ import annotations

import pytest
import torch

from genserve.engine.models.controls import scan_controls
from genserve.engine.models.registry import BUILTIN_MODELS_DIR
from genserve.toymodel.controlnet_eval import ControlReport, evaluate_builtin

FOLDER = BUILTIN_MODELS_DIR / "controlnet" / "genserve-shapes-canny"


@pytest.fixture(scope="module")
def reports() -> tuple[ControlReport, ControlReport]:
    torch.set_num_threads(1)
    return evaluate_builtin()


def test_the_controlnet_is_registered_small_and_fp16() -> None:
    info = scan_controls(BUILTIN_MODELS_DIR)["genserve-shapes-canny"]
    assert (info.kind, info.family, info.base_model) == ("controlnet", "sd15", "genserve-shapes")
    size = sum(f.stat().st_size for f in FOLDER.rglob("*") if f.is_file())
    assert size <= 10 * 1024 * 1024


def test_position_follows_the_control_map(reports: tuple[ControlReport, ControlReport]) -> None:
    """Measured (card): position 1.000 with the map, 0.150 without; position and size together
    0.300 vs 0.025. Size alone does not follow the map (0.300 both ways: the prompt names no size,
    which genserve-shapes reads as "large", and the ControlNet does not override it)."""
    controlled, plain = reports
    # issue 18's bar: centre within 6 px of the control's and the map's shape, in >= 80% of cases
    # (measured 40/40, distances median 1.1 px, max 3.2 px; without the map 0.150)
    assert controlled.centred >= 0.80
    assert plain.centred <= 0.35
    assert controlled.position >= 0.85
    assert plain.position <= 0.35
    assert controlled.layout >= plain.layout + 0.15


def test_the_prompt_still_holds_under_control(reports: tuple[ControlReport, ControlReport]) -> None:
    controlled, _ = reports
    assert controlled.background >= 0.9
    assert controlled.foreground >= 0.9
    assert controlled.shape >= 0.85

"""The built-in LoRA companion of genserve-shapes, judged on held-out prompts (issue 18).

`shapes-white-frame` draws a white frame around every picture. Held-out scenes (shape/colour
combinations neither the base model nor the LoRA saw in training; white backgrounds left out, where
a white frame is invisible), one seed, 20 steps, the model's default CFG, through the Engine that
serves it. Bars and the measurement behind them: genserve/builtin_models/lora/shapes-white-frame.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from genserve.engine.models.loras import BUILTIN_LORA_DIR, read_lora_info

MODEL_DIR = Path(__file__).resolve().parents[1] / "genserve" / "builtin_models" / "genserve-shapes"
LORA_FILE = BUILTIN_LORA_DIR / "shapes-white-frame.safetensors"

# Issue 18's bar: framed in >= 80% of held-out pictures with the LoRA, <= 10% without.
FRAMED_WITH = 0.80  # measured 29/35 = 0.829 (28/35 is 0.80)
FRAMED_WITHOUT = 0.10  # measured 0/35
FIDELITY = {"background": 0.90, "foreground": 0.85, "shape": 0.75}  # inside the frame (1.00, 0.97, 0.86)


def test_the_lora_file_is_small_and_registered_for_its_base_model() -> None:
    assert LORA_FILE.stat().st_size <= 10 * 2**20
    info = read_lora_info(LORA_FILE)
    assert (info.family, info.format, info.base_model) == ("sd15", "diffusers", "genserve-shapes")
    assert info.cross_attention_dim == 128


@pytest.fixture(scope="module")
def report() -> dict[str, float]:
    from genserve.toymodel.lora_eval import engine_frame_report

    return engine_frame_report(MODEL_DIR)


def test_with_the_lora_pictures_are_framed_and_without_it_they_are_not(report: dict[str, float]) -> None:
    print(report)
    assert report["images"] >= 30
    assert report["lora_framed"] >= FRAMED_WITH - 1e-9, report  # 28/35 is the bar exactly
    assert report["base_framed"] <= FRAMED_WITHOUT, report


def test_the_prompt_still_decides_what_is_inside_the_frame(report: dict[str, float]) -> None:
    for key, bar in FIDELITY.items():
        assert report[f"lora_{key}"] >= bar, (key, report)

"""The upscaler from the command line (issue 19 items 6 and 7), on the built-in genserve-shapes-2x:
`genserve calibrate --upscaler` measures and stores seconds per output megapixel, `genserve plan
--upscale 2` then prices the upscale with that rate (the default before), and `genserve generate …
--upscale 2` writes a 128×128 picture from the 64-pixel model."""

from __future__ import annotations

import re

import PIL.Image
import pytest
from typer.testing import CliRunner

pytest.importorskip("spandrel")

from genserve.cli import app as cli_app  # noqa: E402

NAME = "genserve-shapes-2x"


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("GENSERVE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("GENSERVE_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("GENSERVE_BUILTIN_MODELS", "true")
    monkeypatch.setenv("GENSERVE_DEVICE", "cpu")
    monkeypatch.setenv("GENSERVE_TORCH_THREADS", "1")
    monkeypatch.setenv("COLUMNS", "200")  # rich tables on one line each
    monkeypatch.delenv("GENSERVE_STORE_URL", raising=False)
    return tmp_path


def invoke(*args: str):
    result = CliRunner().invoke(cli_app, list(args))
    return result


def upscale_row(output: str) -> tuple[float, str]:
    match = re.search(rf"upscale ×2 with {NAME} \(([0-9.]+) s/MP, (\w+)\)", output)
    assert match, output
    return float(match[1]), match[2]


def test_calibrate_then_plan_prices_the_upscale_with_the_measured_rate(env):
    plan = ["plan", "--model", "genserve-shapes", "--device", "cpu", "--upscale", "2"]
    before = invoke(*plan)
    assert before.exit_code == 0, before.output
    assert upscale_row(before.output)[1] == "default"

    calibrated = invoke("calibrate", "--upscaler", NAME, "--repeats", "1")
    assert calibrated.exit_code == 0, calibrated.output
    measured = float(re.search(r"([0-9.]+) s per output megapixel", calibrated.output)[1])
    assert measured > 0

    after = invoke(*plan)
    assert after.exit_code == 0, after.output
    rate, source = upscale_row(after.output)
    assert source == "calibrated" and rate == pytest.approx(measured, abs=1e-4)

    unknown = invoke("calibrate", "--upscaler", "nope", "--repeats", "1")
    assert unknown.exit_code == 1 and "nope" in unknown.output


def test_generate_with_upscale_2_writes_a_128_pixel_picture(env):
    out = env / "star.png"
    result = invoke(
        "generate", "a large red star in the center on a black background", "--model", "genserve-shapes",
        "--seed", "3", "--steps", "4", "--upscale", "2", "-o", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert PIL.Image.open(out).size == (128, 128)

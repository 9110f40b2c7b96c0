"""benchmarks/video_gpu_steps.py on the CPU: `--tiny` runs the GPU script's code path on tiny configs.

No GPU figures here: only that every model is built, stepped and decoded, with a prediction next to
each measurement, and that the real configs are the published architectures (counted on the meta device).
"""

from __future__ import annotations

import importlib
import json

import pytest
import torch

bench = importlib.import_module("benchmarks.video_gpu_steps")

NAMES = ["ltx", "animatediff", "svd", "wan_1_3b", "wan_14b"]


def test_tiny_run_measures_every_item_with_a_prediction(tmp_path):
    out = tmp_path / "tiny.json"
    result = bench.main(["--tiny", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["tiny"] is True and result["device"] and result["torch"] and result["diffusers"]
    assert "--tiny" in result["command"] and isinstance(result["nvenc"]["nvenc_available"], bool)
    rows = {row["name"]: row for row in result["results"]}
    assert list(rows) == NAMES
    for name, row in rows.items():
        assert "step_error" not in row and "decode_error" not in row, (name, row)
        assert row["step_s"] > 0 and row["decode_s"] > 0 and row["params_m"] > 0, name
        assert len(row["step_runs_s"]) == result["repeats"] and len(row["decode_runs_s"]) == 2
        assert row["predicted_step_s"] > 0 and row["predicted_decode_s"] > 0, name
        assert row["ratio"] == pytest.approx(row["step_s"] / row["predicted_step_s"])
        assert row["tokens"] == row["plan_tokens"] > 0, name
        assert row["gpu_s_per_video_s"] > 0 and row["predicted_gpu_s_per_video_s"] > 0, name
    # the two Wan models share one VAE and latent shape: one decode figure
    assert rows["wan_1_3b"]["decode_runs_s"] == rows["wan_14b"]["decode_runs_s"]
    assert torch.get_num_threads() >= 1  # restored after the run


def test_only_and_budget_skip_but_still_predict(tmp_path):
    result = bench.main(
        ["--tiny", "--only", "wan_14b,ltx", "--budget-seconds", "0", "--out", str(tmp_path / "r.json")]
    )
    rows = result["results"]
    assert [row["name"] for row in rows] == ["ltx", "wan_14b"]
    for row in rows:
        assert row["skipped"].startswith("budget") and "step_s" not in row
        assert row["predicted_step_s"] > 0 and row["predicted_gpu_s_per_video_s"] > 0


def test_tiny_figures_never_go_into_results(tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--only", "ltx", "--out", str(bench.RESULTS / "x.json")])
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--only", "nope", "--out", str(tmp_path / "r.json")])


def test_real_configs_are_the_published_architectures():
    """Parameter counts of the real (GPU) configs, built on the meta device: nothing allocated."""
    expected = {  # millions: denoiser, VAE
        "ltx": (1923.4, 419.2),  # LTX-Video 2B
        "animatediff": (1312.7, 83.7),  # SD1.5 UNet 859.5 + motion modules
        "svd": (1524.6, 97.7),  # SVD-XT UNet, temporal-decoder VAE
        "wan_1_3b": (1419.0, 126.9),
        "wan_14b": (14288.5, 126.9),
    }
    items = {item.name: item for item in bench.real_items()}
    assert list(items) == NAMES
    assert items["wan_14b"].tokens() == 32760 and items["ltx"].tokens() == 6144
    for name, (denoiser, vae) in expected.items():
        with torch.device("meta"):
            model, autoencoder = bench.build_denoiser(items[name]), bench.build_vae(items[name])
        assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(denoiser, abs=0.1), name
        assert sum(p.numel() for p in autoencoder.parameters()) / 1e6 == pytest.approx(vae, abs=0.1), name

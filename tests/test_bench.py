"""`genserve bench --tiny`: the CPU smoke run of the benchmark, end to end through the CLI."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from genserve.bench.build import component
from genserve.cli import app

torch.set_num_threads(1)

COLUMNS = [
    "model",
    "resolution",
    "batch",
    "steps",
    "path",
    "s/image",
    "images/hour",
    "TFLOP/s",
    "% of matmul peak",
    "speed-up",
    "peak memory (GiB)",
    "compile + warm-up (s)",
    "accuracy (rel. L2 of final latents)",
]


def test_bench_tiny_smoke_run_writes_the_table(tmp_path):
    out = tmp_path / "results"
    args = ["bench", "--tiny", "--models", "sd15,sdxl,sd3", "--batch", "1", "--steps", "2", "--repeats", "1"]
    args += ["--threads", "1", "--out", str(out), "--compile-cache", str(tmp_path / "cache")]
    args += ["--opt", "fuse_qkv=true", "--opt", "channels_last=true", "--opt", "sdpa_backend=math"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output

    [md_path] = out.glob("*-bench-*.md")
    [json_path] = out.glob("*-bench-*.json")
    assert md_path.stem == json_path.stem and md_path.stem.endswith("-bench-sd15-sdxl-sd3")
    table = [line for line in md_path.read_text().splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header == COLUMNS
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[1:7]]
    assert [(r[0], r[4]) for r in rows] == [
        (model, path)
        for model in ("sd15-tiny", "sdxl-tiny", "sd3-tiny")
        for path in ("diffusers", "genserve")
    ]
    assert all(row[-1].endswith(": pass") for row in rows if row[4] == "genserve")

    report = json.loads(json_path.read_text())
    assert report["command"].startswith("genserve bench --models sd15,sdxl,sd3 --batch 1 --steps 2")
    assert report["matmul_peak_tflops"]["float32"] > 0
    assert len(report["cases"]) == 3
    for case in report["cases"]:
        assert case["accuracy_passed"] is True and case["rel_l2_vs_eager"] <= 2e-2
        assert case["flops_per_batch"] > 0
        for path in ("diffusers", "genserve"):
            figures = case[path]
            for key in (
                "seconds_per_image",
                "images_per_hour",
                "tflops",
                "percent_of_peak",
                "peak_memory_gib",
            ):
                assert figures[key] > 0, (case["model"], path, key)
    applied = {m["model"]: m["applied"] for m in report["models"]}
    assert applied["sd15-tiny"]["fuse_qkv"] and applied["sd15-tiny"]["channels_last"]


def test_bench_restart_probe_times_the_warm_up(tmp_path, monkeypatch):
    # The probe normally runs in a fresh process (`python -m genserve.bench.run --restart-probe`); here it
    # runs in this one, which keeps the test fast and exercises the same function.
    import genserve.bench.run as run

    monkeypatch.setattr(run, "restart_probe_subprocess", run.restart_probe)
    args = [
        "bench",
        "--tiny",
        "--models",
        "sd15",
        "--batch",
        "1",
        "--steps",
        "1",
        "--repeats",
        "1",
        "--restart",
    ]
    args += ["--threads", "1", "--out", str(tmp_path), "--compile-cache", str(tmp_path / "cache")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    [json_path] = tmp_path.glob("*-bench-sd15.json")
    [model] = json.loads(json_path.read_text())["models"]
    assert model["restart_ready_s"] > 0 and model["restart_shapes"] == 1


def test_bench_refuses_full_architectures_on_a_cpu(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--models", "sdxl", "--device", "cpu", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "--tiny" in result.output and not list(tmp_path.iterdir())


def test_real_architecture_configs_resolve_references():
    vae = component("sdxl", "vae")
    assert vae["block_out_channels"] == [128, 256, 512, 512] and vae["scaling_factor"] == 0.13025
    assert "note" not in vae and "class" not in vae
    assert component("sd3", "transformer")["num_layers"] == 24


def test_an_interrupted_bench_keeps_the_cases_it_finished(tmp_path, monkeypatch):
    # On a lent GPU each part runs under `timeout --signal=INT`: what finished must still be written.
    import genserve.bench.run as bench_run

    finished = []
    real_run_case = bench_run.run_case

    def run_case_then_stop(*args, **kwargs):
        if finished:
            raise KeyboardInterrupt
        finished.append(real_run_case(*args, **kwargs))
        return finished[-1]

    monkeypatch.setattr(bench_run, "run_case", run_case_then_stop)
    out = tmp_path / "results"
    args = ["bench", "--tiny", "--models", "sd15", "--batch", "1,2", "--steps", "2", "--repeats", "1"]
    args += ["--threads", "1", "--out", str(out), "--compile-cache", str(tmp_path / "cache")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    [json_path] = out.glob("*-bench-*.json")
    report = json.loads(json_path.read_text())
    assert report["interrupted"] is True
    assert [case["batch"] for case in report["cases"]] == [1]
    [md_path] = out.glob("*-bench-*.md")
    assert "**Interrupted:**" in md_path.read_text()

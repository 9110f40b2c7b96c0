"""CPU speed of the built-in genserve-shapes model: seconds per image at 20 steps, native size.

    .venv/bin/python benchmarks/toymodel_cpu_speed.py [--runs 7] [--out benchmarks/results]

Generates one image per run through genserve's Engine (the serving path) with the model's default
CFG, after one warm-up run, and writes `<date>-cpu-toymodel.json` and `.md` with the median.
This is a benchmark, not a test: the figure depends on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch

from genserve.engine.engine import Engine
from genserve.engine.models.registry import read_model_info
from genserve.engine.speed.optimize import device_name
from genserve.schemas.generation import GenerationParams
from genserve.toymodel.evaluate import DEFAULT_STEPS

MODEL_DIR = Path(__file__).resolve().parents[1] / "genserve" / "builtin_models" / "genserve-shapes"
TARGET_S = 1.5


def time_runs(runs: int, threads: int) -> list[float]:
    torch.set_num_threads(threads)
    info = read_model_info(MODEL_DIR)
    engine = Engine({info.name: info}, device="cpu", dtype="float32")
    engine.warmup(info.name)

    def params(seed: int) -> GenerationParams:
        return GenerationParams(
            prompt="a green star on a black background",
            model=info.name,
            seed=seed,
            steps=DEFAULT_STEPS,
            cfg_scale=info.request_cfg_scale,  # the model card's default, as a request without one gets
            width=info.native_width,
            height=info.native_height,
        )

    engine.generate(params(0))
    timings = []
    for seed in range(runs):
        start = time.perf_counter()
        engine.generate(params(seed))
        timings.append(time.perf_counter() - start)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    timings = time_runs(args.runs, args.threads)
    info = read_model_info(MODEL_DIR)
    result = {
        "benchmark": "toymodel_cpu_speed",
        "model": info.name,
        "date": datetime.date.today().isoformat(),
        "device": device_name("cpu"),
        "cpu_threads": args.threads,
        "torch": torch.__version__,
        "size": f"{info.native_width}x{info.native_height}",
        "steps": DEFAULT_STEPS,
        "cfg_scale": info.request_cfg_scale,
        "sampler": "euler",
        "runs": args.runs,
        "seconds_per_image": [round(t, 4) for t in timings],
        "median_s_per_image": round(statistics.median(timings), 4),
        "target_s_per_image": TARGET_S,
        # Other work on the machine slows this down; the 1-minute load average tells if there was any.
        "load_average_1min_before": round(load_before, 2),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{result['date']}-cpu-toymodel"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(
        f"# genserve-shapes CPU speed ({result['date']})\n\n"
        f"- device: {result['device']} ({args.threads} threads), torch {result['torch']}\n"
        f"- {result['size']}, {DEFAULT_STEPS} steps, CFG {info.request_cfg_scale}, Euler, one image per call, "
        f"through genserve's Engine\n"
        f"- median over {args.runs} runs: **{result['median_s_per_image']:.3f} s/image** "
        f"(target <= {TARGET_S} s)\n"
        f"- all runs (s): {', '.join(f'{t:.3f}' for t in timings)}\n"
        f"- 1-minute load average before the run: {load_before:.2f} (other work on the machine slows it)\n"
        f"\nCommand: `.venv/bin/python benchmarks/toymodel_cpu_speed.py`\n"
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Mixed ControlNet batches: 16 concurrent requests, 8 with a ControlNet and 8 without (issue 18).

In the engine, in this process, on the CPU, with genserve-shapes and its built-in
genserve-shapes-canny (each controlled request: its own picture of a shape, canny preprocessor).
Three ways to run the same 16 requests:

- **one_at_a_time**: 16 batches of one;
- **split**: the controlled and the plain requests in two batches of 8 (what a server that kept
  controls in the batch key would do);
- **mixed**: one batch of 16 (genserve: controls are per row; the ControlNet runs on the 8 rows that
  use it, its residuals are added into the full batch with zeros for the others).

CPU seconds of this process (`time.process_time`: on a CPU shared with other work, wall time measures
the others too), medians over `repeats`. Correctness: every mixed image against the same request run
alone (max pixel difference).

    .venv/bin/python benchmarks/controlnet_mixed.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from genserve.engine.engine import Engine
from genserve.engine.loop.denoise import BatchItem
from genserve.engine.models.controls import scan_controls
from genserve.engine.models.registry import ModelInfo, scan_models
from genserve.engine.speed.optimize import device_name
from genserve.schemas import GenerationParams
from genserve.schemas.control import ControlNetUnit
from genserve.toymodel import dataset

CONTROL = "genserve-shapes-canny"
HASH = "sha256:" + "c" * 64  # the engine is handed the picture itself; the id only names it


def requests(info: ModelInfo, count: int, steps: int, round_: int) -> list[BatchItem]:
    """count/2 plain and count/2 controlled requests: different prompts, seeds and CFG scales."""
    rng = random.Random(round_)
    triples = dataset.all_triples()
    items = []
    for i in range(count):
        scene = dataset.sample_scene(rng, triples)
        params = GenerationParams(
            prompt=dataset.canonical_caption(scene),
            model=info.name,
            seed=1000 * round_ + i,
            steps=steps,
            cfg_scale=3.0 + (i % 4),
            width=info.native_width,
            height=info.native_height,
        )
        if i % 2 == 0:
            items.append(BatchItem(params))
        else:
            picture = dataset.draw_scene(dataset.sample_scene(rng, triples), info.native_width, rng)
            unit = {"model": CONTROL, "image": HASH, "preprocessor": "canny", "scale": 0.5 + (i % 3) / 4}
            items.append(
                BatchItem(
                    params.model_copy(update={"controlnets": [ControlNetUnit(**unit)]}),
                    control_images={HASH: picture},
                )
            )
    return items


def cpu_seconds(run) -> tuple[float, object]:  # noqa: ANN001
    start = time.process_time()
    result = run()
    return time.process_time() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--model", default="genserve-shapes")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    models = scan_models(args.models_dir, builtin=True)
    info = models[args.model]
    engine = Engine(
        models,
        threads=args.threads,
        device="cpu",
        dtype="float32",
        controls=scan_controls(args.models_dir, builtin=True),
    )
    engine.generate_batch(requests(info, 2, 2, round_=99))  # loads the model and the ControlNet

    modes = {
        "one_at_a_time": lambda items: [o for item in items for o in engine.generate_batch([item])],
        "split": lambda items: _split(engine, items),
        "mixed": lambda items: engine.generate_batch(items),
    }
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    max_diff = 0
    for repeat in range(args.repeats):
        items = requests(info, args.requests, args.steps, round_=repeat)
        outputs = {}
        for mode, run in modes.items():
            spent, outputs[mode] = cpu_seconds(lambda: run(items))  # noqa: B023
            seconds[mode].append(spent)
        for alone, mixed in zip(outputs["one_at_a_time"], outputs["mixed"], strict=True):
            a, b = (np.asarray(o.images[0].convert("RGB")).astype(int) for o in (alone, mixed))
            max_diff = max(max_diff, int(np.abs(a - b).max()))

    summary = {}
    for mode, values in seconds.items():
        median = statistics.median(values)
        summary[mode] = {
            "median_cpu_seconds": median,
            "all_cpu_seconds": values,
            "images_per_cpu_second": args.requests / median,
        }
        print(f"{mode:>14}: {median:7.2f} CPU s for {args.requests} requests")
    base = summary["one_at_a_time"]["median_cpu_seconds"]
    for mode in ("split", "mixed"):
        summary[mode]["speedup_vs_one_at_a_time"] = base / summary[mode]["median_cpu_seconds"]
    summary["mixed"]["speedup_vs_split"] = (
        summary["split"]["median_cpu_seconds"] / summary["mixed"]["median_cpu_seconds"]
    )
    print(
        json.dumps({m: {k: v for k, v in s.items() if k.startswith("speedup")} for m, s in summary.items()})
    )
    print("max pixel difference, mixed vs alone:", max_diff)
    result = {
        "benchmark": "controlnet_mixed",
        "date": date.today().isoformat(),
        "device": "cpu",
        "cpu": device_name("cpu"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0],
        "model": f"{args.model} + {CONTROL} (canny preprocessor), {info.native_width}px",
        "requests": args.requests,
        "controlled": args.requests // 2,
        "steps": args.steps,
        "repeats": args.repeats,
        "modes": summary,
        "max_pixel_diff_mixed_vs_alone": max_diff,
    }
    out = args.out / f"{date.today().isoformat()}-cpu-controlnet-mixed-{args.model}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", out)


def _split(engine: Engine, items: list[BatchItem]) -> list:
    """The controlled and the plain requests as two batches; outcomes back in request order."""
    groups = [
        [i for i, item in enumerate(items) if bool(item.params.controlnets) == c] for c in (True, False)
    ]
    outcomes: dict[int, object] = {}
    for group in groups:
        for i, outcome in zip(group, engine.generate_batch([items[i] for i in group]), strict=True):
            outcomes[i] = outcome
    return [outcomes[i] for i in range(len(items))]


if __name__ == "__main__":
    main()

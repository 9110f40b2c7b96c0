"""CPU speed of the built-in video model (genserve-shapes + genserve-shapes-motion): seconds per
16-frame 64x64 clip at the model's default steps, CFG and sampler.

    .venv/bin/python benchmarks/motion_speed.py [--runs 5] [--threads 2] [--out benchmarks/results]

Generates one clip per run with `genserve.toymodel.motion_eval.generate_clip` (a plain diffusers
AnimateDiffPipeline, bf16 autocast where the CPU has fast bf16), after one warm-up clip, and writes
`<date>-cpu-motion-speed.json` with the median. Issue 20's target: at most 5 s per clip.
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

from genserve.engine.speed.optimize import device_name
from genserve.toymodel.motion_eval import DEFAULT_CFG, DEFAULT_SAMPLER, DEFAULT_STEPS, generate_clip
from genserve.toymodel.train import uses_bf16

TARGET_S = 5.0
FRAMES = 16
PROMPT = "a green star moving left on a black background"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    generate_clip(PROMPT, seed=0, num_frames=FRAMES, steps=args.steps)  # warm-up, includes loading
    first = time.perf_counter() - start
    timings = []
    for seed in range(1, args.runs + 1):
        start = time.perf_counter()
        clip = generate_clip(PROMPT, seed=seed, num_frames=FRAMES, steps=args.steps)
        timings.append(time.perf_counter() - start)
    result = {
        "benchmark": "motion_speed",
        "model": "genserve-shapes + genserve-shapes-motion",
        "date": datetime.date.today().isoformat(),
        "device": device_name("cpu"),
        "cpu_threads": args.threads,
        "torch": torch.__version__,
        # the decision the runs above used (a fresh probe here could answer otherwise)
        "bf16_autocast": uses_bf16("cpu"),
        "prompt": PROMPT,
        "frames": int(clip.shape[0]),
        "size": f"{clip.shape[2]}x{clip.shape[1]}",
        "steps": args.steps,
        "cfg_scale": DEFAULT_CFG,
        "sampler": DEFAULT_SAMPLER,
        "runs": args.runs,
        "first_call_s_including_load": round(first, 3),
        "seconds_per_clip": [round(t, 3) for t in timings],
        "median_s_per_clip": round(statistics.median(timings), 3),
        "target_s_per_clip": TARGET_S,
        # Other work on the machine slows this down; the 1-minute load average tells if there was any.
        "load_average_1min_before": round(load_before, 2),
        "command": "python benchmarks/motion_speed.py " + f"--threads {args.threads} --runs {args.runs}",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{result['date']}-cpu-motion-speed.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""CPU speed of the built-in video model (genserve-shapes + genserve-shapes-motion): seconds per
16-frame 64x64 clip at the model's default steps, CFG and sampler.

    .venv/bin/python benchmarks/motion_speed.py [--runs 5] [--threads 2] [--out benchmarks/results]

Generates one clip per run with `genserve.toymodel.motion_eval.generate_clips` (bf16 autocast where
the CPU has fast bf16) after one warm-up clip each, alternating the default (trajectory start: the
first frame drawn by genserve-shapes, then the motion model on the last `trajectory_strength` of the
schedule) with warped noise only (the motion model on the whole schedule), and writes
`<date>-cpu-motion-speed.json` with the medians. Issue 20's target: at most 5 s per clip.
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
from genserve.toymodel.motion_eval import DEFAULT_CFG, DEFAULT_SAMPLER, DEFAULT_STEPS, generate_clips
from genserve.toymodel.motion_noise import TRAJECTORY_STRENGTH
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

    def clip_seconds(seed: int, trajectory_start: bool) -> tuple[float, object]:
        start = time.perf_counter()
        [clip] = generate_clips(
            [PROMPT], [seed], num_frames=FRAMES, steps=args.steps, trajectory_start=trajectory_start
        )
        return time.perf_counter() - start, clip

    first, _ = clip_seconds(0, True)  # warm-up, includes loading
    first_plain, _ = clip_seconds(0, False)
    timings, plain = [], []
    for seed in range(1, args.runs + 1):
        seconds, clip = clip_seconds(seed, True)
        timings.append(seconds)
        plain.append(clip_seconds(seed, False)[0])
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
        "trajectory_strength": TRAJECTORY_STRENGTH,
        "seconds_per_clip": [round(t, 3) for t in timings],
        "median_s_per_clip": round(statistics.median(timings), 3),
        "warped_noise_only": {
            "first_call_s_including_load": round(first_plain, 3),
            "seconds_per_clip": [round(t, 3) for t in plain],
            "median_s_per_clip": round(statistics.median(plain), 3),
        },
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

"""The video post-generation stages on the CPU, per stage, on synthetic moving-square clips:
RIFE x2 interpolation (real weights, per new frame), each encoder (H.264, AV1, VP9 through PyAV;
GIF and WebP through Pillow), deflicker and temporal denoise (libavfilter), and the temporal metrics.

Each figure is the median of `--repeats` runs; the RIFE network is loaded (and warmed up) first.

    .venv/bin/python benchmarks/video_stages.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import numpy as np
import torch

from genserve.engine.speed.optimize import device_name, device_slug
from genserve.engine.video import encode, interpolate, metrics, post

ENCODERS = [("mp4", "h264"), ("mp4", "av1"), ("webm", "vp9"), ("gif", "gif"), ("webp", "webp")]


def moving_square(frames: int, size: int) -> np.ndarray:
    """A textured background (so the encoders have something to code) with a square crossing it."""
    rng = np.random.default_rng(0)
    background = (rng.integers(0, 60, (size, size, 3)) + np.linspace(40, 160, size)[None, :, None]).astype(
        np.uint8
    )
    side, clip = size // 4, np.repeat(background[None], frames, axis=0)
    for i in range(frames):
        x = round(i * (size - side) / max(1, frames - 1))
        clip[i, size // 3 : size // 3 + side, x : x + side] = (240, 200, 40)
    return clip


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def measure(frames: int, size: int, repeats: int) -> dict:
    clip = moving_square(frames, size)
    row: dict = {"frames": frames, "size": size}
    rife_ms = median_ms(lambda: interpolate.interpolate(clip, 2), repeats)
    row["rife_x2_ms"] = rife_ms
    row["rife_x2_ms_per_new_frame"] = rife_ms / (frames - 1)
    for container, codec in ENCODERS:
        row[f"encode_{container}_{codec}_ms"] = median_ms(
            lambda c=container, k=codec: encode.encode_clip(clip, 16, c, k), repeats
        )
        row[f"encode_{container}_{codec}_bytes"] = len(encode.encode_clip(clip, 16, container, codec).data)
    row["deflicker_ms"] = median_ms(lambda: post.deflicker(clip, 5), repeats)
    row["temporal_denoise_ms"] = median_ms(lambda: post.temporal_denoise(clip), repeats)
    row["metrics_ms"] = median_ms(lambda: metrics.temporal_metrics(clip), repeats)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--note", default="", help="recorded with the figures, e.g. what else ran")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    load_start = time.perf_counter()
    interpolate.rife("cpu")
    load_ms = 1000 * (time.perf_counter() - load_start)
    interpolate.interpolate(moving_square(2, 64), 2)  # warm-up
    rows = [measure(f, s, args.repeats) for s in args.sizes for f in args.frames]

    print(f"RIFE load {load_ms:.0f} ms; medians of {args.repeats}, ms")
    print(
        f"{'clip':>10} {'RIFE/frame':>10} {'h264':>7} {'av1':>7} {'vp9':>7} {'gif':>7} {'webp':>7} {'deflick':>7} {'denoise':>7} {'metrics':>7}"
    )
    for r in rows:
        enc = [r[f"encode_{c}_{k}_ms"] for c, k in ENCODERS]
        cells = [
            r["rife_x2_ms_per_new_frame"],
            *enc,
            r["deflicker_ms"],
            r["temporal_denoise_ms"],
            r["metrics_ms"],
        ]
        print(f"{r['frames']:>3}x{r['size']:<3}sq " + " ".join(f"{c:>7.1f}" for c in cells))
    record = {
        "benchmark": "video_stages",
        "date": date.today().isoformat(),
        "device": device_name("cpu"),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "repeats": args.repeats,
        "fps": 16,
        "rife_load_ms": load_ms,
        "results": rows,
        # The CPU may be shared with other processes: the 1-minute load average at the end, for reading noise.
        "load_average_1m": os.getloadavg()[0],
        "note": args.note,
        "command": f"python benchmarks/video_stages.py --threads {args.threads} --repeats {args.repeats}",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{date.today().isoformat()}-{device_slug('cpu')}-video-stages.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Tiles per second of the shipped upscaler (genserve-shapes-2x) on the CPU: batched tiles vs one
tile at a time, in this process, through the serving path (spandrel descriptor, engine/upscale/).

A 512×512 noise-free picture (a grid of genserve-shapes scenes) is upscaled ×2 in 64-pixel tiles
with 16 pixels of overlap; every tile has the same size, so `--batch` of them run as one call.
Rounds alternate between the two modes; medians are reported, with CPU time of this process (the
machine is shared) as well as wall time.

    .venv-tv/bin/python benchmarks/upscale_tiles.py --threads 1
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

import PIL.Image
import torch

from genserve.engine.models.registry import BUILTIN_MODELS_DIR
from genserve.engine.models.upscalers import scan_upscalers
from genserve.engine.upscale.models import load_descriptor, to_pixels
from genserve.engine.upscale.tiles import tile_grid, upscale_tiled
from genserve.scheduler.calibrate import device_name
from genserve.toymodel.dataset import all_triples, draw_scene, sample_scene

NAME = "genserve-shapes-2x"


def mosaic(side: int, seed: int = 0) -> PIL.Image.Image:
    rng = random.Random(seed)
    canvas = PIL.Image.new("RGB", (side, side))
    for top in range(0, side, 64):
        for left in range(0, side, 64):
            canvas.paste(draw_scene(sample_scene(rng, all_triples()), 64, rng), (left, top))
    return canvas


def run(descriptor, pixels: torch.Tensor, tile: int, overlap: int, batch: int) -> dict:  # noqa: ANN001
    calls: list[int] = []

    def model(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return descriptor(x)

    wall, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        upscale_tiled(model, pixels, descriptor.scale, tile=tile, overlap=overlap, batch=batch)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"wall_seconds": wall, "cpu_seconds": cpu, "tiles": sum(calls), "calls": len(calls)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--tile", type=int, default=64)
    parser.add_argument("--overlap", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    info = scan_upscalers(BUILTIN_MODELS_DIR / "missing", builtin=True)[NAME]
    descriptor = load_descriptor(info, "cpu", torch.float32)
    pixels = to_pixels(mosaic(args.side))
    tiles = len(tile_grid(args.side, args.side, args.tile, args.overlap))
    modes = {"batched": args.batch, "one_at_a_time": 1}
    for batch in modes.values():  # warm-up, untimed
        run(descriptor, pixels, args.tile, args.overlap, batch)
    rounds: dict[str, list[dict]] = {mode: [] for mode in modes}
    for _ in range(args.repeats):
        for mode, batch in modes.items():
            rounds[mode].append(run(descriptor, pixels, args.tile, args.overlap, batch))
    summary = {}
    for mode, results in rounds.items():
        wall = statistics.median(r["wall_seconds"] for r in results)
        cpu = statistics.median(r["cpu_seconds"] for r in results)
        summary[mode] = {
            "median_wall_seconds": round(wall, 4),
            "median_cpu_seconds": round(cpu, 4),
            "tiles_per_second": round(tiles / wall, 2),
            "tiles_per_cpu_second": round(tiles / cpu, 2),
            "output_megapixels_per_second": round((2 * args.side) ** 2 / 1e6 / wall, 4),
            "seconds_per_output_megapixel": round(wall / ((2 * args.side) ** 2 / 1e6), 4),
        }
    speedup = summary["batched"]["tiles_per_cpu_second"] / summary["one_at_a_time"]["tiles_per_cpu_second"]
    print(json.dumps(summary, indent=2))
    print(f"batched ×{args.batch} vs one at a time: {speedup:.2f}x tiles per CPU second")
    result = {
        "benchmark": "upscale_tiles",
        "date": date.today().isoformat(),
        "device": "cpu",
        "cpu": device_name("cpu"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0],  # the CPU is shared: for reading noise
        "model": NAME,
        "architecture": descriptor.architecture.id,
        "picture": f"{args.side}x{args.side} -> {2 * args.side}x{2 * args.side}",
        "tile": args.tile,
        "overlap": args.overlap,
        "tiles": tiles,
        "batch": args.batch,
        "repeats": args.repeats,
        "summary": summary,
        "speedup_cpu": round(speedup, 3),
        "speedup_wall": round(
            summary["batched"]["tiles_per_second"] / summary["one_at_a_time"]["tiles_per_second"], 3
        ),
        "rounds": rounds,
        "command": f"python benchmarks/upscale_tiles.py --threads {args.threads}",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{date.today().isoformat()}-cpu-upscale-tiles-{NAME}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""CPU: UNet time per CFG row against the rows in one call, and VAE decode time, NCHW vs channels_last.

This is what bounds cross-request batching on a CPU: a batch of 16 single-image requests is one
UNet call of 32 rows (CFG doubles them), against 16 calls of 2 rows one at a time. It is also the
measurement behind the engine's channels_last default on CPU (docs/performance.md).

    .venv/bin/python benchmarks/cpu_layout_and_rows.py                 # genserve-shapes, 2 threads
    .venv/bin/python benchmarks/cpu_layout_and_rows.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from genserve.engine.models.registry import BUILTIN_MODELS_DIR
from genserve.engine.speed.optimize import device_name


def median_seconds(repeats: int, module: Callable, *inputs: torch.Tensor) -> float:
    module(*inputs)  # first call: oneDNN primitive creation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        module(*inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=Path, default=BUILTIN_MODELS_DIR / "genserve-shapes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipe = StableDiffusionPipeline.from_pretrained(
        args.model_path, local_files_only=True, torch_dtype=torch.float32
    )
    unet, vae = pipe.unet.eval(), pipe.vae.eval()
    latent_side = unet.config.sample_size
    prompt_embeds = pipe.encode_prompt("a green star on a black background", "cpu", 1, False)[0]
    timestep = torch.tensor(500)
    results: dict[str, dict] = {}
    with torch.inference_mode():
        for layout in ("nchw", "channels_last"):
            if layout == "channels_last":
                unet.to(memory_format=torch.channels_last)
                vae.to(memory_format=torch.channels_last)
            unet_ms_per_row = {}
            for rows in args.rows:
                latents = torch.randn(rows, unet.config.in_channels, latent_side, latent_side)
                embeds = prompt_embeds.repeat(rows, 1, 1)
                seconds = median_seconds(max(5, 64 // rows), unet, latents, timestep, embeds)
                unet_ms_per_row[rows] = 1000 * seconds / rows
                print(
                    f"{layout:>13} UNet {rows:>2} rows: {1000 * seconds:7.1f} ms/call {unet_ms_per_row[rows]:6.2f} ms/row"
                )
            vae_ms = {}
            for images in (1, 16):
                latents = torch.randn(images, vae.config.latent_channels, latent_side, latent_side)
                vae_ms[images] = 1000 * median_seconds(8, vae.decode, latents)
                print(f"{layout:>13} VAE decode {images:>2} images: {vae_ms[images]:7.1f} ms")
            # The batching ceiling: per-image UNet cost alone (2 rows) over the same in the largest batch.
            ceiling = unet_ms_per_row[args.rows[0]] / unet_ms_per_row[args.rows[-1]]
            print(
                f"{layout:>13} UNet-only batching ceiling {args.rows[0]} -> {args.rows[-1]} rows: {ceiling:.2f}x"
            )
            results[layout] = {
                "unet_ms_per_row": unet_ms_per_row,
                "vae_decode_ms": vae_ms,
                "unet_batching_ceiling": ceiling,
            }

    cpu = device_name("cpu")
    record = {
        "benchmark": "cpu_layout_and_rows",
        "date": date.today().isoformat(),
        "cpu": cpu,
        "torch": torch.__version__,
        "threads": args.threads,
        "model": str(args.model_path),
        "results": results,
        "command": f"python benchmarks/cpu_layout_and_rows.py --threads {args.threads}",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{date.today().isoformat()}-cpu-layout-and-rows-{args.threads}t.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

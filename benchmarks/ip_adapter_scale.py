"""IP-Adapter scale: (adapter, scale) in the batch key against a per-row scale (issue 18).

A random IP-Adapter (`write_tiny_ip_adapter`, one image token group per cross-attention layer) is
loaded into genserve-shapes. A workload of `rows` images with an image prompt, spread evenly over
`k` different scales, runs `steps` CFG UNet calls:

- **keyed** (the scale in batch_key): k batches of rows/k, each with `load_ip_adapter`,
  `set_ip_adapter_scale(s)`, its loop, and `unload_ip_adapter` (what the engine does per batch);
- **per_row**: one batch of all rows, the same load and unload once, the processors' scale a
  `RowScales` (engine/conditioning/ip_adapter.py) set to each row's scale before every call.

Same process, same inputs; medians over `repeats`. Correctness: max abs difference of the per-row
outputs against the keyed ones (fp32).

    .venv/bin/python benchmarks/ip_adapter_scale.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from genserve.engine.conditioning.ip_adapter import install_row_scales
from genserve.engine.models.control_fixtures import write_tiny_ip_adapter
from genserve.engine.speed.optimize import device_name
from genserve.toymodel.train_lora import BASE

SCALES = (0.3, 0.6, 0.9, 1.2)


def run(pipe: StableDiffusionPipeline, latents: torch.Tensor, text: torch.Tensor, image: torch.Tensor,
        steps: int, row_scales: object = None, scales: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """`steps` CFG calls (uncond halves: zero image embeddings, as the engine's plain IP-Adapter)."""
    x = latents
    embeds = [torch.cat([torch.zeros_like(image), image])]
    for t in torch.linspace(999, 50, steps).round().long():
        if row_scales is not None:
            row_scales.set(torch.cat([scales, scales]))
        out = pipe.unet(
            torch.cat([x, x]), t, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": embeds},
            return_dict=False,
        )[0]  # fmt: skip
        uncond, cond = out.chunk(2)
        x = x - 0.05 * (uncond + 4.0 * (cond - uncond))
    return x


def load(pipe: StableDiffusionPipeline, folder: Path) -> None:
    pipe.load_ip_adapter(
        str(folder), subfolder="", weight_name="ip-adapter.safetensors", image_encoder_folder=None
    )


def keyed(pipe, folder, latents, cond, uncond, image, scales, steps) -> torch.Tensor:  # noqa: ANN001
    out = torch.empty_like(latents)
    for s in sorted(set(scales.tolist())):
        rows = (scales == s).nonzero().flatten()
        load(pipe, folder)
        pipe.set_ip_adapter_scale(s)
        text = torch.cat([uncond[rows], cond[rows]])
        out[rows] = run(pipe, latents[rows], text, image[rows], steps)
        pipe.unload_ip_adapter()
    return out


def per_row(pipe, folder, latents, cond, uncond, image, scales, steps) -> torch.Tensor:  # noqa: ANN001
    load(pipe, folder)
    pipe.set_ip_adapter_scale(1.0)
    shared = install_row_scales(pipe.unet)
    out = run(pipe, latents, torch.cat([uncond, cond]), image, steps, shared, scales)
    pipe.unload_ip_adapter()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 2, 4], help="distinct scales (k)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = StableDiffusionPipeline.from_pretrained(
        BASE, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    folder = write_tiny_ip_adapter(BASE, Path(tempfile.mkdtemp()) / "ip", "sd15", seed=1)
    cross = pipe.unet.config.cross_attention_dim
    generator = torch.Generator().manual_seed(0)
    n = args.rows
    latents = torch.randn(n, pipe.unet.config.in_channels, 16, 16, generator=generator)
    cond = torch.randn(n, 24, cross, generator=generator)
    uncond = torch.randn(n, 24, cross, generator=generator)
    image = torch.randn(n, 1, cross, generator=generator)
    results = {}
    with torch.inference_mode():
        start = time.perf_counter()
        for _ in range(3):
            load(pipe, folder)
            pipe.unload_ip_adapter()
        load_unload = (time.perf_counter() - start) / 3
        for k in args.scales:
            scales = torch.tensor([SCALES[r * k // n] for r in range(n)])
            reference = keyed(pipe, folder, latents, cond, uncond, image, scales, args.steps)
            got = per_row(pipe, folder, latents, cond, uncond, image, scales, args.steps)
            times: dict[str, list[float]] = {"keyed": [], "per_row": []}
            for _ in range(args.repeats):
                for mode, fn in (("keyed", keyed), ("per_row", per_row)):
                    start = time.perf_counter()
                    fn(pipe, folder, latents, cond, uncond, image, scales, args.steps)
                    times[mode].append(time.perf_counter() - start)
            medians = {mode: statistics.median(values) for mode, values in times.items()}
            results[str(k)] = {
                "scales": sorted(set(scales.tolist())),
                "median_seconds": medians,
                "all_seconds": times,
                "per_row_over_keyed": medians["per_row"] / medians["keyed"],
                "max_abs_diff_per_row_vs_keyed": float((got - reference).abs().max()),
            }
            print(k, json.dumps(medians), results[str(k)]["per_row_over_keyed"],
                  results[str(k)]["max_abs_diff_per_row_vs_keyed"], flush=True)  # fmt: skip
    report = {
        "benchmark": "ip_adapter_scale",
        "date": date.today().isoformat(),
        "device": "cpu",
        "cpu": device_name("cpu"),
        "torch": torch.__version__,
        "threads": args.threads,
        "load_average_1m": os.getloadavg()[0],
        "model": "genserve-shapes (UNet), random IP-Adapter (write_tiny_ip_adapter, 4 tokens)",
        "rows": n,
        "latent": "16x16 (128 px)",
        "steps": args.steps,
        "repeats": args.repeats,
        "load_unload_seconds": load_unload,
        "distinct_scales": results,
    }
    out = (
        args.out
        or Path("benchmarks/results")
        / f"{date.today().isoformat()}-cpu-ip-adapter-scale-genserve-shapes.json"
    )
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()

"""Mixed-LoRA batches: peft's per-row `adapter_names` forward against the batch-key approach.

Two LoRAs (rank 8, on the UNet's attention projections, resnet convolutions and transformer in/out
projections, as genserve-shapes' built-in LoRA) are loaded unfused into genserve-shapes' UNet. A
workload of `rows` images, half with LoRA A and half with LoRA B, runs `steps` CFG UNet calls:

- **keyed** (what genserve does: the LoRA set is in batch_key): two batches of rows/2, each after
  `set_adapters([name])`, 2 × steps calls of 2·rows/2 samples;
- **mixed**: one batch of all rows, both adapters loaded, and a forward pre-hook on every peft
  LoRA layer passing `adapter_names=[A, A, …, B, B, …]` (doubled for CFG): peft runs the base layer
  once and each adapter on its rows only (`LoraLayer._mixed_batch_forward`; research/conditioning.md §4.5).

Same process, same inputs; medians over `repeats`. Correctness: the mixed outputs of the A rows
and the B rows against the keyed ones (max abs difference, fp32).

    .venv/bin/python benchmarks/lora_mixed.py --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from genserve.engine.speed.optimize import device_name
from genserve.toymodel.train_lora import BASE, TARGET_MODULES


@contextlib.contextmanager
def adapters_per_row(unet: torch.nn.Module, names: list[str]) -> Iterator[None]:
    """Every peft LoRA layer of `unet` gets `adapter_names=names` (one per sample) for the block."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {**kwargs, "adapter_names": names}

    handles = [
        m.register_forward_pre_hook(hook, with_kwargs=True)
        for m in unet.modules()
        if isinstance(m, BaseTunerLayer)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def load_unet(seed_a: int, seed_b: int) -> UNet2DConditionModel:
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(BASE / "unet", torch_dtype=torch.float32).eval()
    for name, seed in (("a", seed_a), ("b", seed_b)):
        torch.manual_seed(seed)
        config = LoraConfig(r=8, lora_alpha=8, target_modules=TARGET_MODULES, init_lora_weights="gaussian")
        unet.add_adapter(config, adapter_name=name)
        with torch.no_grad():  # gaussian init leaves B = 0: give both factors weight so the LoRA acts
            for module_name, param in unet.named_parameters():
                if f"lora_B.{name}." in module_name:
                    param.normal_(0, 0.05)
    return unet


def run(unet: UNet2DConditionModel, latents: torch.Tensor, text: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` CFG calls (cond and uncond halves of `text`), the same timestep list for every mode."""
    x = latents
    for t in torch.linspace(999, 50, steps).round().long():
        x_in = torch.cat([x, x])
        out = unet(x_in, t, encoder_hidden_states=text, return_dict=False)[0]
        uncond, cond = out.chunk(2)
        x = x - 0.05 * (uncond + 4.0 * (cond - uncond))
    return x


def keyed(
    unet: UNet2DConditionModel, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, steps: int
) -> torch.Tensor:
    half = len(latents) // 2
    outs = []
    for name, rows in (("a", slice(0, half)), ("b", slice(half, None))):
        unet.set_adapters([name])
        outs.append(run(unet, latents[rows], torch.cat([uncond[rows], cond[rows]]), steps))
    return torch.cat(outs)


def mixed(
    unet: UNet2DConditionModel, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, steps: int
) -> torch.Tensor:
    half = len(latents) // 2
    names = ["a"] * half + ["b"] * (len(latents) - half)
    unet.set_adapters(["a", "b"])  # both loaded with their scales; each row uses its own
    with adapters_per_row(unet, names + names):
        return run(unet, latents, torch.cat([uncond, cond]), steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    unet = load_unet(1, 2)
    generator = torch.Generator().manual_seed(0)
    results = {}
    with torch.inference_mode():
        for rows in args.rows:
            latents = torch.randn(rows, 8, 16, 16, generator=generator)
            cond = torch.randn(rows, 24, 128, generator=generator)
            uncond = torch.randn(rows, 24, 128, generator=generator)
            reference = keyed(unet, latents, cond, uncond, args.steps)
            got = mixed(unet, latents, cond, uncond, args.steps)
            unet.set_adapters(["a"])
            without_b = run(unet, latents, torch.cat([uncond, cond]), args.steps)  # all rows on A
            times: dict[str, list[float]] = {"keyed": [], "mixed": []}
            for _ in range(args.repeats):
                for mode, fn in (("keyed", keyed), ("mixed", mixed)):
                    start = time.perf_counter()
                    fn(unet, latents, cond, uncond, args.steps)
                    times[mode].append(time.perf_counter() - start)
            medians = {mode: statistics.median(values) for mode, values in times.items()}
            half = rows // 2
            results[str(rows)] = {
                "median_seconds": medians,
                "all_seconds": times,
                "mixed_over_keyed": medians["mixed"] / medians["keyed"],
                "max_abs_diff_mixed_vs_keyed": float((got - reference).abs().max()),
                "max_abs_diff_b_rows_if_a_were_applied": float(
                    (without_b[half:] - reference[half:]).abs().max()
                ),
            }
            print(rows, json.dumps(results[str(rows)]["median_seconds"]), results[str(rows)]["mixed_over_keyed"],
                  results[str(rows)]["max_abs_diff_mixed_vs_keyed"])  # fmt: skip
    report = {
        "benchmark": "lora_mixed",
        "date": date.today().isoformat(),
        "device": "cpu",
        "cpu": device_name("cpu"),
        "torch": torch.__version__,
        "threads": args.threads,
        "load_average_1m": os.getloadavg()[0],
        "model": "genserve-shapes (UNet only)",
        "loras": "2 x rank 8 on " + ", ".join(TARGET_MODULES),
        "steps": args.steps,
        "repeats": args.repeats,
        "rows": results,
    }
    out = (
        args.out
        or Path("benchmarks/results") / f"{date.today().isoformat()}-cpu-lora-mixed-genserve-shapes.json"
    )
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()

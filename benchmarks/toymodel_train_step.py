"""Training-step time of the genserve-shapes UNet + text encoder: the two choices the recipe made for speed.

    .venv/bin/python benchmarks/toymodel_train_step.py [--threads 2] [--steps 5]

Times one optimizer step (forward, backward, AdamW) at the training batch size, for:
- fp32 vs bf16 autocast (train.py picks bf16 only where `bf16_is_faster` says so: CPUs without
  native bf16 emulate it);
- cross-attention at 8x8 and 4x4 (what train.py builds) vs at 16x16 and 8x8 (the earlier recipe).
Random inputs: the time does not depend on the data. Writes `<date>-cpu-toymodel-train-step.json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from genserve.engine.speed.optimize import device_name
from genserve.toymodel import dataset, train
from genserve.toymodel.tokenizer import build_tokenizer

ATTENTION_AT_16_AND_8 = {
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}


def step_seconds(unet: UNet2DConditionModel, bf16: bool, steps: int, batch: int) -> list[float]:
    tokenizer = build_tokenizer(dataset.vocabulary())
    text_encoder = train.build_text_encoder(len(tokenizer), tokenizer.model_max_length)
    optimizer = torch.optim.AdamW(list(unet.parameters()) + list(text_encoder.parameters()), lr=1e-4)
    channels, side = unet.config.in_channels, unet.config.sample_size
    latents = torch.randn(batch, channels, side, side)
    ids = torch.randint(0, len(tokenizer), (batch, tokenizer.model_max_length))
    timesteps = torch.randint(0, train.TRAIN_TIMESTEPS, (batch,))
    timings = []
    for index in range(steps + 1):  # the first step warms up and is not counted
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
            prediction = unet(latents, timesteps, text_encoder(ids)[0]).sample
        loss = prediction.float().pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if index:
            timings.append(time.perf_counter() - start)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    batch = train.TrainConfig(out=Path("."), checkpoint_dir=Path(".")).unet_batch
    shipped = train.build_unet(64)
    earlier = UNet2DConditionModel.from_config({**shipped.config, **ATTENTION_AT_16_AND_8})
    cases = {
        "fp32, attention 8x8+4x4 (shipped recipe)": (shipped, False, args.steps),
        "fp32, attention 16x16+8x8 (earlier recipe)": (earlier, False, args.steps),
        "bf16 autocast, attention 8x8+4x4": (shipped, True, 2),  # slow where emulated: fewer steps
    }
    results = {}
    for name, (unet, bf16, steps) in cases.items():
        timings = step_seconds(unet, bf16, steps, batch)
        results[name] = {"median_s_per_step": round(statistics.median(timings), 3), "runs": timings}
        print(f"{name:>44}: {results[name]['median_s_per_step']:.3f} s/step")
    cpu = device_name("cpu")
    result = {
        "benchmark": "toymodel_train_step",
        "date": datetime.date.today().isoformat(),
        "device": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_is_faster_probe": train.bf16_is_faster("cpu"),
        "threads": args.threads,
        "torch": torch.__version__,
        "batch": batch,
        "load_average_1min_before": round(load_before, 2),
        "results": results,
        "command": f".venv/bin/python benchmarks/toymodel_train_step.py --threads {args.threads}",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{result['date']}-cpu-toymodel-train-step.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

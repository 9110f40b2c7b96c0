"""Train the built-in upscaler "genserve-shapes-2x": a Real-ESRGAN Compact (SRVGGNetCompact) that
doubles genserve-shapes' 64-pixel pictures to 128, in spandrel's architecture and key layout, so
the serving path loads it like any operator-supplied upscaler.

    .venv-tv/bin/python -m genserve.toymodel.train_upscaler --out genserve/builtin_models/upscale

Data: the same scenes as genserve-shapes (dataset.py), training triples only, rendered at 128 with
a little jitter (the target); the input is the same scene at 64: rendered at 64 from the same
jittered layout (what the diffusion model learned to draw), or the 128 render downscaled with
Lanczos, bicubic, bilinear or box filtering, sometimes softened with a small blur (the VAE's
softness). Random flips and quarter turns. MSE loss in 8-bit levels, Adam, cosine schedule. The last
convolution starts at zero, so the network starts as a nearest-neighbour upscale and learns the
residual. The held-out triples are never drawn; the bar (tests/test_upscaler_shapes.py) measures
PSNR on them against bicubic.

Seeded; one torch thread by default (a shared machine).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageFilter
import torch
from torch import nn

from genserve.toymodel.dataset import draw_scene, held_out_triples, sample_scene, training_triples

NAME = "genserve-shapes-2x"
LOW, HIGH = 64, 128
_DOWNSCALE = (
    PIL.Image.Resampling.LANCZOS,
    PIL.Image.Resampling.BICUBIC,
    PIL.Image.Resampling.BILINEAR,
    PIL.Image.Resampling.BOX,
)


def build_model(num_feat: int = 32, num_conv: int = 8) -> nn.Module:
    from spandrel.architectures.Compact import Compact

    model = Compact(num_in_ch=3, num_out_ch=3, num_feat=num_feat, num_conv=num_conv, upscale=2)
    last = model.body[-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return model


def training_pair(rng: random.Random, triples: list) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) uint8 HWC arrays of one random training scene."""
    scene = sample_scene(rng, triples)
    layout = rng.randrange(2**31)
    high = draw_scene(scene, HIGH, random.Random(layout))
    pick = rng.random()
    if pick < 0.2:
        low = draw_scene(scene, LOW, random.Random(layout))
    elif pick < 0.8:
        low = high.resize((LOW, LOW), PIL.Image.Resampling.LANCZOS)
    else:
        low = high.resize((LOW, LOW), rng.choice(_DOWNSCALE))
    if rng.random() < 0.1:
        low = low.filter(PIL.ImageFilter.GaussianBlur(rng.uniform(0.2, 0.6)))
    return np.asarray(low), np.asarray(high)


def to_tensor(batch: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() / 255.0


def augment(low: torch.Tensor, high: torch.Tensor, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    if rng.random() < 0.5:
        low, high = low.flip(-1), high.flip(-1)
    turns = rng.randrange(4)
    return torch.rot90(low, turns, (-2, -1)), torch.rot90(high, turns, (-2, -1))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * math.log10(255.0**2 / mse)


def held_out_pairs(count: int = 48, seed: int = 7) -> list[tuple[PIL.Image.Image, PIL.Image.Image]]:
    """(low, high) of held-out scenes: rendered at 128 and downscaled with Lanczos."""
    rng = random.Random(seed)
    triples = held_out_triples()
    pairs = []
    for _ in range(count):
        high = draw_scene(sample_scene(rng, triples), HIGH, rng)
        pairs.append((high.resize((LOW, LOW), PIL.Image.Resampling.LANCZOS), high))
    return pairs


def evaluate(model: nn.Module, pairs=None) -> dict[str, float]:  # noqa: ANN001
    """Mean PSNR (dB) of the model and of bicubic on held-out pairs."""
    pairs = pairs or held_out_pairs()
    model.eval()
    ours, bicubic = [], []
    with torch.inference_mode():
        for low, high in pairs:
            out = model(to_tensor([np.asarray(low)])).clamp(0, 1)
            pixels = (out[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            ours.append(psnr(pixels, np.asarray(high)))
            bicubic.append(
                psnr(np.asarray(low.resize((HIGH, HIGH), PIL.Image.Resampling.BICUBIC)), np.asarray(high))
            )
    return {"psnr_model_db": float(np.mean(ours)), "psnr_bicubic_db": float(np.mean(bicubic))}


def _patches(lows: torch.Tensor, highs: torch.Tensor, batch: int, patch: int, rng: random.Random):  # noqa: ANN202
    """`batch` random (low, high) crops of `patch` input pixels from the pre-rendered pool."""
    low, high = [], []
    for _ in range(batch):
        i = rng.randrange(len(lows))
        y, x = rng.randrange(LOW - patch + 1), rng.randrange(LOW - patch + 1)
        low.append(lows[i, :, y : y + patch, x : x + patch])
        high.append(highs[i, :, 2 * y : 2 * (y + patch), 2 * x : 2 * (x + patch)])
    return torch.stack(low), torch.stack(high)


def train(out: Path, *, steps: int, batch: int, lr: float, seed: int, minutes: float, num_feat: int,
          num_conv: int, patch: int = 32, pool_size: int = 6000) -> dict:  # fmt: skip
    """Pre-render `pool_size` pairs, then train on random `patch`-pixel crops of them."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    triples = training_triples(held_out_triples())
    model = build_model(num_feat, num_conv)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=lr * 0.02)
    started, losses, done = time.monotonic(), [], 0
    pool = [training_pair(rng, triples) for _ in range(pool_size)]
    lows, highs = to_tensor([p[0] for p in pool]), to_tensor([p[1] for p in pool])
    for step in range(steps):
        low, high = _patches(lows, highs, batch, patch, rng)
        low, high = augment(low, high, rng)
        model.train()
        # MSE in 8-bit levels (PSNR is an MSE measure): in [0, 1] units the gradients are ~1e-7,
        # where Adam's eps swamps them and nothing moves.
        loss = ((model(low) - high) * 255.0).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        done = step + 1
        if done % 100 == 0:
            print(
                f"step {done}/{steps} loss {np.mean(losses[-100:]):.4f} {time.monotonic() - started:.0f}s",
                flush=True,
            )
        if time.monotonic() - started > minutes * 60:
            print(f"time budget reached at step {done}", flush=True)
            break
    scores = evaluate(model)
    report = {
        "steps": done, "batch": batch, "patch": patch, "pool": pool_size, "lr": lr, "seed": seed, "num_feat": num_feat, "num_conv": num_conv,
        "train_seconds": round(time.monotonic() - started, 1), "final_loss": float(np.mean(losses[-100:])),
        **{k: round(v, 3) for k, v in scores.items()},
    }  # fmt: skip
    save(model, out, report)
    return report


def save(model: nn.Module, out: Path, report: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, out / f"{NAME}.safetensors", metadata={"genserve": json.dumps(report)})
    (out / f"{NAME}.training.json").write_text(json.dumps(report, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the built-in 2x upscaler for genserve-shapes.")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parents[1] / "builtin_models" / "upscale"
    )
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=17.0, help="stop early at this wall time")
    parser.add_argument("--num-feat", type=int, default=32)
    parser.add_argument("--num-conv", type=int, default=8)
    parser.add_argument("--cpu-threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.cpu_threads)
    report = train(args.out, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                   minutes=args.minutes, num_feat=args.num_feat, num_conv=args.num_conv)  # fmt: skip
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""Train "genserve-shapes-canny", a canny-edge ControlNet companion of genserve-shapes.

    .venv/bin/python -m genserve.toymodel.train_controlnet --minutes 35 --cpu-threads 1

Phases:

0. Load genserve-shapes (VAE, text encoder, tokenizer, UNet: all frozen).
1. Render the synthetic dataset (training triples only, jittered positions and sizes), encode it with
   the VAE once, and compute each picture's canny map with the serving preprocessor
   (`engine/conditioning/preprocess.canny`, A1111's 100/200).
2. Train a ControlNet made with `ControlNetModel.from_unet` (its encoder starts as a copy of the
   UNet's; the zero convolutions start at zero): v-prediction loss through the frozen UNet,
   min-SNR weights, 30% of captions dropped (empty prompt) so the layout must come from the map,
   half of the timesteps drawn from the high-noise end where the layout is decided.
   The step count is fixed after timing the first steps so the run fits `--minutes`.
3. Evaluate on held-out triples (`controlnet_eval`) and write the ControlNet as fp16 safetensors.

Create a file named STOP in the checkpoint directory to stop early: the run exports what it has.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline

from genserve.engine.conditioning.preprocess import canny
from genserve.toymodel import controlnet_eval, dataset
from genserve.toymodel.evaluate import DEFAULT_CFG
from genserve.toymodel.shapes_classifier import CLASSIFIER_FILE, classify_shapes, load_classifier
from genserve.toymodel.train import min_snr_weights, mixed_precision, to_model_range, train_noise_scheduler

logger = logging.getLogger("genserve.toymodel.train_controlnet")

BASE = Path(__file__).resolve().parents[1] / "builtin_models" / "genserve-shapes"
OUT = Path(__file__).resolve().parents[1] / "builtin_models" / "controlnet" / "genserve-shapes-canny"


@dataclass(frozen=True)
class ControlTrainConfig:
    base: str
    out: str
    checkpoint_dir: str
    minutes: float = 35.0
    seed: int = 0
    dataset_size: int = 6000
    batch: int = 16
    lr: float = 5e-4
    warmup_steps: int = 30
    caption_dropout: float = 0.3
    high_noise_fraction: float = 0.5
    min_snr_gamma: float = 5.0
    cpu_threads: int = 1
    eval_scenes: int = 40


def build_controlnet(unet: torch.nn.Module) -> ControlNetModel:
    # The conditioning embedding needs log2(VAE factor) + 1 entries: 64 px -> 16 latents is 4x, so 3.
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 64))


def render(config: ControlTrainConfig) -> tuple[list[dataset.Scene], torch.Tensor, torch.Tensor]:
    rng = random.Random(config.seed)
    triples = dataset.training_triples(dataset.held_out_triples())
    scenes = [dataset.sample_scene(rng, triples, small_bias=0.5) for _ in range(config.dataset_size)]
    images = dataset.draw_batch(scenes, 64, rng)
    maps = np.stack([canny(image)[:, :, 0] for image in images])
    return scenes, torch.from_numpy(images), torch.from_numpy(maps)


@torch.no_grad()
def encode(vae: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for start in range(0, len(images), 256):
        dist = vae.encode(to_model_range(images[start : start + 256])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def sample_timesteps(n: int, high_fraction: float, gen: torch.Generator) -> torch.Tensor:
    """Uniform timesteps, except `high_fraction` of them cubic-biased toward t = T (layout steps)."""
    u = torch.rand(n, generator=gen)
    cubic = ((1 - u**3) * 999).long()
    uniform = (u * 1000).long().clamp(max=999)
    pick = torch.rand(n, generator=gen) < high_fraction
    return torch.where(pick, cubic, uniform)


def cond_tensor(maps: torch.Tensor) -> torch.Tensor:
    """Edge maps (N, H, W) uint8 -> (N, 3, H, W) float in [0, 1], as VaeImageProcessor(do_normalize=False)."""
    return (maps.float() / 255.0)[:, None].expand(-1, 3, -1, -1).contiguous()


def pipeline_generator(
    pipe: StableDiffusionControlNetPipeline, base: StableDiffusionPipeline, steps: int = 20
) -> controlnet_eval.ControlGenerate:
    def generate(
        captions: Sequence[str], maps: Sequence[np.ndarray] | None, seeds: Sequence[int]
    ) -> list[np.ndarray]:
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        common = dict(num_inference_steps=steps, guidance_scale=DEFAULT_CFG, generator=gens, output_type="np")
        if maps is None:
            out = base(list(captions), **common).images
        else:
            from PIL import Image

            out = pipe(list(captions), image=[Image.fromarray(m) for m in maps], **common).images
        return list((np.clip(out, 0, 1) * 255).round().astype(np.uint8))

    return generate


def run(config: ControlTrainConfig) -> dict:
    torch.set_num_threads(config.cpu_threads)
    torch.manual_seed(config.seed)
    ckpt = Path(config.checkpoint_dir)
    ckpt.mkdir(parents=True, exist_ok=True)
    started = time.time()

    # 0. The frozen base model.
    base = StableDiffusionPipeline.from_pretrained(
        config.base, torch_dtype=torch.float32, safety_checker=None
    )
    base.set_progress_bar_config(disable=True)
    for module in (base.vae, base.text_encoder, base.unet):
        module.requires_grad_(False).eval()
    scaling = base.vae.config.scaling_factor

    # 1. Data.
    scenes, images, maps = render(config)
    means, stds = encode(base.vae, images)
    logger.info("rendered and encoded %d pictures (%.0fs)", len(scenes), time.time() - started)

    # 2. Training.
    controlnet = build_controlnet(base.unet).train()
    params = sum(p.numel() for p in controlnet.parameters())
    logger.info("controlnet: %.2fM parameters (%.1f MB fp16)", params / 1e6, params * 2 / 1e6)
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=config.lr, weight_decay=0.01)
    noise_scheduler = train_noise_scheduler()
    alphas_cumprod = noise_scheduler.alphas_cumprod
    rng, gen = random.Random(config.seed + 1), torch.Generator().manual_seed(config.seed + 1)
    deadline = started + config.minutes * 60
    total_steps, step, loss_avg = None, 0, 0.0
    train_start = time.time()
    lr_factor = 1.0
    while total_steps is None or step < total_steps:
        if total_steps is None and step == 20:
            per_step = (time.time() - train_start) / 20
            eval_reserve = 240.0
            total_steps = max(40, int((deadline - time.time() - eval_reserve) / per_step) + 20)
            logger.info("%.2fs per step: training %d steps", per_step, total_steps)
        if total_steps is not None:
            progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
            lr_factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))
        lr_factor = min(lr_factor, (step + 1) / config.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor
        index = torch.randint(len(means), (config.batch,), generator=gen)
        x0 = (means[index] + stds[index] * torch.randn(means[index].shape, generator=gen)) * scaling
        captions = [
            "" if rng.random() < config.caption_dropout else dataset.caption_for(scenes[i], rng)
            for i in index.tolist()
        ]
        ids = base.tokenizer(
            captions,
            padding="max_length",
            max_length=base.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        noise = torch.randn(x0.shape, generator=gen)
        t = sample_timesteps(config.batch, config.high_noise_fraction, gen)
        noisy = noise_scheduler.add_noise(x0, noise, t)
        target = noise_scheduler.get_velocity(x0, noise, t)
        with torch.no_grad():
            embeds = base.text_encoder(ids)[0]
        with mixed_precision("cpu"):
            down, mid = controlnet(
                noisy, t, embeds, controlnet_cond=cond_tensor(maps[index]), return_dict=False
            )
            prediction = base.unet(
                noisy, t, embeds, down_block_additional_residuals=down, mid_block_additional_residual=mid
            ).sample
        per_sample = ((prediction.float() - target) ** 2).mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weights(alphas_cumprod, t, config.min_snr_gamma)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        optimizer.step()
        step += 1
        loss_avg = 0.9 * loss_avg + 0.1 * loss.item() if step > 1 else loss.item()
        if step % 20 == 0:
            logger.info(
                "step %d loss %.4f (avg %.4f) lr %.2e (%.0fs)",
                step,
                loss.item(),
                loss_avg,
                config.lr * lr_factor,
                time.time() - started,
            )
        if (ckpt / "STOP").exists():
            logger.info("STOP file found at step %d", step)
            break
    train_minutes = (time.time() - train_start) / 60

    # 3. Evaluation on held-out triples, then export.
    controlnet.eval()
    pipe = StableDiffusionControlNetPipeline(
        **base.components, controlnet=controlnet, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    classifier = load_classifier(Path(config.base) / "eval" / CLASSIFIER_FILE).eval()
    generate = pipeline_generator(pipe, base)
    scenes_eval = controlnet_eval.control_scenes(config.eval_scenes)
    with torch.no_grad():
        with_control = controlnet_eval.evaluate(
            generate, lambda ims: classify_shapes(classifier, ims), scenes_eval
        )
        without = controlnet_eval.evaluate(
            generate, lambda ims: classify_shapes(classifier, ims), scenes_eval, with_control=False
        )
    logger.info("held-out with control:    %s", with_control.summary())
    logger.info("held-out without control: %s", without.summary())
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    controlnet.to(torch.float16).save_pretrained(out, safe_serialization=True)
    report = {
        "train_config": asdict(config),
        "steps": step,
        "train_minutes": round(train_minutes, 1),
        "final_loss_avg": round(loss_avg, 4),
        "parameters": params,
        "eval_with_control": asdict(with_control),
        "eval_without_control": asdict(without),
    }
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.info("written to %s in %.1f min", out, (time.time() - started) / 60)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the genserve-shapes canny ControlNet.")
    parser.add_argument("--base", type=Path, default=BASE)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("data/controlnet-checkpoints"))
    parser.add_argument("--minutes", type=float, default=35.0, help="wall-clock budget, evaluation included")
    parser.add_argument("--dataset-size", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--cpu-threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    config = ControlTrainConfig(
        base=str(args.base),
        out=str(args.out),
        checkpoint_dir=str(args.checkpoint_dir),
        minutes=args.minutes,
        dataset_size=args.dataset_size,
        batch=args.batch,
        cpu_threads=args.cpu_threads,
        seed=args.seed,
    )
    logger.info("config: %s", config)
    run(config)


if __name__ == "__main__":
    main()

"""Train the "shapes-white-frame" LoRA companion of genserve-shapes.

    .venv/bin/python -m genserve.toymodel.train_lora --out genserve/builtin_models/lora

The LoRA teaches the frozen base model one style: a white frame (`lora_eval.FRAME_PX` pixels)
around every picture, whatever the prompt says. It is a property plain pixel statistics can check
(`lora_eval.frame_fraction`), and the scene inside the frame must stay what the prompt asks for.

Phases:

0. Draw `dataset_size` scenes of the base model's *training* combinations, each with a white frame,
   and encode them once with the base VAE (posterior mean and std).
1. Train rank-`rank` LoRA layers on the UNet only (attention projections, resnet convolutions,
   transformer in/out projections) with the base model's recipe: v-prediction, min-SNR-5, 10% caption
   dropout, AdamW with warm-up and cosine decay. Text encoder, VAE and UNet weights stay frozen.
2. Save the LoRA in diffusers format (fp16 safetensors) with `StableDiffusionPipeline.save_lora_weights`,
   then generate the held-out scenes with and without it and log the frame and fidelity figures.

Everything is seeded; `--threads 1` keeps it to one core.
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from genserve.toymodel import dataset, lora_eval
from genserve.toymodel.evaluate import DEFAULT_CFG, pipeline_generator, score
from genserve.toymodel.train import cosine_schedule, min_snr_weights, to_model_range, train_noise_scheduler

logger = logging.getLogger("genserve.toymodel.train_lora")

BASE = Path(__file__).resolve().parents[1] / "builtin_models" / "genserve-shapes"
NAME = "shapes-white-frame"
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "proj_out"]


@dataclass(frozen=True)
class LoraTrainConfig:
    out: Path
    base: Path = BASE
    name: str = NAME
    seed: int = 0
    dataset_size: int = 4000
    steps: int = 2000
    batch: int = 16
    lr: float = 1e-3
    warmup_steps: int = 50
    rank: int = 8
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    threads: int = 1
    save_every: int = 500


def load_base(base: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(base, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def encode_framed(
    pipe: StableDiffusionPipeline, config: LoraTrainConfig
) -> tuple[list, torch.Tensor, torch.Tensor]:
    scenes = lora_eval.frame_training_scenes(config.dataset_size, config.seed)
    rng = random.Random(config.seed + 1)
    means, stds = [], []
    for start in range(0, len(scenes), 256):
        chunk = scenes[start : start + 256]
        images = np.stack([lora_eval.add_frame(np.asarray(dataset.draw_scene(s, 64, rng))) for s in chunk])
        dist = pipe.vae.encode(to_model_range(torch.from_numpy(images))).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return scenes, torch.cat(means), torch.cat(stds)


def add_lora(pipe: StableDiffusionPipeline, config: LoraTrainConfig) -> list[torch.nn.Parameter]:
    from peft import LoraConfig

    for module in (pipe.unet, pipe.text_encoder, pipe.vae):
        module.requires_grad_(False)
    torch.manual_seed(config.seed + 2)
    pipe.unet.add_adapter(
        LoraConfig(
            r=config.rank, lora_alpha=config.rank, target_modules=TARGET_MODULES, init_lora_weights="gaussian"
        )
    )
    return [p for p in pipe.unet.parameters() if p.requires_grad]


def save_lora(pipe: StableDiffusionPipeline, config: LoraTrainConfig) -> Path:
    from peft.utils import get_peft_model_state_dict

    layers = {
        k: v.detach().to(torch.float16).contiguous() for k, v in get_peft_model_state_dict(pipe.unet).items()
    }
    config.out.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        config.out, unet_lora_layers=layers, weight_name=f"{config.name}.safetensors", safe_serialization=True
    )
    return config.out / f"{config.name}.safetensors"


def train(pipe: StableDiffusionPipeline, config: LoraTrainConfig) -> None:
    scenes, means, stds = encode_framed(pipe, config)
    params = add_lora(pipe, config)
    logger.info("dataset %d framed images; %d LoRA parameters", len(scenes), sum(p.numel() for p in params))
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    schedule = cosine_schedule(optimizer, config.steps, config.warmup_steps)
    noise_scheduler = train_noise_scheduler()
    alphas_cumprod = noise_scheduler.alphas_cumprod
    scaling = pipe.vae.config.scaling_factor
    gen = torch.Generator().manual_seed(config.seed + 3)
    rng = random.Random(config.seed + 4)
    pipe.unet.train()
    start = time.time()
    for step in range(1, config.steps + 1):
        index = torch.randint(len(means), (config.batch,), generator=gen)
        x0 = (means[index] + stds[index] * torch.randn(means[index].shape, generator=gen)) * scaling
        captions = [
            "" if rng.random() < config.caption_dropout else dataset.caption_for(scenes[i], rng)
            for i in index.tolist()
        ]
        ids = pipe.tokenizer(
            captions,
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (config.batch,), generator=gen)
        with torch.no_grad():
            prompt_embeds = pipe.text_encoder(ids)[0]
        prediction = pipe.unet(noise_scheduler.add_noise(x0, noise, t), t, prompt_embeds).sample
        target = noise_scheduler.get_velocity(x0, noise, t)
        per_sample = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weights(alphas_cumprod, t, config.min_snr_gamma)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step % 20 == 0:
            logger.info(
                "step %d loss %.4f lr %.2e (%.2fs/step)",
                step,
                loss.item(),
                schedule.get_last_lr()[0],
                (time.time() - start) / 20,
            )
            start = time.time()
        if step % config.save_every == 0 or step == config.steps:
            logger.info("saved %s", save_lora(pipe, config))
    pipe.unet.eval()


@torch.no_grad()
def report(config: LoraTrainConfig) -> dict[str, float]:
    """Frame and fidelity figures on the held-out scenes, one seed, with and without the saved LoRA."""
    from genserve.toymodel.shapes_classifier import CLASSIFIER_FILE, classify_shapes, load_classifier

    classifier = load_classifier(config.base / "eval" / CLASSIFIER_FILE)
    scenes = lora_eval.held_out_frame_scenes()
    captions = [dataset.canonical_caption(s) for s in scenes]
    figures = {}
    for label in ("base", "lora"):
        pipe = load_base(config.base)
        if label == "lora":
            pipe.load_lora_weights(config.out, weight_name=f"{config.name}.safetensors")
        images = pipeline_generator(pipe, DEFAULT_CFG)(captions, [0] * len(captions))
        inner = [lora_eval.unframed(im) for im in images]
        fidelity = score(scenes, inner, classify_shapes(classifier, inner))
        figures[f"{label}_framed"] = float(np.mean([lora_eval.is_framed(im) for im in images]))
        figures.update({f"{label}_{k}": v for k, v in fidelity.items()})
    logger.info("held-out (%d scenes): %s", len(scenes), figures)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the shapes-white-frame LoRA.")
    parser.add_argument("--out", type=Path, default=Path("genserve/builtin_models/lora"))
    parser.add_argument("--steps", type=int, default=LoraTrainConfig.steps)
    parser.add_argument("--threads", type=int, default=LoraTrainConfig.threads)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = LoraTrainConfig(out=args.out, steps=args.steps, threads=args.threads)
    torch.set_num_threads(config.threads)
    if not args.report_only:
        began = time.time()
        train(load_base(config.base), config)
        logger.info("training took %.1f min", (time.time() - began) / 60)
    report(config)


if __name__ == "__main__":
    main()

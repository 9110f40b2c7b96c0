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

Options for a second run:

- `--init-from FILE_OR_FOLDER` starts from committed LoRA weights (a diffusers-format safetensors file,
  or a folder holding `<name>.safetensors`) instead of the Gaussian initialisation, so a run can
  continue an earlier one.
- `--fit-latent-iters N` makes the training targets decoder-aware: each framed picture's latent
  (the VAE posterior mean) is refined by N Adam steps on the decoder's pixel error, so the target
  decodes back to a white frame. Plain posterior means of 4-px-framed pictures decode to a frame
  that is pale or bleeds into dark backgrounds (only about 77% pass `lora_eval.is_framed` after a
  VAE round trip), which caps what the LoRA can learn from them.
- `--frame-loss-weight W` weighs the loss on the outer ring of latent pixels (the frame's, one latent
  pixel wide for the 4x VAE) W times the inside's, so the frame is not drowned by the scene's loss.
- `--concept brown` trains the second built-in LoRA, `shapes-brown`, instead: "brown" as a shape
  colour (the base model knows it only as a background), on half brown-shape scenes and half the base
  model's own scenes (`lora_colour_eval`); with `--fit-latent-iters` only the brown scenes' latents
  are fitted (the base VAE turns most small brown shapes red or green otherwise).
- `--cpu-budget-min M` stops training (and saves) once the process has used M CPU-minutes
  (`time.process_time`, all threads, data preparation included).

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

from genserve.toymodel import dataset, lora_colour_eval, lora_eval
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
    init_from: Path | None = None
    fit_latent_iters: int = 0
    fit_latent_lr: float = 0.05
    cpu_budget_min: float | None = None
    frame_loss_weight: float = 1.0
    concept: str = "frame"
    brown_bg_weight: tuple[tuple[str, float], ...] = ()


def load_base(base: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(base, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def encode_framed(
    pipe: StableDiffusionPipeline, config: LoraTrainConfig
) -> tuple[list, torch.Tensor, torch.Tensor]:
    if config.concept == "brown":
        scenes = lora_colour_eval.training_scenes(
            config.dataset_size, config.seed, dict(config.brown_bg_weight) or None
        )
    else:
        scenes = lora_eval.frame_training_scenes(config.dataset_size, config.seed)
    rng = random.Random(config.seed + 1)
    means, stds = [], []
    for start in range(0, len(scenes), 256):
        chunk = scenes[start : start + 256]
        if config.concept == "brown":
            images = np.stack([lora_colour_eval.draw(s, rng) for s in chunk])
        else:
            images = np.stack(
                [lora_eval.add_frame(np.asarray(dataset.draw_scene(s, 64, rng))) for s in chunk]
            )
        pixels = to_model_range(torch.from_numpy(images))
        dist = pipe.vae.encode(pixels).latent_dist
        mean = dist.mean
        if config.fit_latent_iters > 0 and config.concept == "brown":
            # only the brown shapes need it: the base VAE draws them red or green otherwise
            index = torch.tensor(
                [i for i, s in enumerate(chunk) if s.fg == lora_colour_eval.WORD], dtype=torch.long
            )
            if len(index):
                mean = mean.clone()
                mean[index] = fit_latents(pipe, mean[index], pixels[index], config)
        elif config.fit_latent_iters > 0:
            mean = fit_latents(pipe, mean, pixels, config)
        means.append(mean)
        stds.append(dist.std)
    return scenes, torch.cat(means), torch.cat(stds)


def fit_latents(
    pipe: StableDiffusionPipeline, latents: torch.Tensor, pixels: torch.Tensor, config: LoraTrainConfig
) -> torch.Tensor:
    """Latents refined by Adam on the frozen decoder's mean squared pixel error against `pixels`."""
    latents = latents.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([latents], lr=config.fit_latent_lr)
    with torch.enable_grad():
        for _ in range(config.fit_latent_iters):
            decoded = pipe.vae.decode(latents).sample
            loss = ((decoded - pixels) ** 2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        decoded = ((pipe.vae.decode(latents).sample.clamp(-1, 1) + 1) * 127.5).round()
    images = decoded.to(torch.uint8).permute(0, 2, 3, 1).numpy()
    check = lora_colour_eval.shows_word if config.concept == "brown" else lora_eval.is_framed
    logger.info(
        "fitted %d latents (%d steps): pixel mse %.4f, %s after decoding %.3f",
        len(latents),
        config.fit_latent_iters,
        loss.item(),
        "brown shape" if config.concept == "brown" else "framed",
        float(np.mean([check(image) for image in images])),
    )
    return latents.detach()


def lora_file(path: Path, name: str = NAME) -> Path:
    """The safetensors file of a LoRA given as a file or as the folder holding `<name>.safetensors`."""
    return path / f"{name}.safetensors" if path.is_dir() else path


def load_lora_into(unet: torch.nn.Module, path: Path) -> None:
    """Copy committed diffusers-format LoRA weights (`unet.`-prefixed peft names) into `unet`'s adapter."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    state = {k.removeprefix("unet."): v.to(torch.float32) for k, v in load_file(lora_file(path)).items()}
    expected = set(get_peft_model_state_dict(unet))
    if set(state) != expected:
        raise ValueError(
            f"{path}: LoRA keys do not match this adapter "
            f"(missing {sorted(expected - set(state))[:3]}, extra {sorted(set(state) - expected)[:3]})"
        )
    result = set_peft_model_state_dict(unet, state)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{path}: unexpected keys {result.unexpected_keys[:3]}")


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
    if config.init_from is not None:
        load_lora_into(pipe.unet, config.init_from)
        logger.info("initialised from %s", lora_file(config.init_from))
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


def frame_loss_weights(size: torch.Size, weight: float) -> torch.Tensor:
    """Per-latent-pixel loss weights: `weight` on the frame's outer latent ring, 1 inside, mean 1."""
    ring = max(1, lora_eval.FRAME_PX // 4)
    weights = torch.full((1, 1, *size), weight)
    weights[..., ring:-ring, ring:-ring] = 1.0
    return weights / weights.mean()


def train(pipe: StableDiffusionPipeline, config: LoraTrainConfig) -> None:
    cpu_began = time.process_time()
    scenes, means, stds = encode_framed(pipe, config)
    cpu_before = time.process_time() - cpu_began
    logger.info("data took %.1f CPU-min", cpu_before / 60)
    params = add_lora(pipe, config)
    logger.info("dataset %d framed images; %d LoRA parameters", len(scenes), sum(p.numel() for p in params))
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    schedule = cosine_schedule(optimizer, config.steps, config.warmup_steps)
    noise_scheduler = train_noise_scheduler()
    alphas_cumprod = noise_scheduler.alphas_cumprod
    scaling = pipe.vae.config.scaling_factor
    pixel_weights = frame_loss_weights(means.shape[-2:], config.frame_loss_weight)
    gen = torch.Generator().manual_seed(config.seed + 3)
    rng = random.Random(config.seed + 4)
    pipe.unet.train()
    start = time.time()
    cpu_start = time.process_time()
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
        per_sample = ((prediction - target) ** 2 * pixel_weights).mean(dim=(1, 2, 3))
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
        cpu_min = (time.process_time() - cpu_start + cpu_before) / 60
        over_budget = config.cpu_budget_min is not None and cpu_min >= config.cpu_budget_min
        if step % config.save_every == 0 or step == config.steps or over_budget:
            logger.info("saved %s at step %d, %.1f CPU-min", save_lora(pipe, config), step, cpu_min)
        if over_budget:
            logger.info(
                "CPU budget of %.1f min reached at step %d of %d", config.cpu_budget_min, step, config.steps
            )
            break
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


def parse_bg_weights(text: str) -> tuple[tuple[str, float], ...]:
    """`white=4,gray=2` -> (("white", 4.0), ("gray", 2.0))."""
    if not text:
        return ()
    weights = []
    for item in text.split(","):
        bg, _, weight = item.partition("=")
        weights.append((bg.strip(), float(weight)))
    return tuple(weights)


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the shapes-white-frame LoRA.")
    parser.add_argument("--out", type=Path, default=Path("genserve/builtin_models/lora"))
    parser.add_argument("--steps", type=int, default=LoraTrainConfig.steps)
    parser.add_argument("--threads", type=int, default=LoraTrainConfig.threads)
    parser.add_argument("--lr", type=float, default=LoraTrainConfig.lr)
    parser.add_argument("--warmup-steps", type=int, default=LoraTrainConfig.warmup_steps)
    parser.add_argument("--dataset-size", type=int, default=LoraTrainConfig.dataset_size)
    parser.add_argument("--seed", type=int, default=LoraTrainConfig.seed)
    parser.add_argument("--init-from", type=Path, default=None, help="LoRA file or folder to continue from")
    parser.add_argument("--fit-latent-iters", type=int, default=LoraTrainConfig.fit_latent_iters)
    parser.add_argument("--fit-latent-lr", type=float, default=LoraTrainConfig.fit_latent_lr)
    parser.add_argument(
        "--cpu-budget-min", type=float, default=None, help="stop and save after this much CPU"
    )
    parser.add_argument("--frame-loss-weight", type=float, default=LoraTrainConfig.frame_loss_weight)
    parser.add_argument(
        "--concept",
        choices=("frame", "brown"),
        default="frame",
        help="frame: shapes-white-frame; brown: shapes-brown, brown as a shape colour (lora_colour_eval)",
    )
    parser.add_argument(
        "--brown-bg-weight",
        type=parse_bg_weights,
        default=(),
        help="--concept brown: draw brown shapes more often on these backgrounds, e.g. white=4,gray=2 "
        "(other backgrounds weigh 1; the held-out pairs stay held out)",
    )
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--skip-report", action="store_true", help="no held-out pictures after training")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = LoraTrainConfig(
        out=args.out,
        name=lora_colour_eval.NAME if args.concept == "brown" else NAME,
        concept=args.concept,
        steps=args.steps,
        threads=args.threads,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        dataset_size=args.dataset_size,
        seed=args.seed,
        init_from=args.init_from,
        fit_latent_iters=args.fit_latent_iters,
        fit_latent_lr=args.fit_latent_lr,
        cpu_budget_min=args.cpu_budget_min,
        frame_loss_weight=args.frame_loss_weight,
        brown_bg_weight=args.brown_bg_weight,
    )
    torch.set_num_threads(config.threads)
    if not args.report_only:
        began, cpu_began = time.time(), time.process_time()
        train(load_base(config.base), config)
        logger.info(
            "training took %.1f min wall, %.1f CPU-min",
            (time.time() - began) / 60,
            (time.process_time() - cpu_began) / 60,
        )
    if args.skip_report:
        return
    if config.concept == "brown":
        figures = lora_colour_eval.engine_colour_report(
            config.base, lora_file=config.out / f"{config.name}.safetensors"
        )
        logger.info("held-out through the Engine: %s", figures)
    else:
        report(config)


if __name__ == "__main__":
    main()

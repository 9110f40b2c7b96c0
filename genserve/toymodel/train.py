"""Train the built-in "genserve-shapes" model from scratch and save it as a diffusers pipeline.

    .venv/bin/python -m genserve.toymodel.train --out genserve/builtin_models/genserve-shapes

Phases (each one's result is kept in the checkpoint directory, so a rerun resumes where the last
run stopped; the UNet phase also checkpoints every few minutes):

0. Render the synthetic dataset (seeded; combinations in the held-out split are left out).
1. Train the shape classifier used by the evaluation (on drawn images only).
2. Train the VAE (64x64 RGB <-> 16x16x8 latents), then encode the dataset once.
3. Train the UNet and the text encoder together on the latents: v-prediction, min-SNR loss
   weighting, 10% caption dropout for classifier-free guidance, EMA weights.
4. Write the pipeline with `save_pretrained` (fp16 safetensors) plus the classifier and split.

Everything is seeded. On a CUDA machine the same recipe runs with bigger batches (see `budget_for`).
Create a file named STOP in the checkpoint directory to stop cleanly: the run checkpoints, exports
what it has and exits; running the command again resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerBase

from genserve.toymodel import dataset
from genserve.toymodel.evaluate import (
    DEFAULT_CFG,
    SPLIT_FILE,
    EvalReport,
    evaluate,
    held_out_scenes,
    pipeline_generator,
    score,
)
from genserve.toymodel.shapes_classifier import (
    CLASSIFIER_FILE,
    classify_shapes,
    load_classifier,
    save_classifier,
    train_classifier,
)
from genserve.toymodel.tokenizer import build_tokenizer

logger = logging.getLogger("genserve.toymodel.train")

LATENT_SCALE = 4  # VAE down-sampling factor: 64x64 pixels -> 16x16 latents
# 8 channels, not SD's 4: with 4, small shapes and their exact colour were still blurred after 700 steps.
LATENT_CHANNELS = 8
TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class TrainConfig:
    out: Path
    checkpoint_dir: Path
    seed: int = 0
    resolution: int = 64
    dataset_size: int = 20000
    classifier_steps: int = 800
    vae_steps: int = 1200
    vae_batch: int = 24
    vae_lr: float = 2e-3
    unet_steps: int = 6000
    unet_batch: int = 32
    unet_lr: float = 8e-4
    warmup_steps: int = 100
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    eval_every: int = 500
    checkpoint_every_s: float = 300.0
    device: str = "cpu"
    cpu_threads: int = 2


def budget_for(device: str, config: TrainConfig) -> TrainConfig:
    """The step counts that fit the time budget: ~2 h on a 2-core CPU, ~15 min on one GPU."""
    if device == "cuda":
        return replace(
            config,
            dataset_size=60000,
            vae_steps=4000,
            vae_batch=128,
            unet_steps=8000,
            unet_batch=256,
            unet_lr=8e-4,
            eval_every=1000,
        )
    return config


# 1. Models


def bf16_is_faster(device: str) -> bool:
    """Whether bf16 matmuls beat fp32 here. Measured, because CPUs differ wildly: with AVX512-BF16
    autocast trained ~25% faster, but on an AVX2-only CPU bf16 is emulated and a UNet step took
    27 s instead of 1.7 s.

    The best of 7 alternating rounds after a warm-up of 3 calls: one round after a single warm-up
    call answered False in 1 of 8 fresh processes on the shared 2-core machine (bf16 is 4x faster
    there), and a process that gets False runs everything in fp32 (a video clip ~1.6x slower)."""
    if device == "cuda":
        return True
    a = torch.randn(384, 384)
    operands = {dtype: a.to(dtype) for dtype in (torch.float32, torch.bfloat16)}
    for x in operands.values():
        for _ in range(3):  # warm-up
            x @ x
    timings = dict.fromkeys(operands, math.inf)
    for _ in range(7):
        for dtype, x in operands.items():
            start = time.perf_counter()
            for _ in range(5):
                x @ x
            timings[dtype] = min(timings[dtype], time.perf_counter() - start)
    return timings[torch.bfloat16] < timings[torch.float32]


@functools.cache
def uses_bf16(device: str) -> bool:
    """Whether `mixed_precision(device)` autocasts to bf16 in this process (decided once, cached)."""
    fast = bf16_is_faster(device)
    logger.info("training in %s on %s", "bf16 autocast" if fast else "fp32", device)
    return fast


def mixed_precision(device: str) -> contextlib.AbstractContextManager:
    if uses_bf16(device):
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_vae(resolution: int) -> AutoencoderKL:
    # Few groups per GroupNorm: with a channel per group the VAE was slow to learn flat colours.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=resolution,
        mid_block_add_attention=False,
    )


def build_text_encoder(vocab_size: int, max_length: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_length,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return CLIPTextModel(config)


def build_unet(resolution: int) -> UNet2DConditionModel:
    # "text" addition embedding: an attention-pooled summary of the prompt joins the timestep
    # embedding, so global attributes (colours) reach every block, not only the attention layers.
    return UNet2DConditionModel(
        sample_size=resolution // LATENT_SCALE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        # Attention at 8x8 and 4x4 only: at 16x16 it cost 35% more time per step on a CPU, and five
        # positions need no finer map than 8x8.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        cross_attention_dim=128,
        attention_head_dim=4,
        norm_num_groups=16,
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )


def train_noise_scheduler() -> DDPMScheduler:
    # The DDPM linear schedule ends at nearly zero SNR, which suits small latents (no leak of the
    # mean colour at t=T); v-prediction keeps the high-noise steps well conditioned.
    return DDPMScheduler(
        num_train_timesteps=TRAIN_TIMESTEPS,
        beta_schedule="linear",
        beta_start=0.0001,
        beta_end=0.02,
        prediction_type="v_prediction",
    )


def sampling_scheduler(train: DDPMScheduler) -> DPMSolverMultistepScheduler:
    """DPM++ 2M over the training schedule: good images in 20 steps."""
    return DPMSolverMultistepScheduler.from_config(
        train.config, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing"
    )


# 2. Data


@dataclass
class Data:
    scenes: list[dataset.Scene]
    images: torch.Tensor  # uint8 (N, H, W, 3)


def render_dataset(config: TrainConfig) -> Data:
    rng = random.Random(config.seed)
    triples = dataset.training_triples(dataset.held_out_triples())
    scenes = [dataset.sample_scene(rng, triples) for _ in range(config.dataset_size)]
    images = torch.from_numpy(dataset.draw_batch(scenes, config.resolution, rng))
    return Data(scenes, images)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


# 3. VAE


def train_vae(config: TrainConfig, data: Data) -> AutoencoderKL:
    torch.manual_seed(config.seed + 1)
    gen = torch.Generator().manual_seed(config.seed + 1)
    vae = build_vae(config.resolution).to(config.device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    schedule = cosine_schedule(optimizer, config.vae_steps, warmup=50)
    start = time.time()
    for step in range(config.vae_steps):
        index = torch.randint(len(data.images), (config.vae_batch,), generator=gen)
        x = to_model_range(data.images[index]).to(config.device)
        with mixed_precision(config.device):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample.float()
        kl = posterior.kl().float().mean() / x[0].numel()
        error = (recon - x).abs() + (recon - x) ** 2
        loss = (shape_weights(x) * error).mean() + 1e-4 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == config.vae_steps - 1:
            logger.info(
                "vae step %d loss %.4f kl %.2f (%.0fs)", step, loss.item(), kl.item(), time.time() - start
            )
    return vae.eval()


def shape_weights(x: torch.Tensor, weight: float = 8.0) -> torch.Tensor:
    """Per-pixel loss weights: the shape covers 2-14% of a picture, so its pixels count `weight` times.

    Without this the VAE learns the backgrounds and leaves shapes as blurry blobs of the wrong colour.
    """
    corner = x[:, :, :1, :1]  # the background colour: corners are always background
    is_shape = (x - corner).abs().amax(dim=1, keepdim=True) > 0.1
    return 1.0 + (weight - 1.0) * is_shape.float()


@torch.no_grad()
def reconstruction_report(vae: AutoencoderKL, classifier: nn.Module, config: TrainConfig) -> dict[str, float]:
    """How well the VAE alone keeps colours and shapes (the diffusion model cannot do better)."""
    rng = random.Random(config.seed + 5)
    scenes = [dataset.sample_scene(rng, dataset.all_triples()) for _ in range(128)]
    x = to_model_range(torch.from_numpy(dataset.draw_batch(scenes, config.resolution, rng))).to(config.device)
    recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
    images = list(((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    return score(scenes, images, classify_shapes(classifier, images))


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, data: Data, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and standard deviations of every image, computed once."""
    means, stds = [], []
    for start in range(0, len(data.images), 256):
        dist = vae.encode(to_model_range(data.images[start : start + 256]).to(device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    return torch.cat(means), torch.cat(stds)


# 4. UNet + text encoder


def cosine_schedule(
    optimizer: torch.optim.Optimizer, steps: int, warmup: int
) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights for v-prediction (Hang et al. 2023, eq. 9 with the v target)."""
    snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
    return torch.clamp(snr, max=gamma) / (snr + 1)


@dataclass
class UnetState:
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    ema_unet: UNet2DConditionModel
    ema_text_encoder: CLIPTextModel
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    step: int = 0


def new_unet_state(config: TrainConfig, vocab_size: int, max_length: int) -> UnetState:
    torch.manual_seed(config.seed + 2)
    unet = build_unet(config.resolution).to(config.device)
    text_encoder = build_text_encoder(vocab_size, max_length).to(config.device)
    ema_unet = build_unet(config.resolution).to(config.device).eval().requires_grad_(False)
    ema_text_encoder = (
        build_text_encoder(vocab_size, max_length).to(config.device).eval().requires_grad_(False)
    )
    ema_unet.load_state_dict(unet.state_dict())
    ema_text_encoder.load_state_dict(text_encoder.state_dict())
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=0.01, betas=(0.9, 0.99))
    schedule = cosine_schedule(optimizer, config.unet_steps, config.warmup_steps)
    return UnetState(unet, text_encoder, ema_unet, ema_text_encoder, optimizer, schedule)


@torch.no_grad()
def update_ema(state: UnetState, decay: float) -> None:
    # Short warm-up so early evaluations are not dominated by the random initialisation.
    decay = min(decay, (1 + state.step) / (10 + state.step))
    for ema, live in ((state.ema_unet, state.unet), (state.ema_text_encoder, state.text_encoder)):
        ema_params, live_params = list(ema.parameters()), list(live.parameters())
        torch._foreach_lerp_(ema_params, live_params, 1 - decay)


def train_unet(
    config: TrainConfig,
    data: Data,
    latents: tuple[torch.Tensor, torch.Tensor],
    scaling_factor: float,
    tokenizer: PreTrainedTokenizerBase,
    vae: AutoencoderKL,
    classifier: nn.Module,
    state: UnetState,
    rngs: dict,
) -> UnetState:
    device = config.device
    noise_scheduler = train_noise_scheduler()
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    means, stds = latents
    rng, gen = rngs["python"], rngs["torch"]
    last_checkpoint = time.time()
    start = time.time()
    state.unet.train()
    state.text_encoder.train()
    while state.step < config.unet_steps:
        index = torch.randint(len(means), (config.unet_batch,), generator=gen)
        x0 = (means[index] + stds[index] * torch.randn(means[index].shape, generator=gen)) * scaling_factor
        captions = [
            "" if rng.random() < config.caption_dropout else dataset.caption_for(data.scenes[i], rng)
            for i in index.tolist()
        ]
        ids = tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, TRAIN_TIMESTEPS, (config.unet_batch,), generator=gen)
        x0, noise, t = x0.to(device), noise.to(device), t.to(device)
        noisy = noise_scheduler.add_noise(x0, noise, t)
        target = noise_scheduler.get_velocity(x0, noise, t)
        with mixed_precision(device):
            prompt_embeds = state.text_encoder(ids)[0]
            prediction = state.unet(noisy, t, prompt_embeds).sample
        per_sample = ((prediction.float() - target) ** 2).mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weights(alphas_cumprod, t, config.min_snr_gamma)).mean()
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(
            list(state.unet.parameters()) + list(state.text_encoder.parameters()), 1.0
        )
        state.optimizer.step()
        state.schedule.step()
        state.step += 1
        update_ema(state, config.ema_decay)
        if state.step % 10 == 0:
            elapsed = time.time() - start
            logger.info(
                "unet step %d loss %.4f lr %.2e (%.2fs/step)",
                state.step,
                loss.item(),
                state.schedule.get_last_lr()[0],
                elapsed / 10,
            )
            start = time.time()
        stop_requested = (config.checkpoint_dir / "STOP").exists()
        if state.step % config.eval_every == 0 or state.step == config.unet_steps:
            report = quick_eval(state, tokenizer, vae, classifier)
            logger.info("eval step %d: %s", state.step, report.summary())
            state.unet.train()
            state.text_encoder.train()
        if time.time() - last_checkpoint > config.checkpoint_every_s or stop_requested:
            save_unet_checkpoint(config, state, rngs)
            last_checkpoint = time.time()
        if stop_requested:
            logger.info("STOP file found: stopping at step %d", state.step)
            break
    save_unet_checkpoint(config, state, rngs)
    return state


def assemble_pipeline(
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: PreTrainedTokenizerBase,
    unet: UNet2DConditionModel,
) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sampling_scheduler(train_noise_scheduler()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def quick_eval(
    state: UnetState,
    tokenizer: PreTrainedTokenizerBase,
    vae: AutoencoderKL,
    classifier: nn.Module,
) -> EvalReport:
    """Half the held-out set, one seed, EMA weights: a cheap progress figure for the log.

    `vae` carries the latent scaling factor in its config already (run() registers it)."""
    pipe = assemble_pipeline(vae, state.ema_text_encoder, tokenizer, state.ema_unet)
    scenes = held_out_scenes()[::2]
    with torch.no_grad():
        return evaluate(
            pipeline_generator(pipe, DEFAULT_CFG),
            lambda ims: classify_shapes(classifier, ims),
            scenes,
            seeds=(0,),
            swap_control=False,
        )


# 5. Checkpoints and export


def save_unet_checkpoint(config: TrainConfig, state: UnetState, rngs: dict) -> None:
    payload = {
        "unet": state.unet.state_dict(),
        "text_encoder": state.text_encoder.state_dict(),
        "ema_unet": state.ema_unet.state_dict(),
        "ema_text_encoder": state.ema_text_encoder.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "schedule": state.schedule.state_dict(),
        "step": state.step,
        "python_rng": rngs["python"].getstate(),
        "torch_rng": rngs["torch"].get_state(),
        "global_torch_rng": torch.get_rng_state(),
    }
    path = config.checkpoint_dir / "unet.pt"
    torch.save(payload, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)  # atomic: a kill mid-write keeps the previous checkpoint
    logger.info("checkpoint saved at step %d", state.step)


def load_unet_checkpoint(config: TrainConfig, state: UnetState, rngs: dict) -> bool:
    path = config.checkpoint_dir / "unet.pt"
    if not path.exists():
        return False
    payload = torch.load(path, weights_only=False)
    for name in ("unet", "text_encoder", "ema_unet", "ema_text_encoder", "optimizer", "schedule"):
        getattr(state, name).load_state_dict(payload[name])
    state.step = payload["step"]
    rngs["python"].setstate(payload["python_rng"])
    rngs["torch"].set_state(payload["torch_rng"])
    torch.set_rng_state(payload["global_torch_rng"])
    logger.info("resumed the UNet phase at step %d", state.step)
    return True


def export(config: TrainConfig, pipe: StableDiffusionPipeline, classifier: nn.Module) -> None:
    """Write the pipeline in fp16 safetensors, plus the evaluation's classifier and split."""
    out = config.out
    if out.exists():
        for child in ("vae", "unet", "text_encoder", "tokenizer", "scheduler", "model_index.json"):
            target = out / child
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)
    pipe.to(torch.float32)
    _use_generic_tokenizer_class(out / "model_index.json")
    (out / "eval").mkdir(parents=True, exist_ok=True)
    save_classifier(classifier, out / "eval" / CLASSIFIER_FILE)
    split = {
        "held_out_triples": [list(t) for t in dataset.held_out_triples()],
        "eval_captions": [dataset.canonical_caption(s) for s in held_out_scenes()],
        "train_config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
    }
    (out / SPLIT_FILE).write_text(json.dumps(split, indent=2) + "\n")
    logger.info("pipeline written to %s", out)


def _use_generic_tokenizer_class(index_file: Path) -> None:
    # transformers 5 names the fast tokenizer class "TokenizersBackend"; older versions only know it as
    # PreTrainedTokenizerFast (still an alias in 5), so record the name both understand.
    index = json.loads(index_file.read_text())
    index["tokenizer"] = ["transformers", "PreTrainedTokenizerFast"]
    index_file.write_text(json.dumps(index, indent=2) + "\n")


# 6. The whole run


def run(config: TrainConfig) -> None:
    # Two threads by default (0.72 s per UNet step vs ~1.2 s with one on the 2-core machine), but
    # OpenMP threads stall each other whenever another process takes a core (measured 4x slower per
    # step): on a shared machine pass --cpu-threads 1, or run the other work under `nice`.
    torch.set_num_threads(config.cpu_threads)
    config.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    ckpt = config.checkpoint_dir
    started = time.time()

    data = render_dataset(config)
    logger.info("rendered %d images (%.0fs)", len(data.images), time.time() - started)

    if (ckpt / CLASSIFIER_FILE).exists():
        classifier = load_classifier(ckpt / CLASSIFIER_FILE)
    else:
        classifier = train_classifier(
            config.resolution, config.classifier_steps, config.seed + 3, log=logger.info
        )
        save_classifier(classifier, ckpt / CLASSIFIER_FILE)
    classifier.eval()

    if (ckpt / "vae").exists():
        vae = AutoencoderKL.from_pretrained(ckpt / "vae").to(config.device).eval()
    else:
        vae = train_vae(config, data)
        vae.save_pretrained(ckpt / "vae")
    logger.info("vae reconstructions: %s", reconstruction_report(vae, classifier, config))
    if (ckpt / "latents.pt").exists():
        means, stds, scaling_factor = torch.load(ckpt / "latents.pt").values()
    else:
        means, stds = encode_dataset(vae, data, config.device)
        scaling_factor = float(1.0 / means.std())
        torch.save({"means": means, "stds": stds, "scaling_factor": scaling_factor}, ckpt / "latents.pt")
    # register_to_config, not attribute assignment: only the registered value reaches save_pretrained.
    vae.register_to_config(scaling_factor=scaling_factor)
    logger.info(
        "latents %s, mean %.3f, scaling factor %.4f", tuple(means.shape), means.mean(), scaling_factor
    )

    tokenizer = build_tokenizer(dataset.vocabulary())
    state = new_unet_state(config, len(tokenizer), tokenizer.model_max_length)
    rngs = {"python": random.Random(config.seed + 4), "torch": torch.Generator().manual_seed(config.seed + 4)}
    load_unet_checkpoint(config, state, rngs)
    state = train_unet(config, data, (means, stds), scaling_factor, tokenizer, vae, classifier, state, rngs)

    pipe = assemble_pipeline(vae, state.ema_text_encoder, tokenizer, state.ema_unet)
    export(config, pipe, classifier)
    logger.info(
        "done in %.1f min this session (UNet step %d of %d)",
        (time.time() - started) / 60,
        state.step,
        config.unet_steps,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the built-in genserve-shapes model.")
    parser.add_argument("--out", type=Path, default=Path("genserve/builtin_models/genserve-shapes"))
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("data/toymodel-checkpoints"))
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unet-steps", type=int, help="override the device's default step count")
    parser.add_argument("--vae-steps", type=int)
    parser.add_argument("--classifier-steps", type=int)
    parser.add_argument("--dataset-size", type=int)
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--cpu-threads", type=int, help="torch threads (default 2, see run())")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    config = budget_for(
        device, TrainConfig(out=args.out, checkpoint_dir=args.checkpoint_dir, seed=args.seed, device=device)
    )
    overrides = {
        "unet_steps": args.unet_steps,
        "vae_steps": args.vae_steps,
        "classifier_steps": args.classifier_steps,
        "dataset_size": args.dataset_size,
        "eval_every": args.eval_every,
        "cpu_threads": args.cpu_threads,
    }
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    logger.info("config: %s", config)
    run(config)


if __name__ == "__main__":
    main()

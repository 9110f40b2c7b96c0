"""Train the built-in video model "genserve-shapes-motion": an AnimateDiff motion adapter for
genserve-shapes, trained on clips of the same shapes moving.

    .venv/bin/python -m genserve.toymodel.train_motion --out genserve/builtin_models/genserve-shapes-motion

Phases (results are kept in the checkpoint directory, so a rerun resumes where the last one stopped;
the training phase also checkpoints every few minutes):

0. Render the clips (`motion`: seeded; the held-out triples are left out) and encode every frame
   once with genserve-shapes' frozen VAE.
1. Train the motion modules of a `diffusers.MotionAdapter` inside genserve-shapes' UNet (frozen), and
   the text encoder, whose vocabulary gains the motion words ("moving", "up", "growing", ...). The
   base tokenizer maps those to [UNK], and motion modules see no text themselves: the words reach
   them only through the spatial layers' cross-attention and the pooled text embedding, so the text
   encoder must learn to say "up" in a way those frozen layers pass on; a small conditioning head
   (`motion.MotionTextConditioning`) also tells every motion module the prompt directly.
   v-prediction like genserve-shapes, but plain (unweighted) v-MSE and half the timesteps drawn from
   the noisiest 40%, where the direction of a clip is decided; 10% caption dropout for CFG, EMA.
   A clip played backwards is another clip (left <-> right, growing <-> shrinking): half the
   batches are reversed, which doubles the data for free.
2. Write the adapter (`MotionAdapter.save_pretrained`, fp16 safetensors), the text encoder and the
   tokenizer, and the held-out split, into the output folder.

Everything is seeded. Create a file named STOP in the checkpoint directory to stop cleanly: the run
checkpoints, exports what it has and exits; running the command again resumes. One torch thread by
default (the machine is shared); --cpu-threads 2 on a quiet machine.

On a GPU, one command trains from scratch within a wall-clock budget, evaluates and packs the result:

    python -m genserve.toymodel.train_motion --device cuda --out /tmp/m/model --checkpoint-dir /tmp/m/ckpt \
        --steps 1000000 --batch 32 --clips 6000 --lr 1e-3 --text-lr 3e-4 --render-workers 16 \
        --time-budget-s 200 --wall-budget-s 300 --eval-prompts 40 --scores scores.json --tar motion.tar

Clips are rendered by --render-workers processes and encoded on the device; the warped noise is drawn
there too (`warped_noise_batch`), the UNet runs under bf16 autocast (fp32 weights, optimizer and EMA).
The training phase stops at --time-budget-s seconds (or earlier, so that the whole run ends within
--wall-budget-s with --eval-reserve-s left for export and evaluation), checkpoints and exports; the
learning rate's cosine follows whichever of steps and time is further along, so a time-bounded run
still decays (a resumed time-bounded run starts a new cosine over its new budget). Steps/s are
logged every ~15 s. --eval-prompts runs the held-out evaluation on the
device (reports for the first 7, 14 and all prompts, as JSON), --tar packs the exported folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import random
import tarfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextModel, PreTrainedTokenizerBase

from genserve.toymodel import motion, motion_noise
from genserve.toymodel.train import (
    cosine_schedule,
    min_snr_weights,
    mixed_precision,
    to_model_range,
    train_noise_scheduler,
)

logger = logging.getLogger("genserve.toymodel.train_motion")

BASE_MODEL = Path(__file__).resolve().parents[1] / "builtin_models" / "genserve-shapes"
MOTION_MODEL = Path(__file__).resolve().parents[1] / "builtin_models" / "genserve-shapes-motion"
SPLIT_FILE = "eval/heldout.json"


@dataclass(frozen=True)
class MotionTrainConfig:
    out: Path
    checkpoint_dir: Path
    base: Path = BASE_MODEL
    seed: int = 0
    frames: int = motion.DEFAULT_FRAMES
    clips: int = 3000
    steps: int = 2400
    batch: int = 2  # clips per step (x frames images through the UNet)
    lr: float = 6e-4
    text_lr: float = 2e-4
    warmup_steps: int = 100
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    # "v": plain v-prediction MSE (in x0 terms, weight 1 at high noise); "min_snr": genserve-shapes'
    # min-SNR-5 weighting, which all but ignores the high-noise steps, where a clip's direction is
    # decided: with it, after 1,600 steps, shapes moved but the direction followed the seed.
    loss_weighting: str = "v"
    high_noise_fraction: float = 0.5  # this fraction of clips get a timestep from the top 40%
    ema_decay: float = 0.995
    motion_heads: int = 8
    motion_text: bool = True  # MotionTextConditioning: the prompt told to the motion modules
    checkpoint_every_s: float = 300.0
    cpu_threads: int = 1
    init_from: Path | None = None  # a motion.pt checkpoint or an exported model folder to start from
    # Warped noise (`motion_noise`): each clip's noise is carried along the clip's own motion, so the
    # adapter learns to move the shape with its noise (at inference the caption's motion warps it).
    # This fraction of clips keep independent noise per frame (prompts that name no motion).
    warped_noise: bool = True
    plain_noise_fraction: float = 0.1
    device: str = "cpu"
    # Wall-clock bounds of the training phase (seconds, None: steps only). `wall_budget_s` bounds the
    # whole run: training stops early enough to leave `eval_reserve_s` for the export and evaluation.
    time_budget_s: float | None = None
    wall_budget_s: float | None = None
    eval_reserve_s: float = 60.0
    render_workers: int = 1
    log_every_s: float = 15.0


# 1. Models


def build_adapter(unet: UNet2DConditionModel, config: MotionTrainConfig) -> MotionAdapter:
    """A motion adapter shaped like genserve-shapes' UNet: one temporal transformer after each
    spatial layer (and in the middle block), 16-group norms like the UNet's."""
    return MotionAdapter(
        block_out_channels=tuple(unet.config.block_out_channels),
        motion_layers_per_block=unet.config.layers_per_block,
        motion_transformer_layers_per_block=1,
        motion_mid_block_layers_per_block=1,
        motion_num_attention_heads=config.motion_heads,
        motion_norm_num_groups=unet.config.norm_num_groups,
        motion_max_seq_length=32,
        use_motion_mid_block=True,
    )


def zero_init_motion_outputs(adapter: MotionAdapter) -> None:
    """Start every motion module as the identity (AnimateDiff's recipe): the untrained adapter then
    draws exactly what genserve-shapes draws, frame by frame."""
    for module in adapter.modules():
        if isinstance(getattr(module, "proj_out", None), nn.Linear):
            nn.init.zeros_(module.proj_out.weight)
            nn.init.zeros_(module.proj_out.bias)


def extend_text_encoder(text_encoder: CLIPTextModel, vocab_size: int, seed: int) -> CLIPTextModel:
    """The base text encoder with rows for the motion words (the old rows are unchanged)."""
    old = text_encoder.get_input_embeddings().weight.data.clone()
    text_encoder.resize_token_embeddings(vocab_size)
    gen = torch.Generator().manual_seed(seed)
    new_rows = old.mean(0) + old.std(0) * torch.randn(vocab_size - len(old), old.shape[1], generator=gen)
    weight = text_encoder.get_input_embeddings().weight.data
    weight[: len(old)] = old
    weight[len(old) :] = new_rows
    text_encoder.config.vocab_size = vocab_size
    return text_encoder


def motion_parameters(unet: nn.Module) -> list[nn.Parameter]:
    """The motion modules' and the motion text conditioning's parameters (the trained part)."""
    return [p for name, p in unet.named_parameters() if "motion_modules" in name or "motion_text" in name]


def extract_adapter(unet: nn.Module, template: MotionAdapter) -> MotionAdapter:
    """The motion modules of a motion UNet, as a standalone MotionAdapter."""
    adapter = MotionAdapter.from_config(template.config)
    state = {k: v for k, v in unet.state_dict().items() if "motion_modules" in k}
    adapter.load_state_dict(state)
    return adapter


# 2. Data


def _render_chunk(job: tuple[list[motion.Clip], int]) -> np.ndarray:
    clips, frames = job
    return np.concatenate([motion.render_clip(c, frames) for c in clips])


@torch.no_grad()
def encode_clips(
    config: MotionTrainConfig, vae: AutoencoderKL, chunk: int = 16
) -> tuple[list[motion.Clip], torch.Tensor]:
    """Render the training clips (`render_workers` processes) and encode every frame on
    `config.device` (the VAE is moved there): latents (clips, frames, C, h, w), fp16, on the CPU."""
    rng = random.Random(config.seed)
    triples = motion.training_triples()
    clips = [
        motion.sample_clip(rng, triples, motion.MOTIONS[i % len(motion.MOTIONS)]) for i in range(config.clips)
    ]
    jobs = [(clips[i : i + chunk], config.frames) for i in range(0, len(clips), chunk)]
    latents = []
    start = time.time()
    pool = None
    if config.render_workers > 1:
        # forked before this process touches CUDA (forking after it is initialised is unsafe); the
        # workers only draw with PIL
        pool = multiprocessing.get_context("fork").Pool(config.render_workers)
        rendered = pool.imap(_render_chunk, jobs, chunksize=4)
    else:
        rendered = map(_render_chunk, jobs)
    device = torch.device(config.device)
    vae.to(device)
    try:
        for n, array in enumerate(rendered):
            frames = torch.from_numpy(array).to(device)
            mean = vae.encode(to_model_range(frames)).latent_dist.mean
            latents.append(mean.reshape(-1, config.frames, *mean.shape[1:]).half().cpu())
            if (n * chunk) % 800 == 0:
                logger.info("encoded %d / %d clips (%.0fs)", n * chunk, len(clips), time.time() - start)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    logger.info("rendered and encoded %d clips in %.1fs", len(clips), time.time() - start)
    return clips, torch.cat(latents)


# 3. Training


@dataclass
class MotionState:
    unet: nn.Module
    text_encoder: CLIPTextModel
    ema: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    step: int = 0
    clock: dict = field(default_factory=dict)  # {"progress": 0..1} for a time-bounded schedule

    def trained(self) -> list[nn.Parameter]:
        return motion_parameters(self.unet) + list(self.text_encoder.parameters())


def new_state(
    config: MotionTrainConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[MotionState, MotionAdapter]:
    torch.manual_seed(config.seed + 1)
    base_unet = UNet2DConditionModel.from_pretrained(config.base / "unet", torch_dtype=torch.float32)
    adapter = build_adapter(base_unet, config)
    zero_init_motion_outputs(adapter)
    unet = motion.build_motion_unet(base_unet, adapter).float()
    if config.motion_text:
        unet.attach_motion_text(motion.new_motion_text(unet))
    unet.requires_grad_(False)
    for p in motion_parameters(unet):
        p.requires_grad_(True)
    text_encoder = CLIPTextModel.from_pretrained(config.base / "text_encoder", torch_dtype=torch.float32)
    text_encoder = extend_text_encoder(text_encoder, len(tokenizer), config.seed + 2)
    text_encoder.requires_grad_(True)
    unet.to(config.device)
    text_encoder.to(config.device)
    optimizer = torch.optim.AdamW(
        [
            {"params": motion_parameters(unet), "lr": config.lr},
            {"params": list(text_encoder.parameters()), "lr": config.text_lr},
        ],
        weight_decay=0.01,
        betas=(0.9, 0.99),
    )
    clock = {"progress": 0.0}
    if config.time_budget_s is None and config.wall_budget_s is None:
        schedule = cosine_schedule(optimizer, config.steps, config.warmup_steps)
    else:
        schedule = budget_schedule(optimizer, config.warmup_steps, clock)
    state = MotionState(unet, text_encoder, [], optimizer, schedule, clock=clock)
    state.ema = [p.detach().clone() for p in state.trained()]
    return state, adapter


def budget_schedule(
    optimizer: torch.optim.Optimizer, warmup: int, clock: dict
) -> torch.optim.lr_scheduler.LambdaLR:
    """`train.cosine_schedule`'s shape (linear warmup, cosine to 0.1x), but along `clock["progress"]`
    (0..1, set by the training loop: the larger of the step and the time fractions), for a run
    bounded by wall-clock time whose step count is not known in advance."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, clock["progress"])))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def update_ema(state: MotionState, decay: float) -> None:
    decay = min(decay, (1 + state.step) / (10 + state.step))
    torch._foreach_lerp_(state.ema, [p.detach() for p in state.trained()], 1 - decay)


@torch.no_grad()
def swap_in_ema(state: MotionState) -> list[torch.Tensor]:
    """Put the EMA weights into the models; returns the live weights to put back."""
    live = [p.detach().clone() for p in state.trained()]
    for p, e in zip(state.trained(), state.ema, strict=True):
        p.copy_(e)
    return live


@torch.no_grad()
def restore(state: MotionState, live: list[torch.Tensor]) -> None:
    for p, v in zip(state.trained(), live, strict=True):
        p.copy_(v)


def train(
    config: MotionTrainConfig,
    clips: list[motion.Clip],
    latents: torch.Tensor,
    scaling_factor: float,
    tokenizer: PreTrainedTokenizerBase,
    state: MotionState,
    rngs: dict,
    time_budget_s: float | None = None,
) -> MotionState:
    """Train until `config.steps`, a STOP file, or `time_budget_s` seconds of this phase."""
    device = torch.device(config.device)
    noise_scheduler = train_noise_scheduler()
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    rng, gen = rngs["python"], rngs["torch"]
    noise_gen = rngs.get("device", gen)
    latents = latents.to(device)
    total = noise_scheduler.config.num_train_timesteps
    last_checkpoint = time.time()
    started = time.time()
    first_step = state.step
    log_start, log_step, losses = time.time(), state.step, []
    state.unet.train()
    state.text_encoder.train()

    def elapsed() -> float:
        return time.time() - started

    while state.step < config.steps and (time_budget_s is None or elapsed() < time_budget_s):
        state.clock["progress"] = max(
            state.step / config.steps, elapsed() / time_budget_s if time_budget_s else 0.0
        )
        index = torch.randint(len(clips), (config.batch,), generator=gen)
        reverse = [rng.random() < 0.5 for _ in range(config.batch)]  # played backwards: the opposite motion
        batch_clips = [
            clips[i].reversed() if r else clips[i] for i, r in zip(index.tolist(), reverse, strict=True)
        ]
        lat = latents[index.to(device)].float()  # (B, F, C, h, w)
        flip = torch.tensor(reverse, device=device)[:, None, None, None, None]
        lat = torch.where(flip, lat.flip(1), lat)
        # (B, F, C, h, w) -> (B, C, F, h, w), UNetMotionModel's layout
        x0 = lat.permute(0, 2, 1, 3, 4) * scaling_factor
        captions = [
            "" if rng.random() < config.caption_dropout else motion.motion_caption_for(c, rng)
            for c in batch_clips
        ]
        ids = tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        noise = training_noise(config, batch_clips, x0.shape, rng, noise_gen)
        t = torch.randint(0, total, (config.batch,), generator=gen)
        high = torch.rand(config.batch, generator=gen) < config.high_noise_fraction
        t = torch.where(high, torch.randint(int(0.6 * total), total, (config.batch,), generator=gen), t)
        t = t.to(device)
        noisy = noise_scheduler.add_noise(x0, noise, t)
        target = noise_scheduler.get_velocity(x0, noise, t)
        with mixed_precision(device.type):
            # one copy of the prompt per frame, UNetMotionModel's convention (as in AnimateDiffPipeline)
            prompt_embeds = state.text_encoder(ids)[0].repeat_interleave(config.frames, dim=0)
            prediction = state.unet(noisy, t, prompt_embeds).sample
        per_clip = ((prediction.float() - target) ** 2).mean(dim=(1, 2, 3, 4))
        if config.loss_weighting == "min_snr":
            per_clip = per_clip * min_snr_weights(alphas_cumprod, t, config.min_snr_gamma)
        loss = per_clip.mean()
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(state.trained(), 1.0)
        state.optimizer.step()
        state.schedule.step()
        state.step += 1
        update_ema(state, config.ema_decay)
        losses.append(loss.detach())
        if time.time() - log_start >= config.log_every_s or state.step % 200 == 0:
            seconds = time.time() - log_start
            logger.info(
                "step %d loss %.4f (mean of %d) lr %.2e | %.2f steps/s, %.0fs of training%s",
                state.step,
                torch.stack(losses).mean().item(),
                len(losses),
                state.schedule.get_last_lr()[0],
                (state.step - log_step) / seconds,
                elapsed(),
                f" of {time_budget_s:.0f}" if time_budget_s else "",
            )
            log_start, log_step, losses = time.time(), state.step, []
        stop_requested = (config.checkpoint_dir / "STOP").exists()
        if time.time() - last_checkpoint > config.checkpoint_every_s or stop_requested:
            save_checkpoint(config, state, rngs)
            last_checkpoint = time.time()
        if stop_requested:
            logger.info("STOP file found: stopping at step %d", state.step)
            break
    if time_budget_s is not None and elapsed() >= time_budget_s:
        logger.info("time budget of %.0fs reached at step %d", time_budget_s, state.step)
    logger.info(
        "trained %d steps in %.1fs (%.2f steps/s)",
        state.step - first_step,
        elapsed(),
        (state.step - first_step) / max(elapsed(), 1e-9),
    )
    save_checkpoint(config, state, rngs)
    return state


def training_noise(
    config: MotionTrainConfig,
    clips: list[motion.Clip],
    shape: torch.Size,
    rng: random.Random,
    gen: torch.Generator,
) -> torch.Tensor:
    """(B, C, F, h, w) on the generator's device: each clip's noise warped along its own motion
    (`warped_noise_batch`), or independent per frame for a `plain_noise_fraction` of clips (and for
    all without warped_noise)."""
    batch, channels, frames, height, width = shape
    warped = [config.warped_noise and rng.random() >= config.plain_noise_fraction for _ in clips]
    noise = torch.randn(shape, generator=gen, device=gen.device)
    chosen = [i for i, w in enumerate(warped) if w]
    if chosen:
        paths = torch.stack([motion_noise.clip_trajectory(clips[i], frames) for i in chosen])
        noise[chosen] = warped_noise_batch(channels, height, width, paths.to(gen.device), gen)
    return noise


def warp_canvases(canvas: torch.Tensor, paths: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`motion_noise.warped_noise` for a batch, vectorised (no per-frame loop, no `unique`): canvases
    (B, C, CANVAS*FINE*height, CANVAS*FINE*width) of N(0, 1) and paths (B, F, 3) give (B, C, F, height,
    width). Same values as `warped_noise` on the same canvas (up to float summation order).

    The source of fine pixel (r, c) is (sy[r], sx[c]), so two fine pixels of a block share a source
    exactly when their rows' and their columns' sources agree: the block's sum of squared
    multiplicities is the product of its rows' and its columns' (pairs with equal source)."""
    fine, grid = motion_noise.FINE, motion_noise.CANVAS
    batch, channels = canvas.shape[:2]
    frames = paths.shape[1]
    fine_h, fine_w = height * fine, width * fine
    device = canvas.device
    u = (torch.arange(fine_w, device=device) + 0.5) / fine_w
    v = (torch.arange(fine_h, device=device) + 0.5) / fine_h
    dx, dy, zoom = (paths[..., i : i + 1].float() for i in range(3))  # (B, F, 1)
    offset_h, offset_w = (grid - 1) // 2 * fine_h, (grid - 1) // 2 * fine_w
    sx = (torch.floor((0.5 + (u - dx - 0.5) / zoom) * fine_w).long() + offset_w).clamp(0, grid * fine_w - 1)
    sy = (torch.floor((0.5 + (v - dy - 0.5) / zoom) * fine_h).long() + offset_h).clamp(0, grid * fine_h - 1)
    source = sy[..., :, None] * (grid * fine_w) + sx[..., None, :]  # (B, F, fine_h, fine_w)
    flat = canvas.reshape(batch, channels, -1)
    values = flat.gather(2, source.reshape(batch, 1, -1).expand(batch, channels, -1))
    sums = values.reshape(batch, channels, frames, height, fine, width, fine).sum(dim=(4, 6))
    rows = sy.reshape(batch, frames, height, fine)
    cols = sx.reshape(batch, frames, width, fine)
    row_pairs = (rows[..., :, None] == rows[..., None, :]).sum(dim=(-1, -2)).float()  # (B, F, height)
    col_pairs = (cols[..., :, None] == cols[..., None, :]).sum(dim=(-1, -2)).float()  # (B, F, width)
    variance = row_pairs[..., :, None] * col_pairs[..., None, :]  # (B, F, height, width)
    return sums / variance.sqrt()[:, None]


def warped_noise_batch(
    channels: int, height: int, width: int, paths: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """(B, C, F, height, width) warped noise along paths (B, F, 3), drawn on the generator's device."""
    fine, grid = motion_noise.FINE, motion_noise.CANVAS
    shape = (len(paths), channels, grid * fine * height, grid * fine * width)
    canvas = torch.randn(shape, generator=generator, device=generator.device)
    return warp_canvases(canvas, paths, height, width)


# 4. Checkpoints and export


def save_checkpoint(config: MotionTrainConfig, state: MotionState, rngs: dict) -> None:
    payload = {
        "motion": {
            k: v for k, v in state.unet.state_dict().items() if "motion_modules" in k or "motion_text" in k
        },
        "text_encoder": state.text_encoder.state_dict(),
        "ema": state.ema,
        "optimizer": state.optimizer.state_dict(),
        "schedule": state.schedule.state_dict(),
        "step": state.step,
        "python_rng": rngs["python"].getstate(),
        "torch_rng": rngs["torch"].get_state(),
        "global_torch_rng": torch.get_rng_state(),
        "device_rng": rngs["device"].get_state() if "device" in rngs else None,
        "progress": state.clock.get("progress", 0.0),
    }
    path = config.checkpoint_dir / "motion.pt"
    torch.save(payload, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)  # atomic: a kill mid-write keeps the previous checkpoint
    logger.info("checkpoint saved at step %d", state.step)


def load_checkpoint(config: MotionTrainConfig, state: MotionState, rngs: dict) -> bool:
    path = config.checkpoint_dir / "motion.pt"
    if not path.exists():
        return False
    payload = torch.load(path, weights_only=False, map_location=config.device)
    state.unet.load_state_dict(payload["motion"], strict=False)
    state.text_encoder.load_state_dict(payload["text_encoder"])
    with torch.no_grad():
        for e, saved in zip(state.ema, payload["ema"], strict=True):
            e.copy_(saved)
    state.optimizer.load_state_dict(payload["optimizer"])
    state.schedule.load_state_dict(payload["schedule"])
    state.step = payload["step"]
    rngs["python"].setstate(payload["python_rng"])
    rngs["torch"].set_state(payload["torch_rng"])
    torch.set_rng_state(payload["global_torch_rng"])
    if "device" in rngs and payload.get("device_rng") is not None:
        rngs["device"].set_state(payload["device_rng"])
    state.clock["progress"] = payload.get("progress", 0.0)
    logger.info("resumed at step %d", state.step)
    return True


def init_from(path: Path, state: MotionState) -> int:
    """Start from another run's weights (motion modules, text encoder, conditioning head; a fresh
    optimizer and EMA): a motion.pt checkpoint, or an exported model folder (its fp16 weights).

    Used to add the motion text conditioning to a run trained without it (the new part starts at
    zero, so the model starts exactly where that run was), and to fine-tune the committed model on
    warped noise."""
    if path.is_dir():
        payload = exported_weights(path)
    else:
        payload = torch.load(path, weights_only=False, map_location="cpu")
    missing, unexpected = state.unet.load_state_dict(payload["motion"], strict=False)
    assert not unexpected, unexpected
    state.text_encoder.load_state_dict(payload["text_encoder"])
    with torch.no_grad():
        for e, p in zip(state.ema, state.trained(), strict=True):
            e.copy_(p)
    logger.info("initialised from %s (its step %d)", path, payload["step"])
    return int(payload["step"])


def exported_weights(folder: Path) -> dict:
    """An exported model folder's weights in the checkpoint's layout (fp32), step from its split file."""
    from safetensors.torch import load_file

    adapter = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    weights = {k: v.float() for k, v in adapter.items()}
    head = motion.load_motion_text(folder)
    if head is not None:
        weights |= {f"motion_text.{k}": v for k, v in head.state_dict().items()}
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32)
    split = json.loads((folder / SPLIT_FILE).read_text())
    return {"motion": weights, "text_encoder": encoder.state_dict(), "step": split.get("steps_done", 0)}


def export(
    config: MotionTrainConfig, state: MotionState, template: MotionAdapter, tokenizer: PreTrainedTokenizerBase
) -> None:
    """The EMA weights: adapter (fp16 safetensors) in the folder's root, text encoder and tokenizer
    in subfolders, and the held-out split in eval/ (the model card README.md is kept)."""
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    live = swap_in_ema(state)
    try:
        adapter = extract_adapter(state.unet, template)
        adapter.to(torch.float16).save_pretrained(out, safe_serialization=True)
        if getattr(state.unet, "motion_text", None) is not None:
            motion.save_motion_text(state.unet.motion_text, out)
        state.text_encoder.to(torch.float16).save_pretrained(out / "text_encoder", safe_serialization=True)
        state.text_encoder.to(torch.float32)
    finally:
        restore(state, live)
    tokenizer.save_pretrained(out / "tokenizer")
    (out / "eval").mkdir(exist_ok=True)
    split = {
        "held_out_triples": [list(t) for t in motion.held_out_triples()],
        "train_config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "steps_done": state.step,
    }
    (out / SPLIT_FILE).write_text(json.dumps(split, indent=2) + "\n")
    logger.info("motion model written to %s (step %d)", out, state.step)


# 5. The whole run


def run(config: MotionTrainConfig) -> None:
    started = time.time()
    torch.set_num_threads(config.cpu_threads)
    if config.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda, but torch sees no CUDA device")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes
    config.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    vae = AutoencoderKL.from_pretrained(config.base / "vae", torch_dtype=torch.float32).eval()
    scaling_factor = float(vae.config.scaling_factor)
    cache = config.checkpoint_dir / "latents.pt"
    payload = torch.load(cache, weights_only=False) if cache.exists() else None
    if payload is not None and len(payload["clips"]) == config.clips:
        clips, latents = payload["clips"], payload["latents"]
    else:
        clips, latents = encode_clips(config, vae)
        torch.save({"clips": clips, "latents": latents}, cache)
    del vae
    logger.info("%d clips, latents %s (%.0fs)", len(clips), tuple(latents.shape), time.time() - started)

    tokenizer = motion.build_motion_tokenizer()
    state, template = new_state(config, tokenizer)
    rngs = {"python": random.Random(config.seed + 4), "torch": torch.Generator().manual_seed(config.seed + 4)}
    if config.device != "cpu":
        rngs["device"] = torch.Generator(device=config.device).manual_seed(config.seed + 5)
    if not load_checkpoint(config, state, rngs) and config.init_from is not None:
        init_from(config.init_from, state)
    budget = training_budget(config, time.time() - started)
    state = train(config, clips, latents, scaling_factor, tokenizer, state, rngs, budget)
    export(config, state, template, tokenizer)
    logger.info(
        "done in %.1f min this session (step %d of %d)",
        (time.time() - started) / 60,
        state.step,
        config.steps,
    )


def training_budget(config: MotionTrainConfig, spent_s: float) -> float | None:
    """Seconds the training phase may take: `time_budget_s`, less if the whole run must end within
    `wall_budget_s` (`spent_s` already used, `eval_reserve_s` kept for export and evaluation)."""
    budgets = []
    if config.time_budget_s is not None:
        budgets.append(config.time_budget_s)
    if config.wall_budget_s is not None:
        budgets.append(config.wall_budget_s - spent_s - config.eval_reserve_s)
    if not budgets:
        return None
    budget = max(10.0, min(budgets))
    logger.info("training phase budget: %.0fs (%.0fs spent before it)", budget, spent_s)
    return budget


def evaluate_export(config: MotionTrainConfig, prompts: int, batch: int) -> dict:
    """The held-out evaluation (`motion_eval.evaluate_motion`, 20 steps, CFG 4, seeds 0 and 1) of the
    exported folder on `config.device`: reports for the first 7 (the test's), 14 (the model card's)
    and all `prompts` prompts (the first 2n clips of a run are the n-prompt run's)."""
    from genserve.toymodel.motion_eval import evaluate_motion, report_of

    report, results = evaluate_motion(
        prompts, base_dir=config.base, motion_dir=config.out, device=config.device, batch=batch
    )
    scores = {}
    for n in sorted({min(7, prompts), min(14, prompts), prompts}):
        sub = report_of(results[: 2 * n], report.seconds if n == prompts else 0.0)
        scores[f"prompts_{n}"] = asdict(sub)
        logger.info("held-out, %d prompts: %s", n, sub.summary())
    return scores


def pack(folder: Path, tar_path: Path) -> Path:
    """The exported folder as one uncompressed .tar (fp16 safetensors do not compress)."""
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path, "w") as tar:
        tar.add(folder, arcname=folder.name)
    logger.info("packed %s into %s (%.1f MB)", folder, tar_path, tar_path.stat().st_size / 2**20)
    return tar_path


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the built-in genserve-shapes-motion model.")
    parser.add_argument("--out", type=Path, default=MOTION_MODEL)
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("data/motion-checkpoints"))
    parser.add_argument("--base", type=Path, default=BASE_MODEL)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--clips", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument(
        "--init-from",
        type=Path,
        help="start from another run's motion.pt or a model folder (fresh optimizer)",
    )
    parser.add_argument("--lr", type=float)
    parser.add_argument("--text-lr", type=float)
    parser.add_argument("--warmup-steps", type=int)
    parser.add_argument("--cpu-threads", type=int, help="torch threads (default 1: the machine is shared)")
    parser.add_argument("--device", help="cpu (default) or cuda")
    parser.add_argument("--time-budget-s", type=float, help="wall-clock limit of the training phase")
    parser.add_argument(
        "--wall-budget-s", type=float, help="wall-clock limit of the whole run (training stops in time)"
    )
    parser.add_argument("--eval-reserve-s", type=float, help="seconds --wall-budget-s keeps for the end")
    parser.add_argument("--render-workers", type=int, help="processes drawing the clips")
    parser.add_argument("--log-every-s", type=float, help="seconds between progress lines (default 15)")
    parser.add_argument(
        "--eval-prompts", type=int, default=0, help="then run the held-out evaluation on N prompts (<= 40)"
    )
    parser.add_argument("--eval-batch", type=int, default=4, help="clips per pipeline call in the evaluation")
    parser.add_argument("--scores", type=Path, help="write the evaluation's scores here (JSON)")
    parser.add_argument("--tar", type=Path, help="pack the exported folder into this .tar")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    started = time.time()
    config = MotionTrainConfig(
        out=args.out, checkpoint_dir=args.checkpoint_dir, base=args.base, seed=args.seed
    )
    overrides = {
        "steps": args.steps,
        "clips": args.clips,
        "batch": args.batch,
        "cpu_threads": args.cpu_threads,
        "init_from": args.init_from,
        "lr": args.lr,
        "text_lr": args.text_lr,
        "warmup_steps": args.warmup_steps,
        "device": args.device,
        "time_budget_s": args.time_budget_s,
        "wall_budget_s": args.wall_budget_s,
        "eval_reserve_s": args.eval_reserve_s,
        "render_workers": args.render_workers,
        "log_every_s": args.log_every_s,
    }
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    logger.info("config: %s", config)
    run(config)
    if args.tar is not None:
        pack(config.out, args.tar)
    if args.eval_prompts:
        eval_started = time.time()
        scores = evaluate_export(config, args.eval_prompts, args.eval_batch)
        scores["eval_seconds"] = time.time() - eval_started
        scores["total_seconds"] = time.time() - started
        text = json.dumps(scores)
        print(text, flush=True)
        if args.scores is not None:
            args.scores.parent.mkdir(parents=True, exist_ok=True)
            args.scores.write_text(text + "\n")
    logger.info("all done in %.0fs", time.time() - started)


if __name__ == "__main__":
    main()

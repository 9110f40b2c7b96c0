"""Video denoiser step and VAE decode times of the real architectures, with random weights.

For each model: one denoising step with classifier-free guidance (batch 2) at its native shape, timed
as the median of `--repeats` CUDA-synchronised forwards after 2 warm-ups, next to the prediction of
`genserve.engine.video.plan` (scale 1, the H100-class reference) and their ratio; the VAE decode of
the clip's latents (batch 1, median of 2 runs, shared by models with the same VAE); and GPU-seconds
per second of video at the family's default steps and fps (`VIDEO_FAMILIES`). Models are built from
configs in code (nothing is downloaded), on the device, one at a time and freed after; an OOM or
other failure is recorded for that model and the run goes on. `h264_nvenc` is probed as well
(expected to fail on H100/H200, which have no NVENC).

| item | denoiser | native shape | latents (F, H, W) | tokens |
|---|---|---|---|---|
| ltx | LTXVideoTransformer3DModel defaults (2B, LTX-Video 0.9.x) | 121 frames 768x512 | 16x16x24 | 6,144 |
| animatediff | SD1.5 UNet2DConditionModel + MotionAdapter defaults | 16 frames 512x512 | 16x64x64 | 65,536 |
| svd | UNetSpatioTemporalConditionModel defaults, num_frames 25 (SVD-XT) | 25 frames 1024x576 | 25x72x128 | 230,400 |
| wan_1_3b | WanTransformer3DModel 12 heads x 128, ffn 8960, 30 layers | 81 frames 832x480 | 21x60x104 | 32,760 |
| wan_14b | WanTransformer3DModel defaults (40 heads, ffn 13824, 40 layers) | 81 frames 832x480 | 21x60x104 | 32,760 |

(SVD and AnimateDiff tokens are latent pixels, as `plan.latent_tokens` counts them.) `plan.py` has one
coefficient set per family, fitted to Wan 14B: the wan_1_3b ratio shows how far that is off for 1.3B.

Here (CPU, seconds; what the test runs):

    .venv/bin/python benchmarks/video_gpu_steps.py --tiny            # writes /tmp/...-tiny.json

On the GPU machine (torch 2.11 there; diffusers, pydantic and PyAV missing, so carried as wheels;
the whole run takes about 2-4 min of the 600 s limit, `--budget-seconds 420` stops starting models
after 7 min). Once, here, in the repository root:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl diffusers==0.42.1 importlib_metadata==10.2.0 pydantic==2.14.4 pydantic_core==2.50.5 \
      annotated_types==0.8.0 typing_inspection==0.4.5 typing_extensions==4.16.0 av==18.1.0
    du -sh .whl    # about 45 MB (av is 36 MB of it); with the tree (about 18 MB) under 64 MiB:
    git ls-files -co --exclude-standard -z | du -bc --files0-from=- | tail -1   # what travels
    # an untracked virtual environment (e.g. .venv-tv/) travels too: exclude it first
    # (echo /.venv-tv/ >> .git/info/exclude); drop av if still over (NVENC then "not probed")

then the device `run` with carry [".whl"], timeout_s 600, command:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit; set -o pipefail; python3 benchmarks/video_gpu_steps.py 2>&1 | tee $OUT/log; rc=$?; cp benchmarks/results/*-video-gpu-steps.json $OUT/; exit $rc

Bring the JSON back into benchmarks/results/ (its name: `<date>-<device-slug>-video-gpu-steps.json`).
`--only wan_1_3b,ltx` selects models; `--repeats` sets the timed forwards (default 3, 2 with --tiny).
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLLTXVideo,
    AutoencoderKLTemporalDecoder,
    AutoencoderKLWan,
    LTXVideoTransformer3DModel,
    MotionAdapter,
    UNet2DConditionModel,
    UNetMotionModel,
    UNetSpatioTemporalConditionModel,
    WanTransformer3DModel,
)

from genserve.bench.build import component
from genserve.bench.measure import synchronize, timed
from genserve.engine.speed.optimize import device_name, device_slug
from genserve.engine.video import encode
from genserve.engine.video.families import VIDEO_FAMILIES
from genserve.engine.video.plan import latent_tokens, video_seconds

RESULTS = Path(__file__).resolve().parent / "results"
WARMUPS = 2


@dataclass(frozen=True)
class Item:
    """One model to time: its denoiser and VAE (kind + constructor kwargs) and its shapes."""

    name: str
    family: str  # plan.py / VIDEO_FAMILIES family
    denoiser: str  # wan | ltx | svd | animatediff
    config: dict[str, Any]
    vae: str  # wan | ltx | svd | sd15
    vae_config: dict[str, Any]
    frames: int  # the clip in pixels (prediction, seconds of video)
    width: int
    height: int
    latent: tuple[int, int, int]  # (F, H, W) latents
    channels: int  # latent channels
    text: tuple[int, int]  # (tokens, width) of the text embedding; SVD: (1, image-embedding width)
    patch: tuple[int, int, int] = (1, 1, 1)  # (t, h, w) patch of the denoiser
    adapter_config: dict[str, Any] = field(default_factory=dict)  # AnimateDiff's MotionAdapter

    def tokens(self) -> int:
        f, h, w = self.latent
        return (f // self.patch[0]) * (h // self.patch[1]) * (w // self.patch[2])


# -- configs: real (diffusers defaults verified against the installed source) and tiny --------------

_WAN_1_3B = {"num_attention_heads": 12, "attention_head_dim": 128, "ffn_dim": 8960, "num_layers": 30}
_WAN_14B = {"num_attention_heads": 40, "attention_head_dim": 128, "ffn_dim": 13824, "num_layers": 40}
_WAN_COMMON = {
    "patch_size": (1, 2, 2),
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
}
_SVD_VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 768,
}


def real_items() -> list[Item]:
    wan = {"frames": 81, "width": 832, "height": 480, "latent": (21, 60, 104), "channels": 16}
    wan_rest = {"vae": "wan", "vae_config": {}, "text": (512, 4096), "patch": (1, 2, 2), **wan}
    return [
        Item("ltx", "ltx", "ltx", {}, "ltx", {}, 121, 768, 512, (16, 16, 24), 128, (128, 4096)),
        Item(
            "animatediff",
            "animatediff",
            "animatediff",
            component("sd15", "unet"),
            "sd15",
            component("sd15", "vae"),
            16,
            512,
            512,
            (16, 64, 64),
            4,
            (77, 768),
        ),
        Item(
            "svd",
            "svd",
            "svd",
            {**component("svd", "unet"), "num_frames": 25},
            "svd",
            _SVD_VAE,
            25,
            1024,
            576,
            (25, 72, 128),
            4,
            (1, 1024),
        ),
        Item("wan_1_3b", "wan", "wan", {**_WAN_COMMON, **_WAN_1_3B}, **wan_rest),
        Item("wan_14b", "wan", "wan", {**_WAN_COMMON, **_WAN_14B}, **wan_rest),
    ]


_TINY_UNET = {
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 16,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
_TINY_VAE_2D = {
    "block_out_channels": (32, 64),  # GroupNorm's 32 groups
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "layers_per_block": 1,
    "latent_channels": 4,
}
_TINY_WAN = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 16,
    "freq_dim": 16,
    "ffn_dim": 32,
    "num_layers": 1,
    "rope_max_seq_len": 32,
}


def tiny_items() -> list[Item]:
    """The same models in miniature: same classes and code path, small configs and shapes."""
    wan_vae = {"base_dim": 4, "z_dim": 16, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1}
    ltx_vae = {
        "latent_channels": 8,
        "block_out_channels": (8, 8, 8, 8),
        "decoder_block_out_channels": (8, 8, 8, 8),
        "layers_per_block": (1, 1, 1, 1, 1),
        "decoder_layers_per_block": (1, 1, 1, 1, 1),
        "spatio_temporal_scaling": (True, True, False, False),
        "decoder_spatio_temporal_scaling": (True, True, False, False),
        "patch_size": 1,
    }
    ltx = {
        "in_channels": 8,
        "out_channels": 8,
        "num_attention_heads": 2,
        "attention_head_dim": 8,
        "cross_attention_dim": 16,
        "num_layers": 1,
        "caption_channels": 16,
    }
    svd = {
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "sample_size": 8,
        "down_block_types": ("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        "up_block_types": ("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        "cross_attention_dim": 16,
        "num_attention_heads": (2, 4),
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 24,
        "num_frames": 3,
    }
    adapter = {
        "block_out_channels": (32, 64),
        "motion_layers_per_block": 1,
        "motion_num_attention_heads": 2,
        "motion_norm_num_groups": 8,
        "motion_max_seq_length": 8,
    }
    wan = {"frames": 5, "width": 32, "height": 32, "latent": (2, 4, 4), "channels": 16}
    wan_rest = {"vae": "wan", "vae_config": wan_vae, "text": (8, 16), "patch": (1, 2, 2), **wan}
    return [
        Item("ltx", "ltx", "ltx", ltx, "ltx", ltx_vae, 9, 64, 64, (2, 2, 2), 8, (8, 16)),
        Item(
            "animatediff",
            "animatediff",
            "animatediff",
            _TINY_UNET,
            "sd15",
            {**_TINY_VAE_2D, "up_block_types": ("UpDecoderBlock2D",) * 2},
            4,
            32,
            32,
            (4, 4, 4),
            4,
            (8, 16),
            adapter_config=adapter,
        ),
        Item(
            "svd",
            "svd",
            "svd",
            {**svd, "in_channels": 8},
            "svd",
            _TINY_VAE_2D,
            3,
            32,
            32,
            (3, 4, 4),
            4,
            (1, 16),
        ),
        Item("wan_1_3b", "wan", "wan", _TINY_WAN, **wan_rest),
        Item("wan_14b", "wan", "wan", {**_TINY_WAN, "num_layers": 2}, **wan_rest),
    ]


# -- building and running -------------------------------------------------------------------------


def build_denoiser(item: Item) -> torch.nn.Module:
    """`item`'s denoiser with random weights, created on the current default device."""
    if item.denoiser == "wan":
        return WanTransformer3DModel(**item.config)
    if item.denoiser == "ltx":
        return LTXVideoTransformer3DModel(**item.config)
    if item.denoiser == "svd":
        return UNetSpatioTemporalConditionModel(**item.config)
    if item.denoiser == "animatediff":
        unet = UNet2DConditionModel(**item.config)
        adapter = MotionAdapter(**item.adapter_config)
        model = UNetMotionModel.from_unet2d(unet, adapter)
        del unet, adapter
        return model
    raise ValueError(f"unknown denoiser {item.denoiser!r}")


def build_vae(item: Item) -> torch.nn.Module:
    classes = {
        "wan": AutoencoderKLWan,
        "ltx": AutoencoderKLLTXVideo,
        "svd": AutoencoderKLTemporalDecoder,
        "sd15": AutoencoderKL,
    }
    return classes[item.vae](**item.vae_config)


def step_call(item: Item, model: torch.nn.Module, device: str, dtype: torch.dtype) -> Callable[[], Any]:
    """One denoising step with classifier-free guidance: the denoiser on a batch of 2 (uncond + cond)."""
    f, h, w = item.latent
    batch, (text_tokens, text_width) = 2, item.text
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    t = torch.full((batch,), 500.0, device=device)
    if item.denoiser == "wan":
        x, text = randn(batch, item.channels, f, h, w), randn(batch, text_tokens, text_width)
        return lambda: model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)
    if item.denoiser == "ltx":
        x, text = randn(batch, f * h * w, item.channels), randn(batch, text_tokens, text_width)
        mask = torch.ones(batch, text_tokens, device=device, dtype=dtype)
        scale = (8 / 25, 32, 32)  # as LTXPipeline: (VAE temporal ratio / frame rate, spatial, spatial)
        return lambda: model(
            hidden_states=x,
            encoder_hidden_states=text,
            timestep=t,
            encoder_attention_mask=mask,
            num_frames=f,
            height=h,
            width=w,
            rope_interpolation_scale=scale,
            return_dict=False,
        )
    if item.denoiser == "svd":
        # latents concatenated with the conditioning image's latents: 2 x channels
        x, image = randn(batch, f, 2 * item.channels, h, w), randn(batch, text_tokens, text_width)
        # added_time_ids: fps - 1, motion bucket, noise augmentation (SVD-XT's defaults)
        time_ids = torch.tensor([[6.0, 127.0, 0.02]] * batch, device=device, dtype=dtype)
        return lambda: model(x, t, encoder_hidden_states=image, added_time_ids=time_ids, return_dict=False)
    if item.denoiser == "animatediff":
        x = randn(batch, item.channels, f, h, w)
        text = randn(batch, text_tokens, text_width).repeat_interleave(f, dim=0)  # as AnimateDiffPipeline
        return lambda: model(x, t, encoder_hidden_states=text, return_dict=False)
    raise ValueError(f"unknown denoiser {item.denoiser!r}")


def decode_call(item: Item, vae: torch.nn.Module, device: str, dtype: torch.dtype) -> Callable[[], Any]:
    """Decoding the clip's latents (batch 1) to frames, as each pipeline does."""
    f, h, w = item.latent
    gen = torch.Generator(device="cpu").manual_seed(1)
    if item.vae in ("wan", "ltx"):  # (1, C, F, H, W)
        z = torch.randn(1, item.channels, f, h, w, generator=gen).to(device=device, dtype=dtype)
        return lambda: vae.decode(z, return_dict=False)
    z = torch.randn(f, item.channels, h, w, generator=gen).to(device=device, dtype=dtype)  # frames as batch
    if item.vae == "svd":
        return lambda: vae.decode(z, num_frames=f, return_dict=False)
    return lambda: vae.decode(z, return_dict=False)


def median_time(fn: Callable[[], Any], device: str, warmups: int, repeats: int) -> tuple[float, list[float]]:
    with torch.inference_mode():
        for _ in range(warmups):
            fn()
        runs = [timed(fn, device)[0] for _ in range(repeats)]
    return statistics.median(runs), runs


def built(
    build: Callable[[Item], torch.nn.Module], item: Item, device: str, dtype: torch.dtype
) -> torch.nn.Module:
    """`build(item)` created on `device` directly in `dtype` (no float32 copy of a 14B model first), with
    the class's `_keep_in_fp32_modules` parameters in float32, as `from_pretrained(torch_dtype=...)` does."""
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        torch.manual_seed(0)
        with torch.device(device):
            model = build(item)
    finally:
        torch.set_default_dtype(previous)
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, param in model.named_parameters():
        if param.is_floating_point() and any(part in name.split(".") for part in keep):
            param.data = param.data.float()
    return model.eval()


def free(device: str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def peak_gb(device: str) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(torch.device(device)) / 1e9


def reset_peak(device: str) -> None:
    if torch.device(device).type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(torch.device(device))


def _error(exc: BaseException) -> str:
    kind = "OOM" if isinstance(exc, torch.OutOfMemoryError) else type(exc).__name__
    return f"{kind}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


def measure_step(item: Item, device: str, dtype: torch.dtype, repeats: int) -> dict[str, Any]:
    """Build the denoiser, time one CFG step; the model is freed before returning."""
    row: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch.")}
    model = None
    try:
        reset_peak(device)
        start = time.perf_counter()
        model = built(build_denoiser, item, device, dtype)
        synchronize(device)
        row["build_s"] = time.perf_counter() - start
        row["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        step, runs = median_time(step_call(item, model, device, dtype), device, WARMUPS, repeats)
        row.update(step_s=step, step_runs_s=runs, step_peak_gb=peak_gb(device))
    except Exception as exc:  # OOM or any failure: recorded, the run goes on
        row["step_error"] = _error(exc)
    finally:
        del model
        free(device)
    return row


def measure_decode(item: Item, device: str, dtype: torch.dtype) -> dict[str, Any]:
    """Build the VAE and time the clip's decode: the median of 2 runs (no warm-up)."""
    row: dict[str, Any] = {"decode_dtype": str(dtype).removeprefix("torch.")}
    vae = None
    try:
        reset_peak(device)
        vae = built(build_vae, item, device, dtype)
        decode, runs = median_time(decode_call(item, vae, device, dtype), device, 0, 2)
        row.update(decode_s=decode, decode_runs_s=runs, decode_peak_gb=peak_gb(device))
    except Exception as exc:
        row["decode_error"] = _error(exc)
    finally:
        del vae
        free(device)
    return row


def predict(item: Item) -> dict[str, Any]:
    """plan.py's figures for the item at scale 1 (the H100-class reference device)."""
    shape = (item.family, item.frames, item.width, item.height)
    decode = video_seconds(*shape, steps=0)
    return {
        "plan_tokens": latent_tokens(*shape),
        "predicted_step_s": video_seconds(*shape, steps=1) - decode,
        "predicted_decode_s": decode,
    }


def per_video_second(item: Item, row: dict[str, Any]) -> dict[str, Any]:
    family = VIDEO_FAMILIES[item.family]
    steps, fps = family.default_steps, family.default_fps
    seconds = item.frames / fps
    out: dict[str, Any] = {"native_steps": steps, "fps": fps, "video_seconds": seconds}
    out["predicted_gpu_s_per_video_s"] = (
        video_seconds(item.family, item.frames, item.width, item.height, steps) / seconds
    )
    if "step_s" in row:
        total = steps * row["step_s"] + row.get("decode_s", 0.0)
        out["gpu_s_per_video_s"] = total / seconds
        out["gpu_s_per_video_s_includes_decode"] = "decode_s" in row
    return out


def measure_item(
    item: Item, device: str, dtype: torch.dtype, repeats: int, decodes: dict[tuple, dict]
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "name": item.name,
        "family": item.family,
        "frames": item.frames,
        "width": item.width,
        "height": item.height,
        "latent": list(item.latent),
        "tokens": item.tokens(),
    }
    row.update(predict(item))
    row.update(measure_step(item, device, dtype, repeats))
    if "step_error" in row and not row["step_error"].startswith("OOM") and dtype == torch.bfloat16:
        fallback = measure_step(item, device, torch.float16, repeats)  # bf16 failed: try fp16
        row["bf16_error"] = row.pop("step_error")
        row.update(fallback)
    key = (item.vae, json.dumps(item.vae_config, sort_keys=True), item.latent, item.channels)
    if key not in decodes:  # models that share a VAE and latents share the decode figure
        decodes[key] = measure_decode(item, device, dtype)
    row.update(decodes[key])
    if "step_s" in row:
        row["ratio"] = row["step_s"] / row["predicted_step_s"]
    if "decode_s" in row:
        row["decode_ratio"] = row["decode_s"] / row["predicted_decode_s"]
    row.update(per_video_second(item, row))
    return row


def nvenc_probe() -> dict[str, Any]:
    try:
        import av

        version = av.__version__
    except Exception:
        version = None
    available = encode.nvenc_available()
    note = "" if version else "PyAV is missing: NVENC not probed (False means nothing)"
    return {"nvenc_available": available, "pyav": version, "note": note}


def table(rows: list[dict[str, Any]]) -> str:
    def num(value: Any, fmt: str) -> str:
        if isinstance(value, (int, float)):
            return format(value, fmt)
        return "-".rjust(int(fmt.split(".")[0]))

    lines = [
        f"{'model':<12} {'tokens':>8} {'s/step':>9} {'pred':>9} {'ratio':>7} {'decode s':>9} "
        f"{'pred dec':>9} {'GPU-s/video-s':>14} {'pred':>8}  note"
    ]
    for r in rows:
        note = r.get("step_error") or r.get("decode_error") or r.get("skipped") or ""
        lines.append(
            f"{r['name']:<12} {r['tokens']:>8} {num(r.get('step_s'), '9.4f')} {num(r['predicted_step_s'], '9.4f')} "
            f"{num(r.get('ratio'), '7.2f')} {num(r.get('decode_s'), '9.3f')} {num(r['predicted_decode_s'], '9.3f')} "
            f"{num(r.get('gpu_s_per_video_s'), '14.2f')} {num(r['predicted_gpu_s_per_video_s'], '8.2f')}  {note}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (seconds; the test)")
    parser.add_argument("--only", default="", help="comma-separated item names (default: all)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed forwards per step (default 3; 2 tiny)"
    )
    parser.add_argument("--budget-seconds", type=float, default=420.0, help="start no new item after this")
    parser.add_argument("--device", default=None, help="default: cuda if available (cpu with --tiny)")
    parser.add_argument("--out", type=Path, default=None, help="results JSON path")
    parser.add_argument(
        "--dtype", choices=["bfloat16", "float16", "float32"], default=None, help="default: bf16 on CUDA"
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default 1 with --tiny)")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or (1 if args.tiny else threads))  # tiny: 2 busy cores thrash
    try:
        return run(parser, args)
    finally:
        torch.set_num_threads(threads)


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()

    device = args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if args.dtype:
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    repeats = args.repeats or (2 if args.tiny else 3)
    items = tiny_items() if args.tiny else real_items()
    if args.only:
        wanted = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = sorted(set(wanted) - {item.name for item in items})
        if unknown:
            parser.error(f"unknown --only {', '.join(unknown)}; known: {', '.join(i.name for i in items)}")
        items = [item for item in items if item.name in wanted]

    slug, today = device_slug(device), date.today().isoformat()
    name = f"{today}-{slug}-video-gpu-steps" + ("-tiny" if args.tiny else "")
    out = args.out or (Path("/tmp") / f"{name}.json" if args.tiny else RESULTS / f"{name}.json")
    if args.tiny and out.resolve().parent == RESULTS:
        parser.error("tiny figures do not go into benchmarks/results/: give --out elsewhere")

    rows: list[dict[str, Any]] = []
    decodes: dict[tuple, dict] = {}
    for item in items:
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_seconds:
            row = {"name": item.name, "family": item.family, "tokens": item.tokens(), **predict(item)}
            row.update(
                per_video_second(item, row), skipped=f"budget: {elapsed:.0f} s > {args.budget_seconds:.0f} s"
            )
            rows.append(row)
            continue
        item_start = time.perf_counter()
        rows.append(measure_item(item, device, dtype, repeats, decodes))
        rows[-1]["item_wall_s"] = time.perf_counter() - item_start
        print(f"{item.name}: {json.dumps(rows[-1])}", flush=True)

    result: dict[str, Any] = {
        "benchmark": "video_gpu_steps",
        "date": today,
        "device": device_name(device),
        "device_slug": slug,
        "tiny": args.tiny,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "repeats": repeats,
        "cpu_threads": torch.get_num_threads(),
        "warmups": WARMUPS,
        "cfg_batch": 2,
        "prediction": "genserve.engine.video.plan at scale 1 (H100-class reference; one coefficient set per "
        "family, Wan's fitted to 14B); ratio = measured / predicted",
        "nvenc": nvenc_probe(),
        "results": rows,
        "total_s": time.perf_counter() - start,
        "command": "python "
        + " ".join(shlex.quote(a) for a in ["benchmarks/video_gpu_steps.py", *args.argv]),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()

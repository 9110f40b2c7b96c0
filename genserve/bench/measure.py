"""Measurement for `genserve bench`: timing, peak memory, the matmul peak, FLOPs counted."""

from __future__ import annotations

import contextlib
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from diffusers import DiffusionPipeline
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from genserve.bench.paths import initial_noise
from genserve.engine.conditioning.latents import decode_latents
from genserve.engine.conditioning.text import encode_conditioning
from genserve.engine.loop.guidance import predict_noise
from genserve.engine.loop.schedule import prepare_schedulers
from genserve.engine.models.registry import Family
from genserve.engine.models.samplers import build_scheduler
from genserve.schemas.generation import GenerationParams


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(torch.device(device))


def timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def weights_bytes(pipe: DiffusionPipeline) -> int:
    seen: set[int] = set()
    total = 0
    for module in pipe.components.values():
        if not isinstance(module, torch.nn.Module):
            continue
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            with contextlib.suppress(Exception):  # quantized tensor subclasses may not say
                total += tensor.numel() * tensor.element_size()
    return total


@contextlib.contextmanager
def peak_memory(pipe: DiffusionPipeline, device: str) -> Iterator[Callable[[], float]]:
    """Peak bytes of one run. CUDA: this pipeline's weights plus the activation peak of the run (the
    other pipeline's weights, resident for the comparison, are not counted). CPU: the process's max RSS."""
    cuda = torch.device(device).type == "cuda"
    result = [0.0]
    if cuda:
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(torch.device(device))
        before = torch.cuda.memory_allocated(torch.device(device))
    yield lambda: result[0]
    if cuda:
        synchronize(device)
        activations = torch.cuda.max_memory_allocated(torch.device(device)) - before
        result[0] = float(weights_bytes(pipe) + activations)
    else:
        result[0] = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB


def matmul_peak(device: str, dtype: torch.dtype, n: int) -> float:
    """TFLOP/s of an n x n x n matmul in `dtype` on `device`: the median of 5 timings of a few calls."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    calls = 10 if torch.device(device).type == "cuda" else 2
    for _ in range(2):
        a @ b
    samples = []
    for _ in range(5):
        seconds, _ = timed(lambda: [a @ b for _ in range(calls)], device)
        samples.append(seconds / calls)
    return 2 * n**3 / statistics.median(samples) / 1e12


def _cpu_sdpa_flops(
    query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    return sdpa_flop_count(query, key, value)


# FlopCounterMode has no formula for the CPU flash-attention kernel; its FLOPs are SDPA's.
_CUSTOM_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def count_flops(
    pipe: DiffusionPipeline, family: Family, params: GenerationParams, device: str, dtype: torch.dtype
) -> float:
    """FLOPs of one batch: text encoding + steps x one denoiser call + one VAE decode, counted on `pipe`."""
    cfg = params.cfg_scale > 1
    counters = {name: FlopCounterMode(display=False, custom_mapping=_CUSTOM_FLOPS) for name in "tud"}
    with torch.inference_mode():
        with counters["t"]:
            cond = encode_conditioning(pipe, family, [params], device)
        scheduler = build_scheduler(family, params.sampler, pipe.scheduler.config)
        _, timesteps = prepare_schedulers(pipe, family, scheduler, 1, params, device)
        latents = initial_noise(pipe, family, params).to(device=device, dtype=dtype)
        with counters["u"]:
            predict_noise(pipe, family, latents, timesteps[0], cond, cfg)
        with counters["d"]:
            decode_latents(pipe, family, latents)
    text, step, decode = (counters[k].get_total_flops() for k in "tud")
    return float(text + params.steps * step + decode)

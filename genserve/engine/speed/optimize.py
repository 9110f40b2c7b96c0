"""Speed levers, applied once to a freshly loaded pipeline before it serves anything.

Every lever is a field of `EngineOptimizations` (in the settings: `GENSERVE_OPTIMIZATIONS__<FIELD>`).
`None` and "auto" resolve per device and family: on CUDA to what the H100 measurements support
(docs/performance.md gives each lever, its default and why), on a CPU to off, except the VAE tiling
and slicing thresholds, which only bound memory. `apply_optimizations` changes the pipeline in place
and returns `AppliedOptimizations`: what it really did, for the logs and `genserve bench`.

The denoiser keeps its type and config (denoise.py reads `pipe.unet.config`): compilation replaces
only the instance's `forward`, with a `GatedForward` (gated.py): batches padded to buckets, one
compile per (rows bucket, latent size) at warm-up, eager for shapes warm-up never saw. Compiled
artifacts persist in `compile_cache_dir` (the inductor cache, plus a "mega-cache" file written after
warm-up), so a restarted worker reuses them instead of compiling again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from genserve.engine.errors import ModelLoadError
from genserve.engine.models.registry import Family
from genserve.engine.speed.deepcache import enable_deepcache
from genserve.engine.speed.gated import GatedForward, resolve_sdpa
from genserve.engine.speed.vae_decode import GuardedDecode

log = logging.getLogger(__name__)

COMPILE_MODES = ("auto", "off", "default", "reduce-overhead", "max-autotune-no-cudagraphs")
SDPA_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
VAE_MODES = ("auto", "on", "off")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class OptimizationError(ModelLoadError):
    """An optimization was asked for but cannot run here (e.g. fp8 without torchao or without a GPU)."""


@dataclass
class EngineOptimizations:
    """The speed levers; each one can be switched off. `None`/"auto": the device's default."""

    # auto: on, CPU included (UNet and VAE convolutions): on the 2-core CPU it made batched UNet
    # calls faster (benchmarks/cpu_layout_and_rows.py; single-image calls were within noise).
    channels_last: bool | None = None
    fuse_qkv: bool | None = None  # auto: on CUDA (one QKV matmul instead of three)
    sdpa_backend: str = "auto"  # auto (torch's choice) | flash | cudnn | efficient | math
    compile: str = "auto"  # auto: off on CPU; CUDA: reduce-overhead for sd15, default otherwise
    compile_vae: bool | None = None  # auto: on when the denoiser is compiled
    compile_backend: str = "inductor"  # "eager"/"aot_eager" only to debug the compile path
    compile_cache_dir: Path | None = None  # persistent compile caches (None: torch's temp dir)
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8)  # images per batch that compile; others pad up
    warm_sizes: tuple[str, ...] = ()  # "WxH" sizes warmed besides the native size
    fp16_safe_vae: bool = True  # decode in half precision with an fp32 redo of overflowed rows
    vae_tiling: str = "auto"  # auto: tile when width*height > vae_tile_above_pixels
    vae_tile_above_pixels: int = 1536 * 1536
    vae_tile_size: int = 1024  # pixels per tile side (tiles overlap by 25%)
    vae_slicing: str = "auto"  # auto: one image at a time when the batch's pixels > vae_slice_above_pixels
    vae_slice_above_pixels: int = 4 * 1024 * 1024
    deepcache: int = 0  # opt-in: full UNet every N steps, cached deep features between (0: off)
    fp8: bool = False  # opt-in: fp8 linear layers in the denoiser through torchao (SM 8.9+)
    # opt-in: one LoRA slot hot-swapped in place, padded to this rank (0: off), so a compiled denoiser
    # changes LoRA without recompiling (conditioning/lora.py HotswapAdapter; docs/performance.md)
    lora_hotswap_rank: int = 0

    def __post_init__(self) -> None:
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}; got {self.compile!r}")
        if self.sdpa_backend not in SDPA_BACKENDS:
            raise ValueError(
                f"sdpa_backend must be one of {', '.join(SDPA_BACKENDS)}; got {self.sdpa_backend!r}"
            )
        for name in ("vae_tiling", "vae_slicing"):
            if getattr(self, name) not in VAE_MODES:
                raise ValueError(f"{name} must be one of {', '.join(VAE_MODES)}; got {getattr(self, name)!r}")
        self.batch_buckets = tuple(sorted({int(b) for b in self.batch_buckets}))
        if not self.batch_buckets or self.batch_buckets[0] < 1:
            raise ValueError(f"batch_buckets must be positive integers; got {self.batch_buckets}")
        self.warm_sizes = tuple(self.warm_sizes)
        for size in self.warm_sizes:
            parse_size(size)
        if self.lora_hotswap_rank < 0:
            raise ValueError(f"lora_hotswap_rank must be >= 0 (0 is off); got {self.lora_hotswap_rank}")
        if self.deepcache < 0:
            raise ValueError(f"deepcache must be >= 0 (0 is off); got {self.deepcache}")
        if self.compile_cache_dir is not None:
            self.compile_cache_dir = Path(self.compile_cache_dir)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> EngineOptimizations:
        """From a plain mapping (settings, CLI `key=value` pairs): strings are parsed per field."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"unknown optimization(s) {', '.join(unknown)}; known: {', '.join(fields)}")
        return cls(**{name: _parse_field(name, fields[name].type, value) for name, value in values.items()})


def _parse_field(name: str, annotation: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    text = value.strip().lower()
    if annotation == "bool | None" and text == "auto":
        return None
    if annotation.startswith("bool"):
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise ValueError(
            f"{name}: expected true/false{'/auto' if 'None' in annotation else ''}, got {value!r}"
        )
    if annotation == "int":
        return int(text)
    if annotation.startswith("tuple[int"):
        return tuple(int(part) for part in re.split(r"[,\s]+", text) if part)
    if annotation.startswith("tuple[str"):
        return tuple(part for part in re.split(r"[,\s]+", text) if part)
    if annotation.startswith("Path"):
        return None if text in ("", "none") else Path(value)
    return text


def parse_size(text: str) -> tuple[int, int]:
    """'832x1216' -> (832, 1216)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"size {text!r} is not WIDTHxHEIGHT, e.g. 1024x1024")
    return int(match[1]), int(match[2])


def preferred_dtype(family: Family, device: str) -> torch.dtype:
    """The bf16/fp16 policy: fp32 on CPU; on CUDA bf16 for SD3 (trained in bf16; its MMDiT activations can
    overflow fp16) where the GPU has bf16, else fp16 (the UNets run in fp16 everywhere; same speed)."""
    if torch.device(device).type != "cuda":
        return torch.float32
    if family == "sd3" and native_bf16(device):
        return torch.bfloat16
    return torch.float16


def native_bf16(device: str) -> bool:
    """bf16 in hardware (Ampere or newer), not emulated."""
    dev = torch.device(device)
    return dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] >= 8


@dataclass(frozen=True)
class WarmupRun:
    """One generation to run during warm-up (before /readyz turns ready)."""

    width: int
    height: int
    num_images: int
    steps: int


@dataclass
class AppliedOptimizations:
    """What `apply_optimizations` did to one pipeline; `summary()` is for logs and the bench."""

    family: str
    device: str
    dtype: str
    channels_last: bool = False
    fuse_qkv: bool = False
    sdpa_backend: str = "auto"
    compile: str = "off"
    compile_vae: bool = False
    vae_decode: str = "as loaded"
    vae_tiling: str = "off"
    vae_slicing: str = "off"
    deepcache: int = 0
    fp8: bool = False
    batch_buckets: tuple[int, ...] = ()
    warm_sizes: tuple[tuple[int, int], ...] = ()
    cache_file: Path | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    denoiser_forward: GatedForward | None = field(default=None, repr=False)
    decoder_forward: GatedForward | None = field(default=None, repr=False)
    vae_decode_fn: GuardedDecode | None = field(default=None, repr=False)

    def warmup_plan(self, native_width: int, native_height: int) -> list[WarmupRun]:
        """The generations that compile every shape serving will use: each warm size at each batch bucket.

        Without compilation, one 1-image, 1-step run at the native size (first-call kernels).
        CUDA graphs record on the second call of a shape, hence 3 steps under reduce-overhead.
        """
        if self.compile == "off" and not self.compile_vae:
            return [WarmupRun(native_width, native_height, 1, 1)]
        sizes = list(dict.fromkeys([(native_width, native_height), *self.warm_sizes]))
        steps = 3 if self.compile == "reduce-overhead" else 1
        return [WarmupRun(w, h, images, steps) for w, h in sizes for images in self.batch_buckets]

    def finish_warmup(self) -> None:
        """After warm-up: new shapes run eagerly from now on, and the compile caches are saved."""
        for gate in (self.denoiser_forward, self.decoder_forward):
            if gate is not None:
                gate.seal()
        if self.cache_file is not None:
            save_compile_cache(self.cache_file)

    def compiled_shapes(self) -> int:
        return sum(len(g.shapes) for g in (self.denoiser_forward, self.decoder_forward) if g is not None)

    def summary(self) -> dict[str, Any]:
        data = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("denoiser_forward", "decoder_forward", "vae_decode_fn", "cache_file")
        }
        data["warm_sizes"] = [f"{w}x{h}" for w, h in self.warm_sizes]
        data["cache_file"] = str(self.cache_file) if self.cache_file else None
        data["compiled_shapes"] = self.compiled_shapes()
        if self.vae_decode_fn is not None:
            data["vae_fp32_redos"] = self.vae_decode_fn.fp32_redos
        return data


def apply_optimizations(
    pipe: DiffusionPipeline,
    family: Family,
    options: EngineOptimizations,
    device: str,
    dtype: torch.dtype,
) -> AppliedOptimizations:
    """Apply `options` to a freshly loaded pipeline, in place, once (before it is shared).

    Raises OptimizationError when an opt-in lever (fp8) cannot run on this machine.
    """
    start = time.perf_counter()
    cuda = torch.device(device).type == "cuda"
    applied = AppliedOptimizations(
        family=family,
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        batch_buckets=options.batch_buckets,
        warm_sizes=tuple(parse_size(s) for s in options.warm_sizes),
    )
    denoiser_name = "transformer" if family == "sd3" else "unet"
    denoiser = getattr(pipe, denoiser_name)
    vae = pipe.vae

    # 1. Weights: fused QKV first (fp8 then quantizes the fused projections), then fp8
    if _auto(options.fuse_qkv, cuda):
        denoiser.fuse_qkv_projections()
        vae.fuse_qkv_projections()
        applied.fuse_qkv = True
    if options.fp8:
        _quantize_fp8(denoiser, device)
        applied.fp8 = True

    # 2. Memory layout: NHWC for the convolutions (the SD3 transformer has one, the patch embedding)
    if options.channels_last is not False:
        if family != "sd3":
            denoiser.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
        applied.channels_last = True

    # 3. Attention kernel
    backends, applied.sdpa_backend, note = resolve_sdpa(options.sdpa_backend, device)
    if note:
        applied.notes.append(note)

    # 4. VAE decode: half precision without the fp32 upcast, tiling and slicing by size
    applied.vae_decode_fn = _optimize_vae(pipe, family, options, device, backends, applied)

    # 5. DeepCache (opt-in; UNet families only)
    use_deepcache = options.deepcache > 0 and family != "sd3"
    if options.deepcache > 0 and family == "sd3":
        applied.notes.append("deepcache: not applied (it needs a UNet; sd3 is a transformer)")
    inner: Callable[..., Any] = type(denoiser).forward.__get__(denoiser)
    if use_deepcache:
        inner = enable_deepcache(denoiser, options.deepcache)
        applied.deepcache = options.deepcache

    # 6. torch.compile, gated by shape, with persistent caches
    mode = resolve_compile_mode(options.compile, family, device)
    if mode != "off" and use_deepcache:
        applied.notes.append("compile: the UNet is not compiled with deepcache on (it runs eagerly)")
    compile_denoiser = mode != "off" and not use_deepcache
    compile_vae = mode != "off" if options.compile_vae is None else options.compile_vae
    if compile_denoiser or compile_vae:
        applied.cache_file = prepare_compile_cache(options.compile_cache_dir, device)
        _raise_recompile_limit(64)
    rows_buckets = tuple(sorted({r for b in options.batch_buckets for r in (b, 2 * b)}))
    compiled = None
    if compile_denoiser:
        compiled = _compile(inner, mode, options.compile_backend)
        applied.compile = mode
    if compiled is not None or backends is not None or use_deepcache:
        applied.denoiser_forward = GatedForward(
            inner,
            compiled=compiled,
            buckets=rows_buckets,
            sdpa=backends,
            cudagraphs=mode == "reduce-overhead" and compiled is not None,
            name=f"{family} {denoiser_name}",
        )
        denoiser.forward = applied.denoiser_forward
    if compile_vae:
        vae_mode = "max-autotune-no-cudagraphs" if mode == "max-autotune-no-cudagraphs" else "default"
        decoder_inner = type(vae.decoder).forward.__get__(vae.decoder)
        applied.decoder_forward = GatedForward(
            decoder_inner,
            compiled=_compile(decoder_inner, vae_mode, options.compile_backend),
            buckets=options.batch_buckets,
            name=f"{family} vae decoder",
        )
        vae.decoder.forward = applied.decoder_forward
        applied.compile_vae = True

    applied.seconds = time.perf_counter() - start
    return applied


def _auto(value: bool | None, default: bool) -> bool:
    return default if value is None else value


def resolve_compile_mode(mode: str, family: Family, device: str) -> str:
    """auto: off on CPU (inductor's CPU compile takes minutes and the CPU path is not the product).

    On CUDA, from the H100 measurements: SD1.5 is launch-bound at small batches (a 25-43 ms eager step
    against 14.3 ms under CUDA graphs), so reduce-overhead; SDXL and SD3 are compute-bound (224-351
    TFLOP/s eager), where default mode gains through fusion (SDXL step 60.4 -> 39.1 ms) without a
    CUDA-graph memory pool per shape. max-autotune is never automatic: it did not finish in 9 minutes.
    """
    if mode != "auto":
        return mode
    if torch.device(device).type != "cuda":
        return "off"
    return "reduce-overhead" if family == "sd15" else "default"


def _compile(fn: Callable[..., Any], mode: str, backend: str) -> Callable[..., Any]:
    if backend == "inductor":
        return torch.compile(fn, mode=mode, dynamic=False)
    return torch.compile(fn, backend=backend, dynamic=False)


def _raise_recompile_limit(limit: int) -> None:
    # Every (bucket, size) is one recompile of the same forward; torch's default limit is 8.
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), limit))


def _optimize_vae(
    pipe: DiffusionPipeline,
    family: Family,
    options: EngineOptimizations,
    device: str,
    backends: list[Any] | None,
    applied: AppliedOptimizations,
) -> GuardedDecode:
    vae = pipe.vae
    vae_dtype = next(vae.parameters()).dtype
    half = vae_dtype in (torch.float16, torch.bfloat16)
    if options.fp16_safe_vae and half:
        target = vae_dtype
        if family == "sdxl" and vae_dtype == torch.float16 and native_bf16(device):
            # bf16 has fp32's exponent range: the stock SDXL VAE cannot overflow in it, unlike fp16.
            target = torch.bfloat16
            vae.to(target)
        vae.register_to_config(force_upcast=False)  # denoise.decode_latents upcasts only if this is set
        applied.vae_decode = f"{str(target).removeprefix('torch.')}, fp32 redo of overflowed rows"
    elif half and getattr(vae.config, "force_upcast", False):
        applied.vae_decode = "fp32 (force_upcast)"
    else:
        applied.vae_decode = str(vae_dtype).removeprefix("torch.")
    tile = options.vae_tile_size
    vae.tile_sample_min_size = tile
    vae.tile_latent_min_size = tile // pipe.vae_scale_factor
    applied.vae_tiling = (
        f"above {options.vae_tile_above_pixels} px, {tile}px tiles"
        if options.vae_tiling == "auto"
        else options.vae_tiling
    )
    applied.vae_slicing = (
        f"above {options.vae_slice_above_pixels} px per batch"
        if options.vae_slicing == "auto"
        else options.vae_slicing
    )
    decode = GuardedDecode(
        vae,
        scale_factor=pipe.vae_scale_factor,
        tiling=options.vae_tiling,
        tile_above_pixels=options.vae_tile_above_pixels,
        slicing=options.vae_slicing,
        slice_above_pixels=options.vae_slice_above_pixels,
        check_finite=options.fp16_safe_vae and half,
        sdpa=backends,
    )
    vae.decode = decode
    return decode


# fp8


def _quantize_fp8(denoiser: torch.nn.Module, device: str) -> None:
    """fp8 (e4m3) weights and dynamically scaled fp8 activations for the denoiser's large linear layers."""
    if torch.device(device).type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise OptimizationError("fp8 needs an NVIDIA GPU with compute capability 8.9 or newer (Ada, Hopper)")
    try:
        import torchao.quantization as quantization
    except ImportError as error:
        raise OptimizationError(
            "fp8 needs torchao, which is not installed: pip install torchao (or set fp8 off)"
        ) from error
    if hasattr(quantization, "Float8DynamicActivationFloat8WeightConfig"):
        config = quantization.Float8DynamicActivationFloat8WeightConfig()
    else:  # torchao < 0.10
        config = quantization.float8_dynamic_activation_float8_weight()

    def large_linear(module: torch.nn.Module, _name: str) -> bool:
        # fp8 GEMMs need dimensions divisible by 16; small layers lose more to scaling than they gain.
        return (
            isinstance(module, torch.nn.Linear)
            and module.in_features % 16 == 0
            and module.out_features % 16 == 0
            and module.in_features * module.out_features >= 1 << 20
        )

    quantization.quantize_(denoiser, config, filter_fn=large_linear)


# Persistent compile caches


def prepare_compile_cache(cache_dir: Path | None, device: str) -> Path | None:
    """Point inductor's caches at `cache_dir` and load a saved mega-cache; returns the mega-cache path.

    TORCHINDUCTOR_CACHE_DIR holds the FX graph cache, the AOTAutograd cache and Triton's kernels, so a
    restart on the same machine skips inductor. The mega-cache file (torch.compiler.save_cache_artifacts)
    bundles the same artifacts in one file that can travel to another machine with the same GPU and
    torch version. Dynamo still traces the model at every start (seconds, not minutes).
    """
    if cache_dir is None:
        return None
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str((cache_dir / "inductor").resolve())
    path = cache_dir / f"megacache-torch{torch.__version__}-{device_slug(device)}.bin"
    if path.is_file() and hasattr(torch.compiler, "load_cache_artifacts"):
        try:
            torch.compiler.load_cache_artifacts(path.read_bytes())
            log.info("loaded compile cache artifacts from %s", path)
        except Exception as error:  # noqa: BLE001 - a stale cache must never stop a model from loading
            log.warning("could not load compile cache %s: %s", path, error)
    return path


def save_compile_cache(path: Path) -> bool:
    """Write everything compiled in this process so far to `path` (atomically); False if unsupported."""
    if not hasattr(torch.compiler, "save_cache_artifacts"):
        return False
    try:
        artifacts = torch.compiler.save_cache_artifacts()
    except Exception as error:  # noqa: BLE001 - saving is an optimization
        log.warning("could not save compile cache artifacts: %s", error)
        return False
    if not artifacts or not artifacts[0]:
        return False
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(artifacts[0])
    tmp.replace(path)
    return True


def device_slug(device: str) -> str:
    """A file-name-safe device name: the GPU's name on CUDA, the CPU model elsewhere."""
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or platform.machine() or "cpu"

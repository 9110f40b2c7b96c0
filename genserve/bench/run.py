"""`genserve bench`: plain diffusers against genserve's engine, in one process, on the same inputs.

For each model and batch size:
  1. build the real architecture with random weights (or a tiny one), once; genserve's copy gets its own
     denoiser and VAE (deep copies) and `apply_optimizations`, the plain copy stays as diffusers made it
  2. first calls of each path: diffusers' warm-up, genserve's compile and warm-up
  3. accuracy: genserve's final latents against the eager path's (the same loop, `denoise_batch`, on
     the unoptimized pipeline) on the same inputs: same prompt, same CPU-seeded initial noise, same
     scheduler; relative L2 must be <= 2e-2 (lossy opt-ins, DeepCache and fp8, are reported only)
  4. timing: `pipe(...)` and genserve's `denoise_batch`, alternating, `repeats` times each; medians
  5. FLOPs, counted with FlopCounterMode on the eager modules: the text encoders once, one denoiser
     call (CFG rows) times the steps, one VAE decode; achieved TFLOP/s and the percentage of the
     square-matmul peak measured in the same run
Results go to <out>/<date>-<device>-bench-<tag>.json and .md (report.py); the tag defaults to the models.
The two paths are in paths.py, the measurements in measure.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import DiffusionPipeline

from genserve.bench.build import DEFAULT_STEPS, MODELS, build
from genserve.bench.measure import count_flops, matmul_peak, peak_memory, synchronize, timed
from genserve.bench.paths import (
    ACCURACY_LIMIT,
    clone_pipeline,
    engine_latents,
    initial_noise,
    relative_l2,
    run_diffusers,
    run_engine,
)
from genserve.engine.loop.previews import LatentRgbMap, fit_latent_rgb_map
from genserve.engine.models.loading import DTYPES, resolve_device
from genserve.engine.models.registry import Family
from genserve.engine.speed.optimize import (
    EngineOptimizations,
    apply_optimizations,
    device_name,
    preferred_dtype,
)
from genserve.schemas.generation import DEFAULT_CFG_SCALE, GenerationParams

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
SEED = 1234


class BenchError(Exception):
    """The benchmark cannot run as asked (e.g. full-size models on a CPU)."""


@dataclass
class BenchConfig:
    models: list[str]
    batches: list[int]
    steps: int | None = None  # None: each model's usual count (30; 28 for SD3)
    repeats: int = 3
    tiny: bool = False
    cfg_scale: float = 7.0
    size: tuple[int, int] | None = None  # None: each model's native size
    device: str = "auto"
    dtype: str = "auto"  # auto: preferred_dtype per family (fp16; bf16 for SD3; fp32 on CPU)
    options: dict[str, Any] = field(default_factory=dict)  # EngineOptimizations fields
    compile_cache_dir: Path | None = None  # None: a directory under the system temp dir
    fresh_cache: bool = False  # empty the compile cache first (a cold start)
    restart: bool = False  # measure a restarted process's time to ready, with the caches just written
    tag: str | None = None  # results file name suffix (None: the models, e.g. "sd15-sdxl")

    def command_line(self, threads: int | None = None) -> str:
        """The `genserve bench` command that reproduces this run (recorded with the results)."""
        parts = [
            "genserve bench",
            f"--models {','.join(self.models)}",
            f"--batch {','.join(map(str, self.batches))}",
        ]
        parts += [f"--steps {self.steps}"] if self.steps else []
        parts += [f"--repeats {self.repeats}", f"--cfg-scale {self.cfg_scale:g}"]
        parts += ["--tiny"] if self.tiny else []
        parts += [f"--size {self.size[0]}x{self.size[1]}"] if self.size else []
        parts += [f"--device {self.device}"] if self.device != "auto" else []
        parts += [f"--dtype {self.dtype}"] if self.dtype != "auto" else []
        parts += [f"--opt {key}={value}" for key, value in self.options.items()]
        parts += ["--fresh-cache"] if self.fresh_cache else []
        parts += ["--restart"] if self.restart else []
        parts += [f"--tag {self.tag}"] if self.tag else []
        parts += [f"--threads {threads}"] if threads else []
        return " ".join(parts)


@dataclass
class PathResult:
    path: str  # "diffusers" | "genserve"
    seconds_per_batch: float
    seconds_per_image: float
    images_per_hour: float
    tflops: float  # achieved: counted FLOPs / median time
    percent_of_peak: float
    speedup: float  # over the diffusers path
    peak_memory_gib: float
    first_call_s: float  # diffusers: warm-up; genserve: compile + warm-up of this shape
    times_s: list[float]


@dataclass
class CaseResult:
    model: str
    resolution: str
    batch: int
    steps: int
    dtype: str
    flops_per_batch: float
    diffusers: PathResult
    genserve: PathResult
    rel_l2_vs_eager: float  # genserve optimized vs genserve eager, final latents
    rel_l2_eager_vs_diffusers: float  # genserve's loop vs diffusers' pipeline, both eager
    accuracy_passed: bool | None  # None: lossy opt-in, reported only


@dataclass
class ModelResult:
    model: str
    family: str
    dtype: str
    denoiser_params: int
    note: str
    apply_s: float
    applied: dict[str, Any]
    restart_ready_s: float | None = None
    restart_shapes: int | None = None


@dataclass
class BenchReport:
    date: str
    device: str
    device_type: str
    torch: str
    diffusers: str
    python: str
    threads: int
    matmul_peak_tflops: dict[str, float]  # dtype -> TFLOP/s of an n^3 matmul
    matmul_n: int
    compile_cache: str
    compile_cache_was_warm: bool
    command: str
    tag: str
    models: list[ModelResult] = field(default_factory=list)
    cases: list[CaseResult] = field(default_factory=list)
    interrupted: bool = False  # stopped early (Ctrl-C, `timeout --signal=INT`): the cases are those finished


def run_bench(config: BenchConfig, *, command: str = "", echo: Callable[[str], None] = print) -> BenchReport:
    device = resolve_device(config.device)
    cuda = torch.device(device).type == "cuda"
    if not cuda and not config.tiny:
        raise BenchError(
            "the full architectures on a CPU would take hours per image: use --tiny for the CPU smoke "
            "test, or run on a CUDA GPU"
        )
    unknown = [m for m in config.models if m not in MODELS]
    if unknown:
        raise BenchError(f"unknown model(s) {', '.join(unknown)}; expected {', '.join(MODELS)}")
    EngineOptimizations.from_dict(config.options)  # fail on a bad option before building anything
    cache_dir = config.compile_cache_dir or Path(tempfile.gettempdir()) / "genserve-bench-compile-cache"
    if config.fresh_cache:
        shutil.rmtree(cache_dir, ignore_errors=True)
    cache_was_warm = cache_dir.is_dir() and any(cache_dir.iterdir())
    dtypes = {m: _dtype(config.dtype, MODELS[m], device) for m in config.models}
    matmul_n = 8192 if cuda else 1024
    peaks = {str(d).removeprefix("torch."): matmul_peak(device, d, matmul_n) for d in set(dtypes.values())}
    report = BenchReport(
        date=date.today().isoformat(),
        device=device_name(device),
        device_type=torch.device(device).type,
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        python=platform.python_version(),
        threads=torch.get_num_threads(),
        matmul_peak_tflops=peaks,
        matmul_n=matmul_n,
        compile_cache=str(cache_dir),
        compile_cache_was_warm=cache_was_warm,
        command=command,
        tag=config.tag or "-".join(config.models),
    )
    echo(f"device {report.device}; matmul peak {', '.join(f'{k} {v:.3g}' for k, v in peaks.items())} TFLOP/s")
    try:
        for model in config.models:
            run_model(config, model, device, dtypes[model], cache_dir, report, echo)
    except KeyboardInterrupt:
        # A time-boxed run keeps what it measured: on a lent GPU the minutes are the scarce thing.
        report.interrupted = True
        echo(f"interrupted: keeping the {len(report.cases)} case(s) finished")
    return report


def run_model(
    config: BenchConfig,
    model: str,
    device: str,
    dtype: torch.dtype,
    cache_dir: Path,
    report: BenchReport,
    echo: Callable[[str], None],
) -> None:
    # 1. Build both copies; optimize genserve's
    family = MODELS[model]
    built = build(model, tiny=config.tiny, device=device, dtype=dtype)
    plain = built.pipe
    optimized = clone_pipeline(plain, family)
    rgb_map = fit_latent_rgb_map(plain.vae, plain.vae_scale_factor)
    options = EngineOptimizations.from_dict({"compile_cache_dir": cache_dir, **config.options})
    applied = apply_optimizations(optimized, family, options, device, dtype)
    result = ModelResult(
        model=built.name,
        family=family,
        dtype=str(dtype).removeprefix("torch."),
        denoiser_params=built.denoiser_params,
        note=built.note,
        apply_s=applied.seconds,
        applied=applied.summary(),
    )
    report.models.append(result)
    echo(f"{built.name}: {built.denoiser_params / 1e6:.1f}M-parameter denoiser, {result.dtype}")
    width, height = config.size or (built.native, built.native)
    steps = config.steps or DEFAULT_STEPS[model]
    lossy = applied.deepcache > 0 or applied.fp8
    for batch in config.batches:
        params = GenerationParams(
            prompt=PROMPT,
            model=built.name,
            seed=SEED,
            steps=steps,
            cfg_scale=config.cfg_scale,
            width=width,
            height=height,
            num_images=batch,
            preview_every=0,
        )
        case = run_case(plain, optimized, family, params, device, dtype, rgb_map, config.repeats, report)
        case.model = built.name
        case.accuracy_passed = None if lossy else case.rel_l2_vs_eager <= ACCURACY_LIMIT
        report.cases.append(case)
        echo(
            f"  {width}x{height} batch {batch}: diffusers {case.diffusers.seconds_per_image:.3f} s/image, "
            f"genserve {case.genserve.seconds_per_image:.3f} s/image ({case.genserve.speedup:.2f}x), "
            f"rel L2 {case.rel_l2_vs_eager:.1e}"
        )
    applied.finish_warmup()  # saves the compile caches
    result.applied = applied.summary()

    # 6. A restarted process with the caches just written: time from loaded weights to warm
    if config.restart:
        probe = {
            "model": model,
            "tiny": config.tiny,
            "device": device,
            "dtype": result.dtype,
            "options": {**config.options, "compile_cache_dir": str(cache_dir)},
            "sizes": [[width, height]],
            "batches": config.batches,
            "steps": max(run.steps for run in applied.warmup_plan(width, height)),
            "threads": torch.get_num_threads(),
        }
        ready = restart_probe_subprocess(probe)
        result.restart_ready_s, result.restart_shapes = ready["ready_s"], ready["shapes"]
        echo(f"  restart: ready in {result.restart_ready_s:.1f} s ({result.restart_shapes} warm-up runs)")
    # Free this model before the next: compiled code and CUDA graphs hold its weights too.
    del plain, optimized, built, applied
    torch._dynamo.reset()
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def run_case(
    plain: DiffusionPipeline,
    optimized: DiffusionPipeline,
    family: Family,
    params: GenerationParams,
    device: str,
    dtype: torch.dtype,
    rgb_map: LatentRgbMap,
    repeats: int,
    report: BenchReport,
) -> CaseResult:
    noise = initial_noise(plain, family, params)

    def diffusers_run() -> Any:
        return run_diffusers(plain, family, params, noise, device, dtype)

    def genserve_run() -> Any:
        return run_engine(optimized, family, params, device, dtype, rgb_map)

    # 2. First calls: warm-up, and genserve's compilation of this shape
    diffusers_first, _ = timed(diffusers_run, device)
    genserve_first, _ = timed(genserve_run, device)

    # 3. Accuracy on the same inputs
    eager_latents = engine_latents(plain, family, params, device, dtype, rgb_map)
    optimized_latents = engine_latents(optimized, family, params, device, dtype, rgb_map)
    diffusers_latents = run_diffusers(plain, family, params, noise, device, dtype, output_type="latent")

    # 4. Timing, alternating
    times: dict[str, list[float]] = {"diffusers": [], "genserve": []}
    memory: dict[str, float] = {"diffusers": 0.0, "genserve": 0.0}
    for _ in range(repeats):
        for name, run, pipe in (("diffusers", diffusers_run, plain), ("genserve", genserve_run, optimized)):
            with peak_memory(pipe, device) as peak:
                seconds, _ = timed(run, device)
            times[name].append(seconds)
            memory[name] = max(memory[name], peak())

    # 5. FLOPs per batch, and the figures
    flops = count_flops(plain, family, params, device, dtype)
    peak_tflops = report.matmul_peak_tflops[str(dtype).removeprefix("torch.")]
    batch = params.num_images
    baseline = statistics.median(times["diffusers"])

    def figures(name: str, first: float) -> PathResult:
        seconds = statistics.median(times[name])
        tflops = flops / seconds / 1e12
        return PathResult(
            path=name,
            seconds_per_batch=seconds,
            seconds_per_image=seconds / batch,
            images_per_hour=3600 * batch / seconds,
            tflops=tflops,
            percent_of_peak=100 * tflops / peak_tflops,
            speedup=baseline / seconds,
            peak_memory_gib=memory[name] / 2**30,
            first_call_s=first,
            times_s=times[name],
        )

    return CaseResult(
        model=params.model or "",
        resolution=f"{params.width}x{params.height}",
        batch=batch,
        steps=params.steps,
        dtype=str(dtype).removeprefix("torch."),
        flops_per_batch=flops,
        diffusers=figures("diffusers", diffusers_first),
        genserve=figures("genserve", genserve_first),
        rel_l2_vs_eager=relative_l2(optimized_latents, eager_latents),
        rel_l2_eager_vs_diffusers=relative_l2(eager_latents, diffusers_latents.float().cpu()),
        accuracy_passed=None,
    )


# Restart: a fresh process with warm caches


def restart_probe_subprocess(probe: dict[str, Any]) -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, "-m", "genserve.bench.run", "--restart-probe", json.dumps(probe)],
        capture_output=True,
        text=True,
        check=False,
        timeout=3600,
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        raise BenchError(f"the restart probe failed: {completed.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


def restart_probe(probe: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: build, then time apply_optimizations + warm-up of the benchmarked shapes."""
    torch.set_num_threads(probe["threads"])
    device, family = probe["device"], MODELS[probe["model"]]
    dtype = DTYPES[probe["dtype"]]
    built = build(probe["model"], tiny=probe["tiny"], device=device, dtype=dtype)
    pipe = built.pipe
    rgb_map = fit_latent_rgb_map(pipe.vae, pipe.vae_scale_factor)
    synchronize(device)
    start = time.perf_counter()
    applied = apply_optimizations(
        pipe, family, EngineOptimizations.from_dict(probe["options"]), device, dtype
    )
    runs = 0
    for width, height in probe["sizes"]:
        for batch in probe["batches"]:
            params = GenerationParams(
                prompt="warmup", model=built.name, seed=0, steps=probe["steps"], width=width, height=height,
                num_images=batch, preview_every=0, cfg_scale=DEFAULT_CFG_SCALE,
            )  # fmt: skip
            run_engine(pipe, family, params, device, dtype, rgb_map)
            runs += 1
    applied.finish_warmup()
    synchronize(device)
    return {"ready_s": time.perf_counter() - start, "shapes": runs}


# Output


def _dtype(name: str, family: Family, device: str) -> torch.dtype:
    if name == "auto":
        return preferred_dtype(family, device)
    if name not in DTYPES:
        raise BenchError(f"unknown dtype {name!r}; expected auto or one of {', '.join(DTYPES)}")
    return DTYPES[name]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="genserve bench internals (use `genserve bench`)")
    parser.add_argument("--restart-probe", required=True, help="JSON probe description")
    args = parser.parse_args(argv)
    print(json.dumps(restart_probe(json.loads(args.restart_probe))))


if __name__ == "__main__":
    main()

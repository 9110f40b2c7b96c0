"""Preview overhead per denoising step, measured the way the worker pays it.

Runs the same request with previews off and on (every N steps), alternating, through the engine and
the real worker path (claim, engine, progress + preview events written to a SQLite job store, PNGs). Prints the
median seconds per step and the overhead of previews; writes a JSON result under benchmarks/results/.

    .venv/bin/python benchmarks/preview_overhead.py --models-dir models --model genserve-tiny
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

import genserve.engine.loop.denoise as denoise_module
from genserve.artifacts.images import ImageStore
from genserve.config import Settings
from genserve.engine.engine import Engine
from genserve.engine.models.registry import scan_models
from genserve.engine.speed.optimize import device_name
from genserve.schemas import GenerationParams
from genserve.store.jobs import JobStore
from genserve.worker.loop import ProgressReporter, Worker


class PreviewTimer:
    """Accumulates the time spent making previews: latent→RGB in the engine, JPEG in the worker."""

    def __init__(self) -> None:
        self.seconds = 0.0
        engine_module_preview = denoise_module.preview_images
        reporter_preview = ProgressReporter.preview
        denoise_module.preview_images = self.timed(engine_module_preview)  # benchmark-only instrumentation
        ProgressReporter.preview = self.timed(reporter_preview)

    def timed(self, function):  # noqa: ANN001, ANN201
        def wrapper(*args: object, **kwargs: object) -> object:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return wrapper


TIMER: PreviewTimer | None = None


def seconds_per_step(worker: Worker, store: JobStore, params: GenerationParams) -> float:
    """One job through the real worker path (claim, engine, events, PNG, completion)."""
    store.submit(params.model_dump())
    start = time.perf_counter()
    assert worker.run_next()
    return (time.perf_counter() - start) / params.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--model", default="genserve-tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--every", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    global TIMER
    TIMER = PreviewTimer()
    engine = Engine(scan_models(args.models_dir), threads=args.threads)
    engine.warmup(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(models_dir=args.models_dir, data_dir=Path(tmp), default_model=args.model)
        store = JobStore.from_url(settings.resolved_store_url)
        worker = Worker(settings, store, engine, ImageStore(settings.images_dir), "bench")
        base = GenerationParams(prompt="a red circle", model=args.model, seed=1, steps=args.steps)
        info = scan_models(args.models_dir)[args.model]
        base = base.model_copy(update={"width": info.native_width, "height": info.native_height})
        cadences = [0, *args.every]
        samples: dict[int, list[float]] = {n: [] for n in cadences}
        preview_seconds: dict[int, float] = dict.fromkeys(cadences, 0.0)
        for _ in range(args.repeats):
            for every in cadences:  # alternate so drift hits every variant alike
                params = base.model_copy(update={"preview_every": every})
                before = TIMER.seconds
                samples[every].append(seconds_per_step(worker, store, params))
                preview_seconds[every] += TIMER.seconds - before
    baseline = statistics.median(samples[0])
    rows = []
    for every in cadences:
        median = statistics.median(samples[every])
        overhead = 100 * (median - baseline) / baseline
        # The time spent inside preview code, per step, as a share of the previews-off step time:
        # immune to the run-to-run noise that the wall-clock difference above suffers from.
        inside = preview_seconds[every] / (args.repeats * args.steps)
        inside_pct = 100 * inside / baseline
        rows.append(
            {
                "preview_every": every,
                "median_s_per_step": median,
                "wall_clock_overhead_pct": overhead,
                "preview_s_per_step": inside,
                "preview_cost_pct_of_step": inside_pct,
            }
        )
        print(
            f"preview_every={every:>2}  {median * 1000:8.2f} ms/step  wall-clock {overhead:+6.2f}%  "
            f"inside preview code {inside * 1000:6.3f} ms/step = {inside_pct:5.2f}% of a step"
        )
    result = {
        "benchmark": "preview_overhead",
        "date": date.today().isoformat(),
        "device": platform.processor() or platform.machine(),
        "cpu": device_name("cpu"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": args.model,
        "size": f"{base.width}x{base.height}",
        "steps": args.steps,
        "repeats": args.repeats,
        "rows": rows,
        "command": "python benchmarks/preview_overhead.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}"
            for k, v in (("models_dir", args.models_dir), ("model", args.model))
        ),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{date.today().isoformat()}-cpu-preview-overhead-{args.model}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Idle gaps between consecutive batches under a full queue: the time the device waits while the
worker stores one batch's images, ends its jobs, and picks and claims the next batch.

A gap is measured from the moment a batch returns from the engine (its images are on the host, so
the device has nothing queued) to the moment the next batch enters the engine. The serving loop
(`Worker.work`) runs in three modes, alternating, in the same process, on the same queue:
- `sequential`: claim the next batch and finish this one inline (the loop before prefetching);
- `prefetch`: claim the next batch during this one's last step, finish inline (the CPU default);
- `prefetch_and_finisher`: also finish each batch on a second thread while the next one runs
  (`background_finish`, the default with a GPU).

    .venv/bin/python benchmarks/batch_idle_gap.py                        # built-in model, CPU
    python benchmarks/batch_idle_gap.py --random-model sd15 --batch 8 --steps 30      # on a GPU
    python benchmarks/batch_idle_gap.py --models-dir models --model my-model          # a model on disk

`--random-model sd15|sdxl|sd3` writes the real architecture with random weights (as `genserve bench`
builds it; fp16, bf16 for sd3) to a temporary models folder and serves it from there: the timing
does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import torch
from batching_throughput import TimedStore  # the sibling script (its folder is on sys.path)

from genserve.artifacts.images import ImageStore
from genserve.config import Settings
from genserve.engine.engine import Engine, engine_optimizations
from genserve.engine.models.registry import scan_models
from genserve.engine.speed.optimize import device_name, device_slug
from genserve.schemas import GenerationParams
from genserve.store.jobs import JobStore
from genserve.worker.loop import Worker


class GapClock:
    """Wraps Engine.generate_batch: records when each batch enters and leaves the engine."""

    def __init__(self, engine: Engine) -> None:
        self.inner = engine.generate_batch
        self.spans: list[tuple[float, float]] = []

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204 - same signature as the engine's
        entered = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # already idle (images are on the host); makes it explicit
            self.spans.append((entered, time.perf_counter()))

    def gaps_ms(self) -> list[float]:
        return [1000 * (nxt[0] - prev[1]) for prev, nxt in zip(self.spans, self.spans[1:], strict=False)]


def run_mode(engine: Engine, args: argparse.Namespace, prefetch: bool, background_finish: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            models_dir=args.models_dir,
            data_dir=Path(tmp),
            default_model=args.model,
            default_max_batch_images=args.batch,
            heartbeat_seconds=1.0,
            background_finish=background_finish,
            prefetch_batches=prefetch,
        )
        store = TimedStore(JobStore.from_url(settings.resolved_store_url).engine)
        worker = Worker(settings, store, engine, ImageStore(settings.images_dir), "bench")
        for i in range(args.requests):
            params = GenerationParams(
                prompt=f"a red star number {i}",
                model=args.model,
                seed=i,
                steps=args.steps,
                width=args.size,
                height=args.size,
                preview_every=0,
            )
            store.submit(params.model_dump())
        clock = GapClock(engine)
        engine.generate_batch = clock  # instance attribute: only this benchmark's engine
        TimedStore.reset()  # the time spent listing the queue and claiming batches
        try:
            start = time.perf_counter()
            worker.work(threading.Event(), until_idle=True)
            elapsed = time.perf_counter() - start
        finally:
            del engine.generate_batch
        assert store.counts_by_state()["succeeded"] == args.requests, store.counts_by_state()
    gaps = sorted(clock.gaps_ms())
    return {
        "batches": len(clock.spans),
        "seconds": elapsed,
        "scheduling_ms_per_batch": 1000 * TimedStore.scheduling_seconds / len(clock.spans),
        "scheduling_cpu_ms_per_batch": 1000 * TimedStore.scheduling_cpu_seconds / len(clock.spans),
        "gap_ms_median": statistics.median(gaps),
        "gap_ms_p95": gaps[min(len(gaps) - 1, int(0.95 * len(gaps)))],
        "gap_ms_max": gaps[-1],
    }


def write_random_model(model: str, folder: Path) -> Path:
    """The real `model` architecture with random weights, saved in diffusers format under folder/model."""
    from genserve.bench.build import build  # the bench's builders: architectures from shared/reference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if model == "sd3" else torch.float16
    built = build(model, tiny=False, device=device, dtype=dtype)
    built.pipe.save_pretrained(folder / model, safe_serialization=True)
    del built
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--model", default="genserve-shapes")
    parser.add_argument(
        "--random-model", choices=["sd15", "sdxl", "sd3"], help="serve this architecture, random weights"
    )
    parser.add_argument("--size", type=int, default=None, help="image side (default: the model's native)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4, help="images per batch")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    scratch = tempfile.TemporaryDirectory()
    if args.random_model:
        args.models_dir, args.model = (
            write_random_model(args.random_model, Path(scratch.name)),
            args.random_model,
        )
    models = scan_models(args.models_dir, builtin=True)
    args.size = args.size or models[args.model].native_width
    # The levers as the server reads them (GENSERVE_OPTIMIZATIONS__COMPILE=off and so on).
    levers = engine_optimizations(Settings(models_dir=args.models_dir, data_dir=Path(tempfile.mkdtemp())))
    engine = Engine(models, threads=args.threads, optimizations=levers)
    engine.warmup(args.model)
    modes = {  # name: (prefetch, background_finish)
        "sequential": (False, False),
        "prefetch": (True, False),
        "prefetch_and_finisher": (True, True),
    }
    rounds: dict[str, list[dict]] = {mode: [] for mode in modes}
    for _ in range(args.repeats):  # the modes alternate, so drift in machine speed hits them all
        for mode, (prefetch, background_finish) in modes.items():
            rounds[mode].append(run_mode(engine, args, prefetch, background_finish))
    results = {
        mode: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for mode, runs in rounds.items()
    }
    for mode, r in results.items():
        print(
            f"{mode:>21}: {r['batches']:.0f} batches in {r['seconds']:.2f} s; gap between batches "
            f"median {r['gap_ms_median']:.2f} ms, p95 {r['gap_ms_p95']:.2f} ms, max {r['gap_ms_max']:.2f} ms; "
            f"listing + claiming {r['scheduling_ms_per_batch']:.2f} ms per batch "
            f"({r['scheduling_cpu_ms_per_batch']:.2f} ms of CPU; medians of {args.repeats} rounds)"
        )
    device = device_name(engine.device)
    record = {
        "benchmark": "batch_idle_gap",
        "date": date.today().isoformat(),
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": args.model,
        "size": args.size,
        "requests": args.requests,
        "batch": args.batch,
        "steps": args.steps,
        "results": results,
        "rounds": rounds,
        "command": (
            "python benchmarks/batch_idle_gap.py "
            + (
                f"--random-model {args.random_model} "
                if args.random_model
                else f"--models-dir {args.models_dir} "
            )
            + f"--model {args.model} "
            f"--size {args.size} --requests {args.requests} --batch {args.batch} --steps {args.steps} "
            f"--repeats {args.repeats}"
        ),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = (
        args.out / f"{date.today().isoformat()}-{device_slug(engine.device)}-batch-idle-gap-{args.model}.json"
    )
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Cross-request batching: throughput of 16 concurrent single-image requests, batched vs one at a time.

The requests go through the real worker path (job store → scheduler policy → claim → engine batch →
PNGs → fenced completion) on a SQLite store, in this process. The two modes alternate, on the same
16 requests (different prompts, seeds and CFG). Also reports the scheduler's own cost per job:
time spent listing the queue, planning the batch and claiming it.

    .venv/bin/python benchmarks/batching_throughput.py            # the built-in default model
    .venv/bin/python benchmarks/batching_throughput.py --models-dir models --model my-model
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

from genserve.artifacts.images import ImageStore
from genserve.config import Settings
from genserve.engine.engine import Engine
from genserve.engine.models.registry import ModelInfo, scan_models
from genserve.engine.speed.optimize import device_name
from genserve.schemas import GenerationParams
from genserve.store.jobs import JobStore
from genserve.worker.loop import Worker


class TimedStore(JobStore):
    """Counts the time the worker spends choosing and claiming work (the scheduler's overhead):
    wall time, and the CPU time of the thread doing it. With prefetching the claim runs on a helper
    thread beside the batch, so its wall time stretches while the cores are busy; the CPU time is
    what it costs."""

    scheduling_seconds = 0.0
    scheduling_cpu_seconds = 0.0

    @classmethod
    def reset(cls) -> None:
        cls.scheduling_seconds = cls.scheduling_cpu_seconds = 0.0

    @classmethod
    def _count(cls, wall_start: float, cpu_start: float) -> None:
        cls.scheduling_seconds += time.perf_counter() - wall_start
        cls.scheduling_cpu_seconds += time.thread_time() - cpu_start

    def queued_jobs(self, limit: int = 500):  # noqa: ANN201
        wall_start, cpu_start = time.perf_counter(), time.thread_time()
        try:
            return super().queued_jobs(limit)
        finally:
            self._count(wall_start, cpu_start)

    def claim_jobs(self, job_ids, worker_id, lease_seconds):  # noqa: ANN001, ANN201
        wall_start, cpu_start = time.perf_counter(), time.thread_time()
        try:
            return super().claim_jobs(job_ids, worker_id, lease_seconds)
        finally:
            self._count(wall_start, cpu_start)


def run_round(
    engine: Engine, models_dir: Path, info: ModelInfo, requests: int, max_batch: int, steps: int
) -> dict:
    model = info.name
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            models_dir=models_dir,
            data_dir=Path(tmp),
            default_model=model,
            default_max_batch_images=max_batch,
            heartbeat_seconds=1.0,
        )
        store = TimedStore(JobStore.from_url(settings.resolved_store_url).engine)
        worker = Worker(settings, store, engine, ImageStore(settings.images_dir), "bench")
        for i in range(requests):
            params = GenerationParams(
                prompt=f"request {i}",
                model=model,
                seed=i,
                steps=steps,
                cfg_scale=3.0 + (i % 4),
                width=info.native_width,
                height=info.native_height,
                preview_every=0,
            )
            store.submit(params.model_dump())
        TimedStore.reset()
        start = time.perf_counter()
        worker.work(threading.Event(), until_idle=True)  # the serving loop, with this device's defaults
        elapsed = time.perf_counter() - start
        done = store.counts_by_state()["succeeded"]
        assert done == requests, store.counts_by_state()
        return {
            "seconds": elapsed,
            "scheduling_ms_per_job": 1000 * TimedStore.scheduling_seconds / requests,
            "scheduling_cpu_ms_per_job": 1000 * TimedStore.scheduling_cpu_seconds / requests,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--model", default="genserve-shapes")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    models = scan_models(args.models_dir, builtin=True)
    engine = Engine(models, threads=args.threads)
    engine.warmup(args.model)
    rounds: dict[str, list[dict]] = {"one_at_a_time": [], "batched": []}
    for _ in range(args.repeats):
        for mode, max_batch in (("one_at_a_time", 1), ("batched", args.requests)):
            rounds[mode].append(
                run_round(engine, args.models_dir, models[args.model], args.requests, max_batch, args.steps)
            )
    summary = {}
    for mode, results in rounds.items():
        seconds = statistics.median(r["seconds"] for r in results)
        summary[mode] = {
            "median_seconds": seconds,
            "images_per_second": args.requests / seconds,
            "scheduling_ms_per_job": statistics.median(r["scheduling_ms_per_job"] for r in results),
            "scheduling_cpu_ms_per_job": statistics.median(r["scheduling_cpu_ms_per_job"] for r in results),
        }
        print(
            f"{mode:>14}: {seconds:7.2f} s for {args.requests} requests = {args.requests / seconds:6.2f} images/s, "
            f"scheduler {summary[mode]['scheduling_ms_per_job']:.2f} ms/job "
            f"({summary[mode]['scheduling_cpu_ms_per_job']:.2f} ms of CPU)"
        )
    speedup = summary["batched"]["images_per_second"] / summary["one_at_a_time"]["images_per_second"]
    print(f"batching speed-up: {speedup:.2f}x")
    result = {
        "benchmark": "batching_throughput",
        "date": date.today().isoformat(),
        "device": "cpu",
        "cpu": device_name("cpu"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": args.model,
        "requests": args.requests,
        "steps": args.steps,
        "repeats": args.repeats,
        "summary": summary,
        "speedup": speedup,
        "rounds": rounds,
        "command": f"python benchmarks/batching_throughput.py --models-dir {args.models_dir} --model {args.model}",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{date.today().isoformat()}-cpu-batching-{args.model}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Prometheus metrics.

Workers run in their own processes, so metrics observed there (step times, images) use
prometheus_client's multiprocess mode: `genserve serve` points PROMETHEUS_MULTIPROC_DIR at a
directory under the data dir before anything imports this module. Queue depth and jobs by state are
read from the job store at scrape time, so they are true for every process and machine sharing it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

if TYPE_CHECKING:
    from genserve.store.jobs import JobStore

STEP_SECONDS = Histogram(
    "genserve_step_seconds",
    "Wall time of one denoising step of a whole batch, by model, resolution and rows in the batch.",
    ["model", "resolution", "batch"],
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
)
JOB_SECONDS = Histogram(
    "genserve_job_seconds",
    "Wall time from claim to finish of one job attempt.",
    ["model", "outcome"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
)
BATCH_IMAGES = Histogram(
    "genserve_batch_images",
    "Images per engine batch (cross-request batching).",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
)
BATCH_GAP_SECONDS = Histogram(
    "genserve_batch_gap_seconds",
    "Time the device waits between two back-to-back batches (the previous one returned from the "
    "engine, the next one entered it; gaps while the queue was empty are not counted).",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0),
)
QUEUE_WAIT_SECONDS = Histogram(
    "genserve_queue_wait_seconds",
    "Time from submit to claim, by queue.",
    ["queue"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900),
)
VIDEO_STAGE_SECONDS = Histogram(
    "genserve_video_stage_seconds",
    "Wall time of one stage of a video job (denoise, decode, stitch, post, interpolate, encode).",
    ["model", "stage"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900),
)
VIDEO_SECONDS_MADE = Counter(
    "genserve_video_seconds_total", "Seconds of video delivered (after interpolation).", ["model"]
)
IMAGES_GENERATED = Counter("genserve_images_generated_total", "Images written to the image store.", ["model"])
WORKER_RESTARTS = Counter("genserve_worker_restarts_total", "Worker processes restarted by the supervisor.")

# The model cache (engine/cache.py), observed in the workers.
MODEL_LOADS = Counter(
    "genserve_model_loads_total", "Models loaded from disk into a worker's cache.", ["model"]
)
MODEL_CACHE_REQUESTS = Counter(
    "genserve_model_cache_requests_total",
    "Model cache lookups: hit (on the device), offloaded_hit (moved back from CPU RAM) or miss (loaded).",
    ["model", "result"],
)
MODEL_LOAD_SECONDS = Histogram(
    "genserve_model_load_seconds",
    "Wall time of a model load on a cache miss, warmup included.",
    ["model"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300),
)
MODEL_EVICTIONS = Counter(
    "genserve_model_evictions_total",
    "Models evicted from the device (to CPU RAM) or from the cache (dropped).",
    ["model", "to"],
)

# GPUs, published by each worker (engine/gpu_metrics.py). Memory is per process, so live workers
# sharing a GPU add up; NVML readings are the device's own, so every worker reports the same value.
GPU_MEMORY_ALLOCATED = Gauge(
    "genserve_gpu_memory_allocated_bytes",
    "GPU memory held by tensors (torch.cuda.memory_allocated), summed over live workers.",
    ["gpu"],
    multiprocess_mode="livesum",
)
GPU_MEMORY_RESERVED = Gauge(
    "genserve_gpu_memory_reserved_bytes",
    "GPU memory reserved by torch's caching allocator (torch.cuda.memory_reserved), summed over live workers.",
    ["gpu"],
    multiprocess_mode="livesum",
)
GPU_UTILIZATION = Gauge(
    "genserve_gpu_utilization_percent",
    "Percent of the last sample period in which a kernel ran on the GPU (NVML).",
    ["gpu"],
    multiprocess_mode="livemax",
)
GPU_TEMPERATURE = Gauge(
    "genserve_gpu_temperature_celsius", "GPU die temperature (NVML).", ["gpu"], multiprocess_mode="livemax"
)
GPU_POWER = Gauge("genserve_gpu_power_watts", "GPU power draw (NVML).", ["gpu"], multiprocess_mode="livemax")


class StoreCollector:
    """Gauges read from the job store on each scrape."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def collect(self) -> Iterable[Metric]:
        counts = self.store.counts_by_state()
        depth = GaugeMetricFamily("genserve_queue_depth", "Jobs waiting to run, by queue.", labels=["queue"])
        for queue, count in sorted(self.store.queued_by_queue().items()):
            depth.add_metric([queue], count)
        yield depth
        by_state = GaugeMetricFamily("genserve_jobs", "Jobs in the store by state.", labels=["state"])
        for state, count in sorted(counts.items()):
            by_state.add_metric([state], count)
        yield by_state


class _ProcessCollector:
    """This process's own metrics, when not in multiprocess mode (the CLI, tests)."""

    def collect(self) -> Iterable[Metric]:
        from prometheus_client import REGISTRY

        yield from REGISTRY.collect()


def render_metrics(store: JobStore) -> bytes:
    """Prometheus text for this process, its workers (multiprocess files) and the store."""
    registry = CollectorRegistry()
    multiproc_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if multiproc_dir:
        MultiProcessCollector(registry, path=multiproc_dir)
    else:
        registry.register(_ProcessCollector())
    registry.register(StoreCollector(store))
    return generate_latest(registry)

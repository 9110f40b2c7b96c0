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

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

if TYPE_CHECKING:
    from genserve.store.jobs import JobStore

STEP_SECONDS = Histogram(
    "genserve_step_seconds",
    "Wall time of one denoising step (whole batch).",
    ["model"],
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
)
JOB_SECONDS = Histogram(
    "genserve_job_seconds",
    "Wall time from claim to finish of one job attempt.",
    ["model", "outcome"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
)
IMAGES_GENERATED = Counter("genserve_images_generated_total", "Images written to the image store.", ["model"])
WORKER_RESTARTS = Counter("genserve_worker_restarts_total", "Worker processes restarted by the supervisor.")


class StoreCollector:
    """Gauges read from the job store on each scrape."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def collect(self) -> Iterable[Metric]:
        counts = self.store.counts_by_state()
        depth = GaugeMetricFamily("genserve_queue_depth", "Jobs waiting to run.")
        depth.add_metric([], counts.get("queued", 0))
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

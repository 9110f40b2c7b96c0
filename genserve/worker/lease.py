"""Keeps the leases of the jobs a worker holds alive and notices cancellation, off the denoising hot path."""

from __future__ import annotations

import logging
import threading

from genserve.store.jobs import JobStore

log = logging.getLogger(__name__)


class JobCanceled(Exception):
    """Raised from a job's step callback when its cancellation was requested."""


class LeaseLost(Exception):
    """Raised from a job's step callback when another attempt owns the job now (reaped or fenced)."""


class LeaseKeeper:
    """One background thread per worker that renews the leases of every job the worker holds, in
    one transaction every `interval` seconds, and records cancel requests and lost leases per job.

    Step callbacks call `check(job_id)`, which only reads flags, so a slow store never stalls the
    GPU; a long model load or VAE decode keeps the leases because the thread runs regardless.
    The thread starts with the first job held and then serves every batch: starting one per batch
    cost milliseconds between batches while other threads held the GIL (benchmarks/batch_idle_gap.py).
    """

    def __init__(self, store: JobStore, worker_id: str, lease_seconds: float, interval: float) -> None:
        self.store = store
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self.interval = interval
        self._held: dict[str, int] = {}  # job_id -> attempt
        self._canceled: set[str] = set()
        self._lost: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, held: list[tuple[str, int]]) -> None:
        """Keep these (job_id, attempt) leases alive until `drop`. Holding a job again is a no-op."""
        with self._lock:
            for job_id, attempt in held:
                if self._held.get(job_id) != attempt:
                    self._held[job_id] = attempt
                    self._canceled.discard(job_id)
                    self._lost.discard(job_id)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
                self._thread.start()

    def drop(self, job_ids: list[str]) -> None:
        """Stop renewing these jobs' leases (they have ended, or were given back)."""
        with self._lock:
            for job_id in job_ids:
                self._held.pop(job_id, None)
                self._canceled.discard(job_id)
                self._lost.discard(job_id)

    def check(self, job_id: str) -> None:
        """Raise if this job must stop now. Called between denoising steps."""
        if job_id in self._lost:
            raise LeaseLost(f"job {job_id} lost its lease")
        if job_id in self._canceled:
            raise JobCanceled(job_id)

    def is_canceled(self, job_id: str) -> bool:
        """Whether a heartbeat found this job's cancel requested."""
        return job_id in self._canceled

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                watched = [
                    (job_id, attempt) for job_id, attempt in self._held.items() if job_id not in self._lost
                ]
            if not watched:
                continue
            try:
                results = self.store.heartbeat_many(self.worker_id, watched, self.lease_seconds)
            except Exception:  # a store hiccup must not kill the batch; the lease has slack
                log.warning("lease heartbeat failed", exc_info=True)
                continue
            with self._lock:
                for job_id, attempt in watched:
                    result = results[job_id]
                    if self._held.get(job_id) != attempt:
                        continue  # dropped (or held for a new attempt) while the heartbeat ran
                    if not result.owned:
                        self._lost.add(job_id)
                    elif result.cancel_requested:
                        self._canceled.add(job_id)

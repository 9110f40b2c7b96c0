"""Keeps a batch's leases alive and notices cancellation, off the denoising hot path."""

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
    """A background thread that renews the leases of a batch every `interval` seconds, in one
    transaction, and records cancel requests per job.

    Step callbacks call `check(job_id)`, which only reads flags, so a slow store never stalls the
    GPU; a long model load or VAE decode keeps the leases because the thread runs regardless.
    """

    def __init__(
        self,
        store: JobStore,
        worker_id: str,
        held: list[tuple[str, int]],
        lease_seconds: float,
        interval: float,
    ) -> None:
        self.store = store
        self.worker_id = worker_id
        self.held = list(held)  # (job_id, attempt)
        self.lease_seconds = lease_seconds
        self.interval = interval
        self.canceled: set[str] = set()
        self.lost: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            watched = [(job_id, attempt) for job_id, attempt in self.held if job_id not in self.lost]
            if not watched:
                return
            try:
                results = self.store.heartbeat_many(self.worker_id, watched, self.lease_seconds)
            except Exception:  # a store hiccup must not kill the batch; the lease has slack
                log.warning("lease heartbeat failed", exc_info=True)
                continue
            for job_id, result in results.items():
                if not result.owned:
                    self.lost.add(job_id)
                elif result.cancel_requested:
                    self.canceled.add(job_id)

    def check(self, job_id: str) -> None:
        """Raise if this job must stop now. Called between denoising steps."""
        if job_id in self.lost:
            raise LeaseLost(f"job {job_id} lost its lease")
        if job_id in self.canceled:
            raise JobCanceled(job_id)

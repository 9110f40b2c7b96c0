"""Keeps a claimed job's lease alive and notices cancellation, off the denoising hot path."""

from __future__ import annotations

import logging
import threading

from genserve.store.jobs import JobStore

log = logging.getLogger(__name__)


class JobCanceled(Exception):
    """Raised from the step callback when the job's cancellation was requested."""


class LeaseLost(Exception):
    """Raised from the step callback when another attempt owns the job now (reaped or fenced)."""


class LeaseKeeper:
    """A background thread that renews the lease every `interval` seconds and records cancel requests.

    The step callback calls `check()`, which only reads two flags, so a slow store never stalls
    the GPU. A long model load or VAE decode keeps the lease because the thread runs regardless.
    """

    def __init__(
        self,
        store: JobStore,
        job_id: str,
        worker_id: str,
        attempt: int,
        lease_seconds: float,
        interval: float,
    ) -> None:
        self.store = store
        self.job_id = job_id
        self.worker_id = worker_id
        self.attempt = attempt
        self.lease_seconds = lease_seconds
        self.interval = interval
        self.canceled = threading.Event()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id[:8]}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                result = self.store.heartbeat(self.job_id, self.worker_id, self.attempt, self.lease_seconds)
            except Exception:  # a store hiccup must not kill the job; the lease has slack
                log.warning("lease heartbeat failed", extra={"job_id": self.job_id}, exc_info=True)
                continue
            if not result.owned:
                self.lost.set()
                return
            if result.cancel_requested:
                self.canceled.set()

    def check(self) -> None:
        """Raise if the job must stop now. Called between denoising steps."""
        if self.lost.is_set():
            raise LeaseLost(f"job {self.job_id} attempt {self.attempt} lost its lease")
        if self.canceled.is_set():
            raise JobCanceled(self.job_id)

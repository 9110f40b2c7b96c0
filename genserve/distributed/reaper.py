"""The reaper, built into every API replica in multi-node mode (safe on several at once).

Every `reaper_seconds`: jobs whose lease expired go back to the queue (or fail after max_attempts,
in `JobStore.reap_expired`, with SKIP LOCKED and conditional updates, so two replicas never both
act on a job), and each requeued job gets a wake. Then the sweep: a queued, due job that has waited
`wake_sweep_seconds` since its last change or wake from this replica is woken again, which covers
wakes lost with the broker (a Redis restart) and jobs submitted without one (batch runs, retries).
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime

from genserve.config import Settings
from genserve.distributed.celery_app import publish_wake
from genserve.store.jobs import JobStore

log = logging.getLogger(__name__)


class Reaper:
    def __init__(self, settings: Settings, store: JobStore) -> None:
        self.settings = settings
        self.store = store
        self._woken: dict[str, float] = {}  # job id -> monotonic time of this replica's last sweep wake
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.reaper_seconds):
            try:
                self.reap_once()
            except Exception:
                log.exception("reaper failed")

    def reap_once(self) -> list[str]:
        """One pass; returns the ids woken."""
        reaped = self.store.reap_expired()
        if reaped:
            log.warning("requeued jobs with expired leases", extra={"jobs": reaped})
        stale = self._stale_queued()
        woken = list(dict.fromkeys(reaped + stale))
        publish_wake(self.settings, woken)
        return woken

    def _stale_queued(self) -> list[str]:
        now, wall = time.monotonic(), datetime.now(UTC)
        limit = self.settings.wake_sweep_seconds
        queued = self.store.queued_jobs(limit=500)
        stale = [
            job.id
            for job in queued
            if (wall - job.updated_at).total_seconds() > limit and now - self._woken.get(job.id, -1e9) > limit
        ]
        self._woken = {job_id: t for job_id, t in self._woken.items() if now - t <= limit}
        self._woken.update(dict.fromkeys(stale, now))
        return stale

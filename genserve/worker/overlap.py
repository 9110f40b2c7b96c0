"""Work the serving loop overlaps with the batch on the device, so the device does not wait between
batches: finishing the previous batch (BatchFinisher) and claiming the next one (BatchPrefetcher).

benchmarks/batch_idle_gap.py measures the gap between batches with and without them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from genserve.store.jobs import JobRecord, JobStore
from genserve.worker.lease import LeaseKeeper

log = logging.getLogger(__name__)


class BatchFinisher:
    """Stores a batch's images and ends its jobs, inline or on a background thread.

    In the background, the next batch reaches the GPU at once instead of waiting for PNG encoding
    and store writes. At most one batch is being finished at a time: `submit` first waits for the
    previous one, so a slow store slows the worker down instead of piling finished images up in
    memory.
    """

    def __init__(self, background: bool) -> None:
        self._executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-finisher") if background else None
        )
        self._pending: Future[None] | None = None

    def submit(self, finish: Callable[[], None]) -> None:
        if self._executor is None:
            finish()
            return
        self.wait()
        self._pending = self._executor.submit(finish)

    def wait(self) -> None:
        """Block until the batch being finished has ended its jobs."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def __enter__(self) -> BatchFinisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.wait()  # a worker that stops still stores what it generated
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)


class BatchPrefetcher:
    """Lists the queue and claims the next batch on a helper thread while the current batch ends.

    The worker calls `start` when the running batch begins its last denoising step, so listing and
    claiming (milliseconds, more with a remote PostgreSQL) overlap that step and the VAE decode.
    Starting that late, not when the batch begins, keeps the batch window: requests that arrive
    while a batch runs still join the next one.

    The claimed jobs' leases are renewed from the claim on. When the worker stops before running
    them, they are given back to the queue, and the claim does not count as an attempt.
    """

    def __init__(
        self,
        claim: Callable[[], list[JobRecord] | None],
        store: JobStore,
        leases: LeaseKeeper,
        enabled: bool,
    ) -> None:
        self.claim = claim
        self.store = store
        self.leases = leases
        self._executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-prefetch") if enabled else None
        )
        self._pending: Future[list[JobRecord] | None] | None = None

    def start(self) -> None:
        """Begin claiming the next batch, unless that has begun already (or prefetching is off)."""
        if self._executor is not None and self._pending is None:
            self._pending = self._executor.submit(self._claim_and_hold)

    def take(self) -> list[JobRecord] | None:
        """The prefetched batch, waiting for the claim if it is still under way. None or empty when
        nothing was prefetched, the queue was empty, or another worker claimed the jobs first."""
        if self._pending is None:
            return None
        pending, self._pending = self._pending, None
        return pending.result()

    def _claim_and_hold(self) -> list[JobRecord] | None:
        jobs = self.claim()
        if jobs:
            # A slow finish, or a batch retried job by job, can keep these waiting: renew their leases.
            self.leases.hold([(job.id, job.attempt) for job in jobs])
        return jobs

    def __enter__(self) -> BatchPrefetcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._executor is None:
            return
        try:
            self._give_back()
        except Exception:  # their leases run out instead, and the reaper requeues them
            log.warning("could not give prefetched jobs back", exc_info=True)
        finally:
            self._executor.shutdown(wait=True)

    def _give_back(self) -> None:
        """Requeue a prefetched batch the worker will not run (it is stopping)."""
        jobs = self.take()
        if not jobs:
            return
        self.leases.drop([job.id for job in jobs])
        held = [(job.id, job.attempt) for job in jobs]
        given_back = self.store.unclaim(self.leases.worker_id, held, "the worker stopped before running it")
        log.info("gave prefetched jobs back", extra={"jobs": given_back, "worker_id": self.leases.worker_id})

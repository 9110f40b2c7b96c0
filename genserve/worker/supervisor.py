"""Starts worker processes next to the API server and keeps them alive.

The engine runs in child processes so that a crash (a segfault, an OOM kill, kill -9) never takes the
API down. When a child dies, its running job goes back to the queue (attempts are counted by the store)
and a new child starts, with backoff if it keeps dying. The supervisor also runs the lease reaper,
which is safe to run in several processes at once.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.multiprocess import mark_process_dead

from genserve.config import Settings
from genserve.metrics import WORKER_RESTARTS
from genserve.store.jobs import JobStore

log = logging.getLogger(__name__)

CHECK_SECONDS = 0.25
REAP_SECONDS = 2.0
MAX_BACKOFF_SECONDS = 30.0


@dataclass
class WorkerSlot:
    index: int
    worker_id: str = ""
    process: subprocess.Popen | None = None
    restarts: int = 0
    next_start: float = 0.0  # monotonic time before which a crashed slot waits (backoff)
    started_at: float = field(default_factory=time.time)


def _pid_alive(pid: int) -> bool:
    """True while a process runs; a zombie (killed, not yet reaped) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust the signal check
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def recover_dead_local_workers(store: JobStore, exclude: set[str] = frozenset()) -> list[str]:
    """Requeue jobs of workers on this host whose process is gone (a server or batch run that died).

    Returns the requeued job ids. Workers on other hosts are left to the lease reaper.
    """
    host = socket.gethostname()
    requeued_all = []
    for worker in store.live_workers(max_age_seconds=None):
        if worker.host == host and worker.id not in exclude and not _pid_alive(worker.pid):
            requeued = store.requeue_owner(worker.id, "worker process gone")
            store.remove_worker(worker.id)
            if requeued:
                log.warning(
                    "requeued jobs of a dead worker", extra={"worker_id": worker.id, "jobs": requeued}
                )
            requeued_all.extend(requeued)
    return requeued_all


class Supervisor:
    def __init__(self, settings: Settings, store: JobStore, count: int) -> None:
        self.settings = settings
        self.store = store
        self.slots = [WorkerSlot(index=i) for i in range(count)]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._monitor, name="supervisor", daemon=True)

    def start(self) -> None:
        self.recover_dead_local_workers()
        for slot in self.slots:
            self._spawn(slot)
        self._thread.start()

    def recover_dead_local_workers(self) -> None:
        """Runs at start and then periodically: a killed worker may take a moment to exit."""
        recover_dead_local_workers(self.store, exclude={slot.worker_id for slot in self.slots})

    def _spawn(self, slot: WorkerSlot) -> None:
        slot.worker_id = f"{socket.gethostname()}:w{slot.index}:{uuid.uuid4().hex[:8]}"
        env = dict(os.environ)
        env["GENSERVE_WORKER_SETTINGS"] = self.settings.model_dump_json()
        env["GENSERVE_WORKER_ID"] = slot.worker_id
        slot.process = subprocess.Popen([sys.executable, "-m", "genserve.worker"], env=env)
        slot.started_at = time.time()
        log.info("worker spawned", extra={"worker_id": slot.worker_id, "pid": slot.process.pid})

    def _monitor(self) -> None:
        last_reap = 0.0
        while not self._stop.wait(CHECK_SECONDS):
            with self._lock:
                for slot in self.slots:
                    self._check(slot)
            if time.monotonic() - last_reap > REAP_SECONDS:
                last_reap = time.monotonic()
                try:
                    self.recover_dead_local_workers()
                    reaped = self.store.reap_expired()
                    if reaped:
                        log.warning("requeued jobs with expired leases", extra={"jobs": reaped})
                except Exception:
                    log.exception("lease reaper failed")

    def _check(self, slot: WorkerSlot) -> None:
        if slot.process is None:
            if time.monotonic() >= slot.next_start:
                self._spawn(slot)
            return
        code = slot.process.poll()
        if code is None or self._stop.is_set():
            return
        reason = f"worker process exited with code {code}"
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            mark_process_dead(slot.process.pid)  # its live gauges (GPU memory) stop counting
        requeued = self.store.requeue_owner(slot.worker_id, reason)
        self.store.remove_worker(slot.worker_id)
        WORKER_RESTARTS.inc()
        log.error(reason, extra={"worker_id": slot.worker_id, "jobs": requeued})
        # Back off when a worker dies young (a crash loop), restart at once otherwise.
        lived = time.time() - slot.started_at
        slot.restarts += 1
        delay = 0.0 if lived > 60 else min(MAX_BACKOFF_SECONDS, 0.5 * 2 ** min(slot.restarts, 6))
        slot.process = None
        slot.next_start = time.monotonic() + delay

    def status(self) -> list[dict]:
        with self._lock:
            return [
                {
                    "id": slot.worker_id,
                    "pid": slot.process.pid if slot.process else None,
                    "alive": slot.process is not None and slot.process.poll() is None,
                    "restarts": slot.restarts,
                }
                for slot in self.slots
            ]

    def stop(self, grace_seconds: float = 30.0) -> None:
        """SIGTERM the workers (they finish the job at hand), then kill stragglers and requeue their jobs."""
        self._stop.set()
        self._thread.join(timeout=5)
        running = [slot for slot in self.slots if slot.process and slot.process.poll() is None]
        for slot in running:
            slot.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        for slot in running:
            try:
                slot.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                slot.process.kill()
                slot.process.wait()
            self.store.requeue_owner(slot.worker_id, "server shut down")
            self.store.remove_worker(slot.worker_id)

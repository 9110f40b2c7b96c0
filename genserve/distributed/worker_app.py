"""The Celery side of a `genserve worker`: the wake task, the pool check, per-child setup, spot shutdown.

The main process never imports torch: the engine is built in the pool's one child process
(`worker_process_init`), which runs every delivery. The main process only handles signals.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from celery import Celery, signals

from genserve.config import Settings
from genserve.distributed.celery_app import WAKE_TASK, make_celery, model_queue, publish_wake

log = logging.getLogger("genserve.worker")

SUBSCRIBE_SECONDS = 1.0
RESUBSCRIBE_SECONDS = 30.0


class PoolRefused(SystemExit):
    """The worker was started with a pool that loses jobs on shutdown."""


def check_pool(pool: str, concurrency: int) -> None:
    """Only prefork with one child: solo and threads ack the running task on a soft shutdown, which loses the job."""
    if pool != "prefork" or concurrency != 1:
        raise PoolRefused(
            f"refusing pool={pool} concurrency={concurrency}: genserve workers run one per GPU with "
            "--pool prefork --concurrency 1 (solo/threads/gevent ack the running task on shutdown and lose the job)"
        )


class WorkerRuntime:
    """What one worker process (the Celery pool child) holds: settings, its worker id, and the Worker."""

    def __init__(self, settings: Settings, worker_id: str, app: Celery, node: str) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.app = app
        self.node = node  # the Celery node name, name@host
        self.worker: Any = None  # genserve.worker.loop.Worker, built in the child
        self._presence_stop = threading.Event()

    # -- the pool child -----------------------------------------------------------------------

    def start_child(self) -> None:
        from genserve.artifacts.s3 import make_image_store
        from genserve.engine.engine import engine_from_settings
        from genserve.engine.models.registry import registered_models
        from genserve.store.jobs import JobStore
        from genserve.worker.loop import Worker

        settings = self.settings
        store = JobStore.from_url(settings.resolved_store_url)
        if settings.redis_events_url:
            from genserve.events.redis_streams import RedisStreamEventLog

            store.events = RedisStreamEventLog(
                store.engine,
                settings.redis_events_url,
                maxlen=settings.event_stream_maxlen,
                ttl_seconds=settings.event_stream_ttl_seconds,
            )
        engine = engine_from_settings(registered_models(settings), settings)
        self.worker = Worker(settings, store, engine, make_image_store(settings), self.worker_id)
        metrics_port = int(os.environ.get("GENSERVE_WORKER_METRICS_PORT", "0"))
        if metrics_port:
            from prometheus_client import start_http_server

            start_http_server(metrics_port)
        self.worker.start()  # loads the default model, then announces "ready"
        threading.Thread(
            target=self.worker._announce_forever, args=(self._presence_stop,), daemon=True
        ).start()
        threading.Thread(target=self._follow_warm_models, daemon=True).start()
        log.info("worker ready", extra={"worker_id": self.worker_id, "device": engine.device})

    def _follow_warm_models(self) -> None:
        """Routing by model: consume `<queue>.model.<name>` exactly while `name` is loaded here.

        The pool child asks its own main process through Celery's remote control. Subscriptions are
        re-sent every RESUBSCRIBE_SECONDS, since a broadcast sent while the consumer starts is lost.
        """
        subscribed: set[str] = set()
        last_full = time.monotonic()
        while not self._presence_stop.wait(SUBSCRIBE_SECONDS):
            try:
                loaded = set(self.worker.engine.loaded_models())
                if time.monotonic() - last_full > RESUBSCRIBE_SECONDS:
                    subscribed, last_full = set(), time.monotonic()
                control = self.app.control
                for model in sorted(loaded - subscribed):
                    control.add_consumer(
                        model_queue(self.settings, model), destination=[self.node], reply=False
                    )
                for model in sorted(subscribed - loaded):
                    control.cancel_consumer(
                        model_queue(self.settings, model), destination=[self.node], reply=False
                    )
                subscribed = loaded
            except Exception:  # routing is an optimisation: the general queue still reaches this worker
                log.warning("could not update model queue subscriptions", exc_info=True)

    def stop_child(self) -> None:
        self._presence_stop.set()
        if self.worker is not None:
            try:
                self.worker.store.remove_worker(self.worker_id)
            except Exception:
                log.warning("could not remove the worker row", exc_info=True)

    def deliver(self, job_id: str) -> str:
        from genserve.distributed.delivery import run_delivery

        if self.worker is None:  # the pool child was not initialised (should not happen)
            self.start_child()
        return run_delivery(self.worker, job_id)

    # -- the main process ---------------------------------------------------------------------

    def on_shutdown_signal(self) -> None:
        """Spot pools: give the running job back if it has not finished within spot_shutdown_seconds."""
        seconds = self.settings.spot_shutdown_seconds
        if seconds is None:
            log.info("warm shutdown: the running job finishes first", extra={"worker_id": self.worker_id})
            return
        threading.Thread(target=self._release_after, args=(seconds,), daemon=True).start()

    def _release_after(self, seconds: float) -> None:
        from genserve.store.jobs import JobStore

        time.sleep(seconds)
        store = JobStore.from_url(self.settings.resolved_store_url)
        try:
            # The child's lease keeper sees the lease gone within heartbeat_seconds and stops the batch.
            requeued = store.requeue_owner(self.worker_id, "spot preemption")
        finally:
            store.close()
        if requeued:
            log.warning("requeued on shutdown", extra={"worker_id": self.worker_id, "jobs": requeued})
            publish_wake(self.settings, requeued)


def build_worker_app(settings: Settings, worker_id: str, node: str) -> Celery:
    """The Celery app of one worker, with the wake task and the lifecycle hooks connected."""
    app = make_celery(settings)
    runtime = WorkerRuntime(settings, worker_id, app, node)

    @app.task(name=WAKE_TASK, acks_late=True, reject_on_worker_lost=True)
    def wake(job_id: str) -> str:
        return runtime.deliver(job_id)

    @signals.worker_init.connect(weak=False)
    def _check(sender: Any = None, **_: Any) -> None:
        pool = getattr(sender, "pool_cls", "")
        name = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
        check_pool("prefork" if "prefork" in name else str(name), int(getattr(sender, "concurrency", 1)))

    @signals.worker_process_init.connect(weak=False)
    def _child_start(**_: Any) -> None:
        runtime.start_child()

    @signals.worker_process_shutdown.connect(weak=False)
    def _child_stop(**_: Any) -> None:
        runtime.stop_child()

    @signals.worker_shutting_down.connect(weak=False)
    def _shutting_down(**_: Any) -> None:
        runtime.on_shutdown_signal()

    app.genserve_runtime = runtime
    return app

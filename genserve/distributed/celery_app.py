"""The Celery app: delivery and wake-ups only. Jobs live in the store; a message only says "look at job X".

Celery on Redis delivers at least once, so every delivery is checked against the store
(`delivery.run_delivery`): a job already done, or leased elsewhere, makes the delivery a duplicate.
"""

from __future__ import annotations

import logging
from functools import lru_cache

from celery import Celery

from genserve.config import Settings

log = logging.getLogger(__name__)

WAKE_TASK = "genserve.wake"


def make_celery(settings: Settings) -> Celery:
    """A Celery app for `settings.broker_url`, configured so that no job is lost to the broker."""
    app = Celery("genserve", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        # Ack after the task ran; a worker killed mid-task leaves the message to be redelivered.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        task_default_queue=settings.broker_queue,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            # Above the longest job: a redelivery while the job still runs is a harmless duplicate.
            "visibility_timeout": settings.visibility_timeout_seconds,
            "socket_connect_timeout": 2,
            "socket_timeout": 5,
        },
        worker_hijack_root_logger=False,
        # The pool child imports torch and loads the default model before it reports up.
        worker_proc_alive_timeout=600,
    )
    return app


@lru_cache(maxsize=4)
def _publisher(settings_json: str) -> Celery:
    return make_celery(Settings.model_validate_json(settings_json))


def wake_queue(settings: Settings, warm_models: set[str], model: str) -> str:
    """Routing by model: a job for a model some worker holds warm goes to that model's queue."""
    return model_queue(settings, model) if model in warm_models else settings.broker_queue


def model_queue(settings: Settings, model: str) -> str:
    """The queue of the workers that hold `model` loaded (they subscribe to it while they do)."""
    return f"{settings.broker_queue}.model.{model}"


def publish_wake(settings: Settings, job_ids: list[str], queue: str | None = None) -> int:
    """Send a wake for each job; best-effort (the reaper's sweep wakes what this misses). Returns the count sent.

    `queue` defaults to the general queue, which every worker consumes.
    """
    if not settings.broker_url or not job_ids:
        return 0
    app = _publisher(settings.model_dump_json())
    sent = 0
    try:
        for job_id in job_ids:
            # No ETA or countdown: a delayed message on a GPU queue would sit in the unacked set.
            app.send_task(WAKE_TASK, args=[job_id], queue=queue or settings.broker_queue, retry=False)
            sent += 1
    except Exception:  # the broker is down: the job is safe in the store, the sweep wakes it later
        log.warning("could not publish a wake", extra={"jobs": job_ids[sent:]}, exc_info=True)
    return sent

"""One Celery delivery of `genserve.wake(job_id)`: claim that job (with a compatible batch) or do nothing.

Deliveries come at least once, so the store decides: a job that is done, running under another lease,
not due yet, or already batched by another worker makes the delivery a duplicate. Jobs claimed into
this batch from other requests have wakes of their own, which then find them taken.
"""

from __future__ import annotations

import logging

from genserve.scheduler.policy import fill_batch
from genserve.schemas import GenerationParams
from genserve.worker.loop import Worker

log = logging.getLogger(__name__)

DUPLICATE, RAN = "duplicate", "ran"


def run_delivery(worker: Worker, job_id: str) -> str:
    """Run the batch headed by `job_id` if it is still queued; returns "ran" or "duplicate"."""
    queued = worker.store.queued_jobs(limit=500)  # due jobs only (retry backoff is respected)
    head = next((job for job in queued if job.id == job_id), None)
    if head is None:
        log.info("duplicate delivery", extra={"job_id": job_id, "worker_id": worker.worker_id})
        return DUPLICATE
    if head.kind == "image":
        chosen = fill_batch(
            head, queued, worker.max_batch_images(GenerationParams.model_validate(head.params))
        )
    else:
        chosen = [head]  # a video or one of its segments runs alone
    jobs = worker.store.claim_jobs(
        [job.id for job in chosen], worker.worker_id, worker.settings.lease_seconds
    )
    if not jobs:  # another worker claimed them between our read and our claim
        return DUPLICATE
    if len(jobs) > 1:
        log.info(
            "cross-request batch", extra={"jobs": [job.id for job in jobs], "worker_id": worker.worker_id}
        )
    worker.note_idle()  # the broker's wait for this delivery is not counted as a batch gap
    worker.run_batch(jobs)
    return RAN

"""The worker loop: claim a job, run it on the engine, store images, finish the job (fenced).

Every outcome ends in exactly one store transition: complete, fail, mark_canceled, or nothing when the
lease was lost (another attempt owns the job and will finish it).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

import PIL.Image

from genserve.artifacts.images import ImageStore, image_id_for
from genserve.artifacts.png import encode_png, preview_data_url
from genserve.config import Settings
from genserve.engine.engine import Engine, EngineError
from genserve.engine.registry import scan_models
from genserve.metrics import IMAGES_GENERATED, JOB_SECONDS, STEP_SECONDS
from genserve.schemas import GenerationParams
from genserve.store.jobs import JobRecord, JobStore
from genserve.worker.lease import JobCanceled, LeaseKeeper, LeaseLost

log = logging.getLogger(__name__)

# How often an idle worker refreshes its row in the workers table (readiness, model list).
WORKER_HEARTBEAT_SECONDS = 2.0


def new_worker_id() -> str:
    """host:pid:random — the host and pid let a supervisor on the same host detect a dead worker."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class ProgressReporter:
    """The engine's per-step callback: checks the lease, then records a progress event."""

    def __init__(self, store: JobStore, job_id: str, model: str, lease: LeaseKeeper) -> None:
        self.store = store
        self.job_id = job_id
        self.model = model
        self.lease = lease
        self.started = time.perf_counter()
        self.last = self.started

    def __call__(self, step: int, steps: int) -> None:
        now = time.perf_counter()
        STEP_SECONDS.labels(self.model).observe(now - self.last)
        self.last = now
        self.lease.check()
        per_step = (now - self.started) / step
        self.store.events.append(
            self.job_id,
            "progress",
            {
                "step": step,
                "steps": steps,
                "percent": round(100.0 * step / steps, 1),
                "eta_s": round(per_step * (steps - step), 3),
                "ts": round(time.time(), 3),
            },
        )

    def preview(self, step: int, steps: int, images: list[PIL.Image.Image]) -> None:
        data = {"step": step, "steps": steps, "images": [preview_data_url(image) for image in images]}
        self.store.events.append(self.job_id, "preview", data)


class Worker:
    def __init__(
        self, settings: Settings, store: JobStore, engine: Engine, images: ImageStore, worker_id: str
    ) -> None:
        self.settings = settings
        self.store = store
        self.engine = engine
        self.images = images
        self.worker_id = worker_id
        self.state = "starting"

    def announce(self) -> None:
        """Refresh this worker's row: readiness and loaded models for /readyz and /v1/models."""
        self.store.worker_heartbeat(
            self.worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            state=self.state,
            models_loaded=self.engine.loaded_models(),
        )

    def _announce_forever(self, stop: threading.Event) -> None:
        # A thread of its own, so a long job or model load does not make the worker look dead.
        while not stop.wait(WORKER_HEARTBEAT_SECONDS):
            try:
                self.announce()
            except Exception:
                log.warning("worker heartbeat failed", exc_info=True)

    def start(self) -> None:
        """Load (and warm up) the default model before taking work, so /readyz means ready."""
        self.announce()
        default = self.settings.default_model
        if default in scan_models(self.settings.models_dir):
            if self.settings.warmup:
                self.engine.warmup(default)
            else:
                self.engine.load(default)
        else:
            log.warning("default model not found; serving other models only", extra={"model": default})
        self.state = "ready"
        self.announce()

    def run_forever(self, stop: threading.Event) -> None:
        presence_stop = threading.Event()
        presence = threading.Thread(target=self._announce_forever, args=(presence_stop,), daemon=True)
        presence.start()
        try:
            self.start()
            while not stop.is_set():
                if not self.run_next():
                    stop.wait(self.settings.poll_seconds)
        finally:
            presence_stop.set()
            self.state = "stopping"

    def run_next(self) -> bool:
        """Claim and run one job. Returns False when the queue was empty."""
        job = self.store.claim_next(self.worker_id, self.settings.lease_seconds)
        if job is None:
            return False
        self.run_job(job)
        return True

    def run_job(self, job: JobRecord) -> None:
        params = GenerationParams.model_validate(job.params)
        fence = (job.id, self.worker_id, job.attempt)
        context = {"job_id": job.id, "attempt": job.attempt, "worker_id": self.worker_id}
        log.info("job started", extra=context)
        started = time.perf_counter()
        outcome = "failed"
        lease = LeaseKeeper(
            self.store,
            job.id,
            self.worker_id,
            job.attempt,
            self.settings.lease_seconds,
            self.settings.heartbeat_seconds,
        )
        try:
            with lease:
                if job.cancel_requested:
                    raise JobCanceled(job.id)
                if not self.engine.knows(params.model):
                    self.engine.update_models(scan_models(self.settings.models_dir))
                progress = ProgressReporter(self.store, job.id, params.model or "", lease)
                pictures = self.engine.generate(params, on_step=progress, on_preview=progress.preview)
                lease.check()
                image_ids = []
                for index, picture in enumerate(pictures):
                    image_id = image_id_for(job.id, index)
                    png = encode_png(
                        picture, params, seed=params.seed + index, index=index, extra={"job_id": job.id}
                    )
                    self.images.save(image_id, png)
                    image_ids.append(image_id)
            if self.store.complete(*fence, image_ids):
                outcome = "succeeded"
                IMAGES_GENERATED.labels(params.model).inc(len(image_ids))
        except JobCanceled:
            outcome = "canceled"
            self.store.mark_canceled(*fence)
        except LeaseLost:
            outcome = "lease_lost"
            log.warning("lease lost; another attempt owns the job", extra=context)
        except EngineError as error:
            self.store.fail(*fence, str(error))
        except Exception as error:  # a bug must fail the job, never the worker
            log.exception("job crashed", extra=context)
            self.store.fail(*fence, f"internal error: {type(error).__name__}: {error}")
        JOB_SECONDS.labels(params.model, outcome).observe(time.perf_counter() - started)
        log.info("job finished", extra={**context, "outcome": outcome})

"""The worker loop: pick a batch (scheduler policy), claim it, run it on the engine, store images,
finish each job (fenced).

Every job ends in exactly one store transition: complete, fail, mark_canceled, or nothing when the
lease was lost (another attempt owns the job and will finish it).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime

import PIL.Image

from genserve import tracing
from genserve.artifacts.images import ImageStore, image_id_for
from genserve.artifacts.inputs import PICTURE_FIELDS, InputStore, MissingPicture, PictureError, open_picture
from genserve.artifacts.png import encode_png, preview_data_url
from genserve.artifacts.s3 import make_input_store, make_video_store
from genserve.config import Settings
from genserve.engine.engine import Engine, EngineError
from genserve.engine.loop.denoise import BatchItem, ItemOutcome
from genserve.engine.models.controls import scan_controls
from genserve.engine.models.registry import registered_models
from genserve.engine.speed.gpu_metrics import publish_gpu_metrics
from genserve.engine.video.pipelines import VideoEngine
from genserve.metrics import (
    BATCH_GAP_SECONDS,
    BATCH_IMAGES,
    IMAGES_GENERATED,
    JOB_SECONDS,
    QUEUE_WAIT_SECONDS,
    STEP_SECONDS,
)
from genserve.scheduler.calibrate import device_name
from genserve.scheduler.cost import steady_step_seconds
from genserve.scheduler.policy import SchedulerState, batch_limit, plan_batch, record_served
from genserve.schemas import GenerationParams
from genserve.schemas.control import nested_picture_refs
from genserve.schemas.upscale import UpscaleParams
from genserve.store.calibration import CalibrationStore
from genserve.store.jobs import JobRecord, JobStore
from genserve.worker.lease import JobCanceled, LeaseKeeper, LeaseLost
from genserve.worker.overlap import BatchFinisher, BatchPrefetcher
from genserve.worker.upscale import UpscaleContext, refresh_upscalers, run_upscale_job
from genserve.worker.video import VideoContext, run_video_job

log = logging.getLogger(__name__)


class PictureUnavailable(Exception):
    """A job's input picture is missing or damaged in the artifact store."""


# How often an idle worker refreshes its row in the workers table (readiness, model list).
WORKER_HEARTBEAT_SECONDS = 2.0


def new_worker_id() -> str:
    """host:pid:random — the host and pid let a supervisor on the same host detect a dead worker."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class EventBuffer:
    """Collects a batch's progress and preview events during a step; written in one transaction."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.pending: list[tuple[str, str, dict]] = []

    def add(self, job_id: str, type: str, data: dict) -> None:
        self.pending.append((job_id, type, data))

    def flush(self) -> None:
        events, self.pending = self.pending, []
        self.store.events.append_many(events)


class ProgressReporter:
    """One job's step callback inside a batch: checks its lease flags, then queues its events."""

    def __init__(self, job_id: str, lease: LeaseKeeper, events: EventBuffer) -> None:
        self.job_id = job_id
        self.lease = lease
        self.events = events
        self.started = time.perf_counter()

    def __call__(self, step: int, steps: int) -> None:
        self.lease.check(self.job_id)
        per_step = (time.perf_counter() - self.started) / step
        progress = {
            "step": step,
            "steps": steps,
            "percent": round(100.0 * step / steps, 1),
            "eta_s": round(per_step * (steps - step), 3),
            "ts": round(time.time(), 3),
        }
        self.events.add(self.job_id, "progress", progress)

    def preview(self, step: int, steps: int, images: list[PIL.Image.Image]) -> None:
        data = {"step": step, "steps": steps, "images": [preview_data_url(image) for image in images]}
        self.events.add(self.job_id, "preview", data)


class StepTimer:
    """The batch-level step callback: writes the step's events, times the step by model, resolution
    and rows computed, and calls `on_last_step` as the last denoising step begins."""

    def __init__(
        self, params: GenerationParams, events: EventBuffer, on_last_step: Callable[[], None] | None = None
    ) -> None:
        self.model = params.model or ""
        self.resolution = f"{params.width}x{params.height}"
        self.events = events
        self.on_last_step = on_last_step
        self.last = time.perf_counter()
        self.samples: list[tuple[int, float]] = []  # (rows, seconds) for calibration refinement
        # A hires pass or a refiner runs steps of another size or model: not this model and size's
        # step time, so such batches do not refine the cost model.
        self.calibrates = params.hires is None and params.refiner is None

    def __call__(self, step: int, total: int, rows: int) -> None:
        if self.on_last_step is not None and step >= total - 1:
            self.on_last_step()
        tracing.step_event(step, total, rows)
        self.events.flush()
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        STEP_SECONDS.labels(self.model, self.resolution, str(rows)).observe(seconds)
        if step > 1 and self.calibrates:  # the first step carries text encoding and warm-up
            self.samples.append((rows, seconds))


class Worker:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        engine: Engine,
        images: ImageStore,
        worker_id: str,
        inputs: InputStore | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.engine = engine
        self.images = images
        self.inputs = inputs if inputs is not None else make_input_store(settings)  # pictures in, by hash
        self.worker_id = worker_id
        self.state = "starting"
        self.scheduler_state = SchedulerState()
        self.calibration = CalibrationStore(store.engine)
        self.device_name = device_name(engine.device)  # the name `genserve calibrate` stores rows under
        self.leases = LeaseKeeper(store, worker_id, settings.lease_seconds, settings.heartbeat_seconds)
        # When the last batch left the engine, while batches run back to back (None after the
        # queue ran empty): the start of the device's idle gap, `genserve_batch_gap_seconds`.
        self._engine_left_at: float | None = None
        self.videos = make_video_store(settings)
        self._video_engine: VideoEngine | None = None  # built at the first video job

    def video_context(self) -> VideoContext:
        if self._video_engine is None:
            self._video_engine = VideoEngine(device=self.engine.device, dtype=self.engine.dtype)
        return VideoContext(
            self.settings, self.store, self.leases, self.inputs, self.images, self.videos,
            self._video_engine, self.worker_id, self.engine.post,
        )  # fmt: skip

    def run_video(self, job: JobRecord) -> str:
        """A video, or a segment of one: it runs alone, start to end, on this worker."""
        started = time.perf_counter()
        context = {"job_id": job.id, "trace_id": job.trace_id, "worker_id": self.worker_id, "kind": job.kind}
        log.info("video job started", extra={**context, "attempt": job.attempt})
        with tracing.batch_spans([job]):
            outcome = run_video_job(self.video_context(), job, registered_models(self.settings))
        JOB_SECONDS.labels(
            job.params.get("model") or job.params.get("params", {}).get("model"), outcome
        ).observe(time.perf_counter() - started)
        log.info("job finished", extra={**context, "attempt": job.attempt, "outcome": outcome})
        return outcome

    def run_upscale(self, job: JobRecord) -> str:
        """An upscale job (POST /v1/upscale): one picture, alone, on this engine's PostStage."""
        started = time.perf_counter()
        context = {"job_id": job.id, "trace_id": job.trace_id, "worker_id": self.worker_id, "kind": job.kind}
        refresh_upscalers(self.engine.post, self.settings, [UpscaleParams.model_validate(job.params)])
        with tracing.batch_spans([job]):
            upscale = UpscaleContext(
                self.store, self.leases, self.inputs, self.images, self.engine.post, self.worker_id
            )
            outcome = run_upscale_job(upscale, job)
        JOB_SECONDS.labels("upscale", outcome).observe(time.perf_counter() - started)
        log.info("job finished", extra={**context, "attempt": job.attempt, "outcome": outcome})
        return outcome

    def announce(self) -> None:
        """Refresh this worker's row: readiness and loaded models for /readyz and /v1/models."""
        self.store.worker_heartbeat(
            self.worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            state=self.state,
            models_loaded=self.engine.loaded_models()
            + (self._video_engine.loaded_models() if self._video_engine is not None else [])
            + self.engine.post.loaded(),  # upscalers and face restorers
        )

    def _announce_forever(self, stop: threading.Event) -> None:
        # A thread of its own, so a long job or model load does not make the worker look dead.
        while not stop.wait(WORKER_HEARTBEAT_SECONDS):
            try:
                self.announce()
                publish_gpu_metrics()
            except Exception:
                log.warning("worker heartbeat failed", exc_info=True)

    def start(self) -> None:
        """Load (and warm up) the default model before taking work, so /readyz means ready."""
        self.announce()
        default = self.settings.default_model
        if default in registered_models(self.settings):
            self.engine.load(default)  # warms up too when the engine was built with warmup_on_load
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
            self.work(stop)
        finally:
            presence_stop.set()
            self.leases.close()
            self.state = "stopping"

    def work(self, stop: threading.Event, until_idle: bool = False) -> None:
        """Run batches until `stop` is set (or, with `until_idle`, until the queue is empty).

        The device should not wait between batches: the next batch is claimed on a helper thread
        while the current one ends (`prefetch_batches`), and with `background_finish` each batch is
        finished (images stored, jobs ended) on another thread while the next one runs."""
        with self.finisher() as finisher, self.prefetcher() as prefetcher:
            while not stop.is_set():
                if not self.run_next(finisher, prefetcher):
                    if until_idle:
                        return
                    stop.wait(self.settings.poll_seconds)

    def finisher(self) -> BatchFinisher:
        """The serving loop's finisher: in the background with a GPU, unless `background_finish` says."""
        return BatchFinisher(self._overlaps(self.settings.background_finish))

    def prefetcher(self) -> BatchPrefetcher:
        """The serving loop's prefetcher: on with a GPU, unless `prefetch_batches` says. A stopping
        loop gives back what it claimed and did not run."""
        enabled = self._overlaps(self.settings.prefetch_batches)
        return BatchPrefetcher(self.claim_next, self.store, self.leases, enabled)

    def _overlaps(self, setting: bool | None) -> bool:
        # Work beside the batch only helps when the batch runs on a separate device: on a CPU it
        # takes the cores the batch needs (measured there: no faster, or slower).
        return setting if setting is not None else self.engine.device.startswith("cuda")

    def run_next(
        self, finisher: BatchFinisher | None = None, prefetcher: BatchPrefetcher | None = None
    ) -> bool:
        """Run one batch: the one `prefetcher` claimed, or else one claimed now. Returns False when
        the queue was empty.

        Without a `finisher`, the batch's jobs have ended when this returns; with one, they end on
        the finisher's thread (see `work`)."""
        jobs = prefetcher.take() if prefetcher is not None else None
        if not jobs:
            jobs = self.claim_next()
        if jobs is None:
            self.note_idle()
            return False
        if jobs:  # empty: another worker took them first; look again at once
            self.run_batch(jobs, finisher, prefetcher)
        return True

    def note_idle(self) -> None:
        """The worker had nothing to run: the wait before its next batch is no gap of its making."""
        self._engine_left_at = None

    def claim_next(self) -> list[JobRecord] | None:
        """List the queue, choose the next batch (scheduler policy) and claim it. None when nothing
        is queued; empty when another worker claimed the chosen jobs first."""
        queued = self.store.queued_jobs(limit=500)
        if not queued:
            return None
        chosen = plan_batch(
            queued,
            self.scheduler_state,
            long_share=self.settings.long_queue_share,
            max_images=self.max_batch_images,
        )
        jobs = self.store.claim_jobs([job.id for job in chosen], self.worker_id, self.settings.lease_seconds)
        if jobs:
            record_served(self.scheduler_state, chosen[0])
            tracing.record_queue_wait(jobs)
            now = datetime.now(UTC)
            for job in jobs:
                QUEUE_WAIT_SECONDS.labels(job.queue).observe((now - job.created_at).total_seconds())
        return jobs

    def max_batch_images(self, params: GenerationParams) -> int:
        estimate = self.engine.estimate_max_batch_images(params) if self.engine.knows(params.model) else None
        return batch_limit(
            self.settings.batch_limits, params, estimate, self.settings.default_max_batch_images
        )

    def run_batch(
        self,
        jobs: list[JobRecord],
        finisher: BatchFinisher | None = None,
        prefetcher: BatchPrefetcher | None = None,
    ) -> None:
        """Run claimed jobs as one engine batch; every job ends in exactly one fenced transition.

        With a `finisher`, the images are stored and the jobs ended on its thread; the batch's
        leases and trace spans stay open until then. With a `prefetcher`, the next batch is
        claimed as this one begins its last step."""
        if jobs and jobs[0].kind == "upscale":  # one picture, alone (worker/upscale.py)
            self.run_upscale(jobs[0])
            return
        if jobs and jobs[0].kind != "image":  # the scheduler gives a video job a batch of its own
            self.run_video(jobs[0])
            return
        started = time.perf_counter()
        params = {job.id: GenerationParams.model_validate(job.params) for job in jobs}
        refresh_upscalers(self.engine.post, self.settings, params.values())  # upscale, face_restore, hires
        outcomes: dict[str, str] = {}
        for job in jobs:
            # Canceled between being listed and claimed, or (prefetched) while waiting for this run.
            if job.cancel_requested or self.leases.is_canceled(job.id):
                self.store.mark_canceled(job.id, self.worker_id, job.attempt)
                outcomes[job.id] = "canceled"
        self.leases.drop(list(outcomes))  # prefetched jobs are held from their claim on
        running = [job for job in jobs if job.id not in outcomes]
        if not running:
            self._report_finished(jobs, params, outcomes, started)
            return
        BATCH_IMAGES.observe(sum(params[job.id].num_images for job in running))
        for job in running:
            context = {"job_id": job.id, "trace_id": job.trace_id, "worker_id": self.worker_id}
            if self.settings.log_prompts:
                context["prompt"] = params[job.id].prompt
            log.info("job started", extra={**context, "batch": len(running), "attempt": job.attempt})
        held = [(job.id, job.attempt) for job in running]
        with ExitStack() as batch_scope:  # the spans and leases, closed by `finish`
            batch_scope.enter_context(tracing.batch_spans(running))
            self.leases.hold(held)  # a prefetched batch's are held already
            batch_scope.callback(self.leases.drop, [job.id for job in running])
            on_last_step = prefetcher.start if prefetcher is not None else None
            timed: list[tuple[GenerationParams, StepTimer]] = []
            generated = self._generate(running, params, on_last_step, timed)
            open_scope = batch_scope.pop_all()

        def finish() -> None:
            for batch_params, timer in timed:  # a store write: off the device's critical path too
                self.observe_step_times(batch_params, timer)
            with open_scope:
                for job in running:
                    outcomes[job.id] = self._end_job(job, params[job.id], generated[job.id])
            self._report_finished(jobs, params, outcomes, started)

        if finisher is None:
            finish()
        else:
            finisher.submit(finish)

    def _report_finished(
        self,
        jobs: list[JobRecord],
        params: dict[str, GenerationParams],
        outcomes: dict[str, str],
        started: float,
    ) -> None:
        elapsed = time.perf_counter() - started
        for job in jobs:
            JOB_SECONDS.labels(params[job.id].model, outcomes[job.id]).observe(elapsed)
            log.info(
                "job finished",
                extra={
                    "job_id": job.id,
                    "trace_id": job.trace_id,
                    "attempt": job.attempt,
                    "worker_id": self.worker_id,
                    "outcome": outcomes[job.id],
                },
            )

    def _end_job(self, job: JobRecord, params: GenerationParams, generated: str | ItemOutcome) -> str:
        """Store a generated job's images and complete it; `generated` is an outcome name when the job
        already ended (failed in the engine). A crash here fails the job, never the worker."""
        if isinstance(generated, str):
            return generated
        try:
            return self._finish(job, params, generated)
        except Exception as error:
            log.exception("finishing a job crashed", extra={"job_id": job.id})
            return self._finish_failed(job, f"internal error: {type(error).__name__}: {error}")

    def _generate(
        self,
        jobs: list[JobRecord],
        params: dict[str, GenerationParams],
        on_last_step: Callable[[], None] | None,
        timed: list[tuple[GenerationParams, StepTimer]],
    ) -> dict[str, str | ItemOutcome]:
        """Run the batch on the engine: each job's images, or the outcome of a job that already ended.
        Each engine run that succeeded adds its step timer to `timed`."""
        pictures, unloadable = self._load_pictures(jobs, params)
        jobs = [job for job in jobs if job.id not in unloadable]
        if not jobs:
            return unloadable
        first = params[jobs[0].id]
        if not self.engine.knows(first.model) or any(p.controlnets or p.ip_adapter for p in params.values()):
            # new models, or control models added since start (a cheap rescan of their folders)
            self.engine.update_models(
                registered_models(self.settings) if not self.engine.knows(first.model) else {},
                scan_controls(self.settings.models_dir, builtin=self.settings.builtin_models),
            )
        events = EventBuffer(self.store)
        reporters = {job.id: ProgressReporter(job.id, self.leases, events) for job in jobs}
        items = [
            BatchItem(
                params[job.id],
                on_step=reporters[job.id],
                on_preview=reporters[job.id].preview,
                **pictures[job.id],
            )
            for job in jobs
        ]
        timer = StepTimer(first, events, on_last_step)
        if self._engine_left_at is not None:
            BATCH_GAP_SECONDS.observe(time.perf_counter() - self._engine_left_at)
        try:
            with tracing.steps_span([job.id for job in jobs]):
                results = self.engine.generate_batch(items, on_batch_step=timer)
        except EngineError as error:
            if len(jobs) > 1:
                # One member may be what broke the batch (say, out of memory at its size): give each its own run.
                log.warning("batch failed; running its jobs one by one", extra={"error": str(error)})
                outcomes: dict[str, str | ItemOutcome] = dict(unloadable)
                for job in jobs:
                    outcomes.update(self._generate([job], params, on_last_step, timed))
                return outcomes
            return {**unloadable, jobs[0].id: self._finish_failed(jobs[0], str(error))}
        except Exception as error:  # a bug must fail the jobs, never the worker
            log.exception("batch crashed", extra={"jobs": [job.id for job in jobs]})
            return {
                **unloadable,
                **{
                    job.id: self._finish_failed(job, f"internal error: {type(error).__name__}: {error}")
                    for job in jobs
                },
            }
        finally:
            self._engine_left_at = time.perf_counter()
        timed.append((first, timer))
        return {**unloadable, **{job.id: outcome for job, outcome in zip(jobs, results, strict=True)}}

    def _load_pictures(
        self, jobs: list[JobRecord], params: dict[str, GenerationParams]
    ) -> tuple[dict[str, dict[str, PIL.Image.Image]], dict[str, str | ItemOutcome]]:
        """Each job's input pictures, decoded, by BatchItem field; a job whose picture is missing or
        damaged in the artifact store fails with the reason and leaves the batch."""
        pictures: dict[str, dict[str, PIL.Image.Image]] = {}
        failed: dict[str, str | ItemOutcome] = {}
        for job in jobs:
            loaded = {}
            try:
                for field in PICTURE_FIELDS:
                    ref = getattr(params[job.id], field)
                    if ref is not None:
                        loaded[field] = self._picture(field, ref)
                controls = {
                    ref: self._picture(field, ref) for field, ref in nested_picture_refs(params[job.id])
                }
                if controls:
                    loaded["control_images"] = controls
            except PictureUnavailable as error:
                log.warning("input picture unavailable", extra={"job_id": job.id, "error": str(error)})
                failed[job.id] = self._finish_failed(job, str(error))
                continue
            pictures[job.id] = loaded
        return pictures, failed

    def _picture(self, field: str, ref: str) -> PIL.Image.Image:
        try:
            return open_picture(self.inputs.get(ref))
        except (MissingPicture, PictureError, OSError) as error:
            raise PictureUnavailable(f"{field} {ref} cannot be loaded: {error}") from None

    def observe_step_times(self, params: GenerationParams, timer: StepTimer) -> None:
        """Refine the cost model with this batch's steady-state step times (one write per batch size)."""
        for rows, step_s in steady_step_seconds(timer.samples).items():
            try:
                self.calibration.observe(
                    self.device_name, params.model, params.width, params.height, rows, step_s
                )
            except Exception:  # the cost model is advisory; a failed write must not fail the batch
                log.warning("could not record a step time", exc_info=True)

    def _finish(self, job: JobRecord, params: GenerationParams, outcome: ItemOutcome) -> str:
        fence = (job.id, self.worker_id, job.attempt)
        if isinstance(outcome.error, JobCanceled):
            self.store.mark_canceled(*fence)
            return "canceled"
        if isinstance(outcome.error, LeaseLost):
            log.warning("lease lost; another attempt owns the job", extra={"job_id": job.id})
            return "lease_lost"
        if outcome.error is not None:
            return self._finish_failed(
                job, f"internal error: {type(outcome.error).__name__}: {outcome.error}"
            )
        try:
            self.leases.check(job.id)
        except JobCanceled:
            self.store.mark_canceled(*fence)
            return "canceled"
        except LeaseLost:
            return "lease_lost"
        image_ids = []
        for index, picture in enumerate(outcome.images):
            image_id = image_id_for(job.id, index)
            with tracing.job_span(job.id, "genserve.encode"):
                png = encode_png(
                    picture, params, seed=params.seed + index, index=index, extra={"job_id": job.id}
                )
            with tracing.job_span(job.id, "genserve.store"):
                self.images.save(image_id, png)
            image_ids.append(image_id)
        if not self.store.complete(*fence, image_ids):
            return "lease_lost"
        IMAGES_GENERATED.labels(params.model).inc(len(image_ids))
        return "succeeded"

    def _finish_failed(self, job: JobRecord, error: str) -> str:
        # Jobs that retry (batch items) back off exponentially: 2 s, 4 s, 8 s, ... at most 5 minutes.
        delay = min(300.0, self.settings.retry_backoff_seconds * 2 ** (job.attempt - 1))
        self.store.fail(job.id, self.worker_id, job.attempt, error, retry_delay_seconds=delay)
        return "failed"

"""Running one upscale job (kind "upscale", POST /v1/upscale) on a worker: picture in → face
restoration and/or a tiled model upscale (engine/upscale/) → one PNG out. Like a video job it runs
alone; it writes a progress event per batch of tiles (stage "upscale", step = tiles done) and ends
in exactly one fenced store transition."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from genserve.artifacts.images import ImageStore, image_id_for
from genserve.artifacts.inputs import InputStore, open_picture
from genserve.config import Settings
from genserve.engine.errors import EngineError
from genserve.engine.upscale.stage import PostStage
from genserve.schemas.upscale import UpscaleParams
from genserve.store.jobs import JobRecord, JobStore
from genserve.worker.lease import JobCanceled, LeaseKeeper, LeaseLost

log = logging.getLogger(__name__)


@dataclass
class UpscaleContext:
    store: JobStore
    leases: LeaseKeeper
    inputs: InputStore
    images: ImageStore
    post: PostStage
    worker_id: str


def run_upscale_job(context: UpscaleContext, job: JobRecord) -> str:
    """Run a claimed upscale job; returns its outcome (succeeded, failed, canceled, lease_lost)."""
    store, fence = context.store, (job.id, context.worker_id, job.attempt)
    context.leases.hold([(job.id, job.attempt)])
    try:
        params = UpscaleParams.model_validate(job.params)
        try:
            picture = open_picture(context.inputs.get(params.image)).convert("RGB")
        except Exception as error:
            store.fail(*fence, f"image {params.image} cannot be loaded: {error}")
            return "failed"

        def on_tiles(done: int, total: int) -> None:
            context.leases.check(job.id)  # a cancel stops between batches of tiles
            data = {"stage": "upscale", "step": done, "steps": total, "percent": round(100 * done / total, 1)}
            store.events.append_many([(job.id, "progress", data)])

        started = time.perf_counter()
        result = context.post.apply(
            picture,
            params.upscale,
            params.face_restore,
            upscale_first=params.upscale_first,
            on_progress=on_tiles,
        )
        context.leases.check(job.id)
        image_id = image_id_for(job.id, 0)
        buffer = io.BytesIO()
        result.save(buffer, format="PNG")
        context.images.save(image_id, buffer.getvalue())
        log.info("upscaled", extra={"job_id": job.id, "seconds": round(time.perf_counter() - started, 3),
                                    "size": f"{result.width}x{result.height}"})  # fmt: skip
        return "succeeded" if store.complete(*fence, [image_id]) else "lease_lost"
    except JobCanceled:
        store.mark_canceled(*fence)
        return "canceled"
    except LeaseLost:
        log.warning("lease lost; another attempt owns the upscale job", extra={"job_id": job.id})
        return "lease_lost"
    except EngineError as error:
        store.fail(*fence, str(error))
        return "failed"
    except Exception as error:  # out of memory, a bug: the job fails with the reason, the worker goes on
        log.exception("upscale job failed", extra={"job_id": job.id})
        store.fail(*fence, f"{type(error).__name__}: {error}")
        return "failed"
    finally:
        context.leases.drop([job.id])


def wanted_upscalers(params: object) -> set[str]:
    """The upscaler and face restorer names a job's params name (image or upscale job)."""
    names = {getattr(getattr(params, field, None), "model", None) for field in ("upscale", "face_restore")}
    hires = getattr(params, "hires", None)
    if hires is not None:
        names.add(hires.upscaler)
    return {name for name in names if name}


def refresh_upscalers(post: PostStage, settings: Settings, params: Iterable[object]) -> None:
    """Rescan models_dir/upscale/ (and the face detector) when a job names an upscaler or face
    restorer this worker has not seen: files added after the worker started."""
    from genserve.engine.models.upscalers import face_detectors, scan_upscalers
    from genserve.engine.stages.plan import LATENT_UPSCALERS

    params = list(params)
    builtin = set(LATENT_UPSCALERS) | {"lanczos", "nearest"}
    wanted = set().union(*(wanted_upscalers(p) for p in params)) - builtin
    if any(not post.knows(name) for name in wanted) or (
        any(getattr(p, "face_restore", None) for p in params) and post.face_detector is None
    ):
        detectors = face_detectors(settings.models_dir)
        post.update(
            scan_upscalers(settings.models_dir, builtin=settings.builtin_models),
            detectors[0] if detectors else None,
        )

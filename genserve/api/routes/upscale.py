"""Upscaling and face restoration as a job of its own: a picture in, a job out (kind "upscale").
Progress is the job's SSE stream (GET /v1/jobs/{id}/events): one `progress` event per batch of
tiles, with stage "upscale", step = tiles done and steps = tiles."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, HTTPException, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from genserve import tracing
from genserve.api.deps import ServicesDep
from genserve.api.routes.jobs import ClientId, IdempotencyKey, TraceParent
from genserve.api.submission import trace_id_from
from genserve.api.upscale_submission import UPSCALE_KIND, submit_upscale
from genserve.auth.deps import Principal, PrincipalDep
from genserve.schemas import JobState, LimitError
from genserve.schemas.jobs import ImageRef
from genserve.schemas.upscale import UpscaleJobCreate, UpscaleParams
from genserve.store.jobs import JobRecord

router = APIRouter(tags=["upscale"])


class UpscaleJobPublic(BaseModel):
    id: str
    request_id: str | None
    state: JobState
    params: UpscaleParams
    created_at: datetime
    finished_at: datetime | None
    attempts: int
    error: str | None
    images: list[ImageRef]
    estimated_seconds: float | None
    events_url: str


def to_upscale_public(job: JobRecord, principal: Principal) -> UpscaleJobPublic:
    return UpscaleJobPublic(
        id=job.id,
        request_id=principal.public_request_id(job.request_id),
        state=job.state,
        params=UpscaleParams.model_validate(job.params),
        created_at=job.created_at,
        finished_at=job.finished_at,
        attempts=job.attempt,
        error=job.error,
        images=[ImageRef(id=image_id, url=f"/v1/images/{image_id}") for image_id in job.image_ids],
        estimated_seconds=job.estimated_seconds,
        events_url=f"/v1/jobs/{job.id}/events",
    )


def submit_upscale_as(
    principal: Principal,
    body: UpscaleJobCreate,
    services: ServicesDep,
    client_id: str | None,
    trace_id: str | None,
) -> tuple[JobRecord, bool]:
    if principal.authenticated:
        body = body.model_copy(update={"request_id": principal.scoped_request_id(body.request_id)})
    job, created = submit_upscale(
        body, services.settings, services.store, services.inputs, principal.client_id(client_id), trace_id
    )
    if created:
        tracing.job_submitted(job.id, job.trace_id)
    return job, created


@router.post(
    "/v1/upscale", status_code=202, response_model=UpscaleJobPublic, operation_id="create_upscale_job"
)
async def create_upscale_job(
    body: UpscaleJobCreate,
    services: ServicesDep,
    principal: PrincipalDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
    client_id: ClientId = None,
    traceparent: TraceParent = None,
) -> UpscaleJobPublic:
    """Queue an upscale (and/or face restoration) of one picture; follow it at events_url."""
    if idempotency_key is not None:
        if body.request_id is not None and body.request_id != idempotency_key:
            raise LimitError("request_id", "request_id and the Idempotency-Key header differ")
        body = body.model_copy(update={"request_id": idempotency_key})
    trace_id = trace_id_from(traceparent)
    job, created = await run_in_threadpool(submit_upscale_as, principal, body, services, client_id, trace_id)
    response.headers["Location"] = f"/v1/upscale/{job.id}"
    if not created:
        response.status_code = 200
    return to_upscale_public(job, principal)


@router.get("/v1/upscale/{job_id}", response_model=UpscaleJobPublic, operation_id="get_upscale_job")
def get_upscale_job(job_id: str, services: ServicesDep, principal: PrincipalDep) -> UpscaleJobPublic:
    job = services.store.get(job_id)
    if job is None or job.kind != UPSCALE_KIND or not principal.owns(job):
        raise HTTPException(404, f"upscale job {job_id} not found")
    return to_upscale_public(job, principal)


@router.delete("/v1/upscale/{job_id}", response_model=UpscaleJobPublic, operation_id="cancel_upscale_job")
def cancel_upscale_job(job_id: str, services: ServicesDep, principal: PrincipalDep) -> UpscaleJobPublic:
    """Cancel: a queued upscale at once, a running one before its next batch of tiles."""
    get_upscale_job(job_id, services, principal)
    return to_upscale_public(services.store.request_cancel(job_id), principal)

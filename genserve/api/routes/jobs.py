"""Jobs: submit, read, list, cancel, and follow progress as server-sent events."""

from __future__ import annotations

from typing import Annotated, TypeVar

from fastapi import APIRouter, Header, HTTPException, Query, Response
from fastapi.responses import StreamingResponse

from genserve.api.deps import ServicesDep
from genserve.api.sse import SSE_HEADERS, job_event_stream, parse_last_event_id
from genserve.api.submission import to_public, trace_id_from
from genserve.api.video_submission import VideoJobCreate
from genserve.auth.deps import Principal, PrincipalDep, submit_as
from genserve.schemas import JobCreate, JobList, JobPublic, JobState, LimitError
from genserve.store.jobs import JobRecord

router = APIRouter(tags=["jobs"])

IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)]
ClientId = Annotated[str | None, Header(alias="X-Client-Id", max_length=200)]
LastEventId = Annotated[str | None, Header(alias="Last-Event-ID")]
TraceParent = Annotated[str | None, Header(alias="traceparent", description="W3C trace context (optional)")]


Keyed = TypeVar("Keyed", JobCreate, VideoJobCreate)


def with_idempotency_key(body: Keyed, idempotency_key: str | None) -> Keyed:
    """The body with the Idempotency-Key header as its request_id (they must agree if both given)."""
    if idempotency_key is None:
        return body
    if body.request_id is not None and body.request_id != idempotency_key:
        raise LimitError("request_id", "request_id and the Idempotency-Key header differ")
    return body.model_copy(update={"request_id": idempotency_key})


@router.post("/v1/jobs", status_code=202, response_model=JobPublic, operation_id="create_job")
def create_job(
    body: JobCreate,
    services: ServicesDep,
    principal: PrincipalDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
    client_id: ClientId = None,
    traceparent: TraceParent = None,
) -> JobPublic:
    """Queue a generation job. With a request_id (or Idempotency-Key), a resubmit returns the same job."""
    body = with_idempotency_key(body, idempotency_key)
    trace_id = trace_id_from(traceparent)
    job, created = submit_as(principal, body, services, client_id, trace_id)
    response.headers["X-Trace-Id"] = job.trace_id or trace_id
    if not created:
        response.status_code = 200
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return _public(job, services, principal)


@router.get("/v1/jobs", response_model=JobList, operation_id="list_jobs")
def list_jobs(
    services: ServicesDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    state: JobState | None = None,
) -> JobList:
    """Jobs, newest first (with API keys: this key's jobs)."""
    jobs, total = services.store.list_jobs(
        limit=limit,
        offset=offset,
        state=state,
        client_id=principal.key_id if principal.authenticated else None,
    )
    workers = _live_workers(services)
    return JobList(
        items=[_public(job, services, principal, workers) for job in jobs],
        total=total,
        limit=limit,
        offset=offset,
    )


def _live_workers(services: ServicesDep) -> int:
    return len(services.store.live_workers(max_age_seconds=10.0))


def _public(
    job: JobRecord, services: ServicesDep, principal: Principal, workers: int | None = None
) -> JobPublic:
    public = to_public(job, services.store, _live_workers(services) if workers is None else workers)
    return public.model_copy(update={"request_id": principal.public_request_id(public.request_id)})


def _get_job_or_404(services: ServicesDep, job_id: str, principal: Principal) -> JobRecord:
    """The job, if this caller may see it: another key's job is 404, exactly like a missing one."""
    job = services.store.get(job_id)
    if job is None or not principal.owns(job):
        raise HTTPException(404, f"job {job_id} not found")
    return job


# Where jobs that are not pictures are read; their events are at /v1/jobs/{id}/events all the same.
_RESOURCE = {"video": "/v1/video/jobs", "segment": "/v1/video/jobs", "upscale": "/v1/upscale"}


def _image_job_or_404(services: ServicesDep, job_id: str, principal: Principal) -> JobRecord:
    job = _get_job_or_404(services, job_id, principal)
    if job.kind != "image":
        where = job.parent_id if job.kind == "segment" else job.id
        raise HTTPException(404, f"job {job_id} is a {job.kind} job: see {_RESOURCE[job.kind]}/{where}")
    return job


@router.get("/v1/jobs/{job_id}", response_model=JobPublic, operation_id="get_job")
def get_job(job_id: str, services: ServicesDep, principal: PrincipalDep) -> JobPublic:
    return _public(_image_job_or_404(services, job_id, principal), services, principal)


@router.delete("/v1/jobs/{job_id}", response_model=JobPublic, operation_id="cancel_job")
def cancel_job(job_id: str, services: ServicesDep, principal: PrincipalDep) -> JobPublic:
    """Cancel: a queued job at once, a running one at its next denoising step."""
    _image_job_or_404(services, job_id, principal)
    job = services.store.request_cancel(job_id)
    return _public(job, services, principal)


@router.get(
    "/v1/jobs/{job_id}/events",
    operation_id="job_events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "SSE stream of job events"}},
)
def job_events(
    job_id: str, services: ServicesDep, principal: PrincipalDep, last_event_id: LastEventId = None
) -> StreamingResponse:
    """Events: queued, started, progress, requeued, succeeded, failed, canceled. Resumable via Last-Event-ID."""
    _get_job_or_404(services, job_id, principal)
    stream = job_event_stream(services.store, job_id, parse_last_event_id(last_event_id))
    return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS)


@router.post(
    "/v1/generate_stream",
    operation_id="generate_stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "SSE stream of job events"}},
)
def generate_stream(
    body: JobCreate,
    services: ServicesDep,
    principal: PrincipalDep,
    idempotency_key: IdempotencyKey = None,
    client_id: ClientId = None,
    traceparent: TraceParent = None,
) -> StreamingResponse:
    """Submit a job and stream its events in one call (`curl -N`)."""
    body = with_idempotency_key(body, idempotency_key)
    trace_id = trace_id_from(traceparent)
    job, _ = submit_as(principal, body, services, client_id, trace_id)
    headers = {
        **SSE_HEADERS,
        "X-Job-Id": job.id,
        "Location": f"/v1/jobs/{job.id}",
        "X-Trace-Id": job.trace_id or trace_id,
    }
    stream = job_event_stream(services.store, job.id)
    return StreamingResponse(stream, media_type="text/event-stream", headers=headers)

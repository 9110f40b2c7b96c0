"""Video jobs: submit, read, list, cancel, and the files they make. Progress is the job's SSE stream
(GET /v1/jobs/{id}/events), the same as for pictures."""

from __future__ import annotations

from functools import partial
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from genserve import tracing
from genserve.api.deps import Services, ServicesDep
from genserve.api.routes.jobs import ClientId, IdempotencyKey, TraceParent, with_idempotency_key
from genserve.api.submission import trace_id_from
from genserve.api.video_submission import (
    VideoJobCreate,
    VideoJobPublic,
    estimated_video_seconds,
    resolve_video,
    submit_video,
    to_video_public,
)
from genserve.artifacts.s3 import make_video_store
from genserve.artifacts.videos import VideoStore, media_type_for
from genserve.auth.deps import Principal, PrincipalDep, check_video_key_limits
from genserve.engine.video.plan import output_frames, output_seconds
from genserve.schemas import JobState
from genserve.schemas.video import VideoParams
from genserve.store.jobs import JobRecord
from genserve.store.video_calibration import VideoCalibrationStore

router = APIRouter(tags=["video"])


class VideoJobList(BaseModel):
    items: list[VideoJobPublic]
    total: int
    limit: int
    offset: int


def video_store(services: Services) -> VideoStore:
    return make_video_store(services.settings)


def submit_video_as(
    principal: Principal,
    body: VideoJobCreate,
    services: Services,
    client_header: str | None = None,
    trace_id: str | None = None,
) -> tuple[JobRecord, bool]:
    """`submit_video` for this caller: its model and size limits, its GPU-seconds quota."""
    models, settings = services.catalog.models(), services.settings
    check = None
    if principal.authenticated:
        body = body.model_copy(update={"request_id": principal.scoped_request_id(body.request_id)})
        check = partial(check_video_key_limits, principal, services)
    job, created = submit_video(
        body,
        models,
        settings,
        services.store,
        services.inputs,
        principal.client_id(client_header),
        trace_id,
        check=check,
    )
    if created:
        tracing.job_submitted(job.id, job.trace_id)
    return job, created


def public(job: JobRecord, services: Services, principal: Principal) -> VideoJobPublic:
    video = to_video_public(job, services.store, video_store(services))
    return video.model_copy(update={"request_id": principal.public_request_id(video.request_id)})


def get_video_or_404(services: Services, job_id: str, principal: Principal) -> JobRecord:
    job = services.store.get(job_id)
    if job is None or job.kind != "video" or not principal.owns(job):
        raise HTTPException(404, f"video job {job_id} not found")
    return job


@router.post(
    "/v1/video/jobs", status_code=202, response_model=VideoJobPublic, operation_id="create_video_job"
)
async def create_video_job(
    body: VideoJobCreate,
    services: ServicesDep,
    principal: PrincipalDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
    client_id: ClientId = None,
    traceparent: TraceParent = None,
) -> VideoJobPublic:
    """Queue a video: text, a first frame, first and last frames, keyframes, or a video to restyle.
    A long clip (`long`) is made of segment jobs that run on any worker; the video stitches them."""
    body = with_idempotency_key(body, idempotency_key)
    trace_id = trace_id_from(traceparent)
    job, created = await run_in_threadpool(submit_video_as, principal, body, services, client_id, trace_id)
    response.headers["X-Trace-Id"] = job.trace_id or trace_id
    response.headers["Location"] = f"/v1/video/jobs/{job.id}"
    if not created:
        response.status_code = 200
    return public(job, services, principal)


@router.get("/v1/video/jobs", response_model=VideoJobList, operation_id="list_video_jobs")
def list_video_jobs(
    services: ServicesDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    state: JobState | None = None,
) -> VideoJobList:
    jobs, total = services.store.list_jobs(
        limit=limit,
        offset=offset,
        state=state,
        client_id=principal.key_id if principal.authenticated else None,
        kinds=("video",),
    )
    return VideoJobList(
        items=[public(job, services, principal) for job in jobs], total=total, limit=limit, offset=offset
    )


@router.get("/v1/video/jobs/{job_id}", response_model=VideoJobPublic, operation_id="get_video_job")
def get_video_job(job_id: str, services: ServicesDep, principal: PrincipalDep) -> VideoJobPublic:
    return public(get_video_or_404(services, job_id, principal), services, principal)


@router.delete("/v1/video/jobs/{job_id}", response_model=VideoJobPublic, operation_id="cancel_video_job")
def cancel_video_job(job_id: str, services: ServicesDep, principal: PrincipalDep) -> VideoJobPublic:
    """Cancel a video and its segments: queued parts at once, running ones at their next step."""
    get_video_or_404(services, job_id, principal)
    return public(services.store.request_cancel(job_id), services, principal)


@router.get(
    "/v1/video/files/{name}",
    operation_id="get_video_file",
    response_class=FileResponse,
    responses={200: {"content": {"video/mp4": {}, "video/webm": {}, "image/gif": {}, "image/webp": {}}}},
)
def get_video_file(name: str, services: ServicesDep, principal: PrincipalDep) -> Response:
    """A finished video, or a finished segment's preview clip (`segment_ready` events link here)."""
    stem, _, extension = name.rpartition(".")
    store = video_store(services)
    try:
        path = store.path(name)
    except ValueError:
        raise HTTPException(404, f"video file {name} not found") from None
    job = services.store.get(stem)
    if extension in ("npz", "json") or job is None or not principal.owns(job) or not path.is_file():
        raise HTTPException(404, f"video file {name} not found")
    scope = "private" if principal.authenticated else "public"
    return FileResponse(
        path, media_type=media_type_for(name), headers={"Cache-Control": f"{scope}, max-age=3600"}
    )


class VideoEstimate(BaseModel):
    model: str
    frames: int
    output_frames: int
    output_seconds: float
    segments: int
    estimated_seconds: float
    seconds_per_video_second: float
    cost: float | None
    cost_per_video_second: float | None
    device: str | None = Field(description="The calibrated device planned for; null: published figures.")
    calibrated: bool = Field(description="True when a stored video calibration scaled the estimate.")
    basis: str


class VideoEstimateRequest(VideoParams):
    gpu_price_per_hour: float | None = Field(None, ge=0, description="Price of one GPU-hour.")


@router.post("/v1/video/estimate", response_model=VideoEstimate, operation_id="estimate_video")
def estimate_video(
    body: VideoEstimateRequest, services: ServicesDep, principal: PrincipalDep
) -> VideoEstimate:
    """What a video request would cost, without queueing it: device-seconds, and with
    `gpu_price_per_hour` set, money, in total and per second of delivered video."""
    settings = services.settings
    models = services.catalog.models()
    asked = VideoParams.model_validate(body.model_dump(exclude_unset=True, exclude={"gpu_price_per_hour"}))
    if any(not key.image.startswith("sha256:") for key in asked.keyframes):  # estimates store nothing
        asked = asked.model_copy(
            update={
                "keyframes": [
                    key.model_copy(update={"image": "sha256:" + "0" * 64}) for key in asked.keyframes
                ]
            }
        )
    resolved, segments = resolve_video(asked, models, settings)
    speed = VideoCalibrationStore(services.store.engine).speed(
        resolved.model or "", settings.video_speed_scale
    )
    seconds = estimated_video_seconds(resolved, models[resolved.model].family, settings, speed)
    video_seconds = output_seconds(resolved)
    price = body.gpu_price_per_hour
    cost = None if price is None else price * seconds / 3600
    return VideoEstimate(
        model=resolved.model or "",
        frames=resolved.num_frames or 0,
        output_frames=output_frames(resolved),
        output_seconds=round(video_seconds, 3),
        segments=max(1, len(segments)),
        estimated_seconds=round(seconds, 3),
        seconds_per_video_second=round(seconds / video_seconds, 3),
        cost=None if cost is None else round(cost, 9),
        cost_per_video_second=None if cost is None else round(cost / video_seconds, 9),
        device=speed.device,
        calibrated=speed.calibrated,
        basis=speed.basis,
    )

"""OpenAI's Videos API over genserve's video jobs: create, retrieve, list, delete and download, as
the official `openai` client's `videos` resource calls them.

`POST /v1/videos` is a multipart form: `prompt`, `model`, `seconds`, `size` ("WxH") and an optional
`input_reference` picture (a file, or `input_reference[image_url]` as a data URL), which makes the
request image-to-video. genserve's extensions ride along as form fields: `steps`, `seed`, `fps`,
`negative_prompt`. Seconds become the nearest frame count the model's family accepts.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from genserve.api.deps import Services, ServicesDep
from genserve.api.forms import FORM_SLACK_BYTES, read_form, read_upload
from genserve.api.routes.jobs import ClientId
from genserve.api.routes.openai import OpenAIError
from genserve.api.routes.videos import submit_video_as, video_store
from genserve.api.video_submission import VideoJobCreate, video_file_name, video_model
from genserve.auth.deps import Principal, PrincipalDep
from genserve.engine.video.families import VIDEO_FAMILIES
from genserve.schemas import JobState, LimitError
from genserve.schemas.video import VideoKeyframe, VideoParams
from genserve.store.jobs import JobRecord

router = APIRouter(tags=["openai"])

_STATUS = {
    JobState.queued: "queued",
    JobState.waiting: "in_progress",
    JobState.running: "in_progress",
    JobState.succeeded: "completed",
    JobState.failed: "failed",
    JobState.canceled: "failed",
}


class VideoError(BaseModel):
    code: str
    message: str


class OpenAIVideo(BaseModel):
    id: str
    object: Literal["video"] = "video"
    created_at: int
    completed_at: int | None
    expires_at: int | None = None
    model: str
    progress: int
    prompt: str | None
    remixed_from_video_id: str | None = None
    seconds: str
    size: str
    status: str
    error: VideoError | None


class OpenAIVideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIVideo]
    first_id: str | None
    last_id: str | None
    has_more: bool


class OpenAIVideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool


def _progress(job: JobRecord, services: Services) -> int:
    if job.state == JobState.succeeded:
        return 100
    if job.state == JobState.queued and not job.started_at:
        return 0
    latest = services.store.events.latest(job.id, "progress")
    return int(latest["percent"]) if latest and "percent" in latest else 0


def to_openai(job: JobRecord, services: Services) -> OpenAIVideo:
    params = VideoParams.model_validate(job.params)
    seconds = (params.num_frames or 0) / (params.fps or 1)  # generated frames at their rate
    error = None
    if job.state in (JobState.failed, JobState.canceled):
        error = VideoError(code=job.state.value, message=job.error or job.state.value)
    return OpenAIVideo(
        id=job.id,
        created_at=int(job.created_at.timestamp()),
        completed_at=int(job.finished_at.timestamp()) if job.finished_at else None,
        model=params.model or "",
        progress=_progress(job, services),
        prompt=params.prompt,
        seconds=f"{seconds:g}",
        size=f"{params.width}x{params.height}",
        status=_STATUS[job.state],
        error=error,
    )


def _video_or_404(services: Services, video_id: str, principal: Principal) -> JobRecord:
    job = services.store.get(video_id)
    if job is None or job.kind != "video" or not principal.owns(job):
        raise OpenAIError(404, f"video {video_id} not found", "video_id", "not_found")
    return job


def _frames_for(seconds: float, fps: int, frame_step: int) -> int:
    """The frame count nearest seconds × fps that the family's frame rule accepts."""
    wanted = max(2, round(seconds * fps))
    return max(1, round((wanted - 1) / frame_step)) * frame_step + 1


@router.post("/v1/videos", response_model=OpenAIVideo, operation_id="openai_create_video")
async def create_video(
    request: Request, services: ServicesDep, principal: PrincipalDep, client_id: ClientId = None
) -> OpenAIVideo:
    limits = services.settings.limits
    try:
        form = await read_form(request, limits.max_upload_bytes + FORM_SLACK_BYTES, "input_reference")
    except HTTPException as error:
        raise OpenAIError(error.status_code, str(error.detail), "input_reference") from None
    fields: dict[str, Any] = {key: value for key, value in form.multi_items() if isinstance(value, str)}
    prompt = fields.get("prompt", "")
    if not prompt.strip():
        raise OpenAIError(
            400, "Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter"
        )
    reference = None
    if form.get("input_reference") is not None:
        data = await read_upload(form.get("input_reference"), "input_reference", limits.max_upload_bytes)
        reference = base64.b64encode(data).decode()
    elif fields.get("input_reference[image_url]"):
        reference = fields["input_reference[image_url]"]
    try:
        body = await run_in_threadpool(_request_from_form, fields, reference, services)
        job, _ = await run_in_threadpool(submit_video_as, principal, body, services, client_id, None)
    except LimitError as error:
        raise OpenAIError(400, error.message, error.field, "invalid_value") from None
    return to_openai(job, services)


def _request_from_form(fields: dict[str, Any], reference: str | None, services: Services) -> VideoJobCreate:
    settings = services.settings
    model = fields.get("model") or None
    info = video_model(VideoParams(model=model), services.catalog.models(), settings)
    family = VIDEO_FAMILIES[info.family]
    width = height = None
    if size := fields.get("size"):
        try:
            width, height = (int(part) for part in size.lower().split("x"))
        except ValueError:
            raise LimitError("size", f"size must be WIDTHxHEIGHT, not {size!r}") from None
    fps = int(fields["fps"]) if fields.get("fps") else info.default_fps or family.default_fps
    body: dict[str, Any] = {
        "model": info.name,
        "prompt": fields.get("prompt", ""),
        "negative_prompt": fields.get("negative_prompt", ""),
        "width": width,
        "height": height,
        "fps": fps,
    }
    if fields.get("seconds"):
        try:
            seconds = float(fields["seconds"])
        except ValueError:
            raise LimitError("seconds", f"seconds must be a number, not {fields['seconds']!r}") from None
        body["num_frames"] = _frames_for(seconds, fps, family.frame_step)
    for name in ("steps", "seed"):
        if fields.get(name):
            body[name] = int(fields[name])
    if reference is not None:
        body["mode"] = "i2v"
        body["keyframes"] = [VideoKeyframe(image=reference, frame_index=0)]
    try:
        return VideoJobCreate.model_validate({key: value for key, value in body.items() if value is not None})
    except ValueError as error:
        raise LimitError("body", str(error)) from None


@router.get("/v1/videos/{video_id}", response_model=OpenAIVideo, operation_id="openai_get_video")
def retrieve_video(video_id: str, services: ServicesDep, principal: PrincipalDep) -> OpenAIVideo:
    return to_openai(_video_or_404(services, video_id, principal), services)


@router.get("/v1/videos", response_model=OpenAIVideoList, operation_id="openai_list_videos")
def list_videos(
    services: ServicesDep,
    principal: PrincipalDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
) -> OpenAIVideoList:
    jobs, _ = services.store.list_jobs(
        limit=1000, client_id=principal.key_id if principal.authenticated else None, kinds=("video",)
    )
    if order == "asc":
        jobs.reverse()
    if after is not None:
        ids = [job.id for job in jobs]
        jobs = jobs[ids.index(after) + 1 :] if after in ids else []
    page = jobs[:limit]
    return OpenAIVideoList(
        data=[to_openai(job, services) for job in page],
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
        has_more=len(jobs) > limit,
    )


@router.delete("/v1/videos/{video_id}", response_model=OpenAIVideoDeleted, operation_id="openai_delete_video")
def delete_video(video_id: str, services: ServicesDep, principal: PrincipalDep) -> OpenAIVideoDeleted:
    """Cancel the job if it is still running and delete its files."""
    job = _video_or_404(services, video_id, principal)
    services.store.request_cancel(job.id)
    store = video_store(services)
    for name in (video_file_name(job.id, VideoParams.model_validate(job.params)), f"{job.id}.json"):
        if store.exists(name):
            store.path(name).unlink()
    return OpenAIVideoDeleted(id=job.id, deleted=True)


@router.get(
    "/v1/videos/{video_id}/content",
    operation_id="openai_video_content",
    response_class=FileResponse,
    responses={200: {"content": {"video/mp4": {}, "image/png": {}}}},
)
def video_content(
    video_id: str,
    services: ServicesDep,
    principal: PrincipalDep,
    variant: Literal["video", "thumbnail", "spritesheet"] = "video",
) -> Response:
    job = _video_or_404(services, video_id, principal)
    if job.state != JobState.succeeded:
        raise OpenAIError(409, f"video {video_id} is {_STATUS[job.state]}, not completed", "video_id")
    if variant == "video":
        name = video_file_name(job.id, VideoParams.model_validate(job.params))
        path = video_store(services).path(name)
        media = "video/mp4" if name.endswith(".mp4") else None
    else:
        path, media = services.images.path(f"{job.id}-thumb"), "image/png"
    if not path.is_file():
        raise OpenAIError(404, f"the {variant} of video {video_id} is gone", "video_id", "not_found")
    return FileResponse(path, media_type=media)

"""Batches on the server: submit a spec, follow its progress, cancel it, download its manifest."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Literal

import anyio
from fastapi import APIRouter, Header, HTTPException, Query
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from genserve.api.deps import ServicesDep
from genserve.api.routes.videos import submit_video_as, video_store
from genserve.api.sse import SSE_HEADERS
from genserve.auth.deps import Principal, PrincipalDep, admit_batch
from genserve.batch.expand import expand, expand_video, store_spec_pictures
from genserve.batch.runner import (
    manifest_csv,
    manifest_jsonl,
    manifest_rows,
    progress_counts,
    request_id_for,
    submit_items,
    video_job_body,
    video_manifest_rows,
)
from genserve.batch.spec import BatchSpec, PromptFile, SpecError, load_spec
from genserve.store.batches import BatchRecord, BatchStore

router = APIRouter(tags=["batches"])

ClientId = Annotated[str | None, Header(alias="X-Client-Id", max_length=200)]


class BatchPublic(BaseModel):
    id: str
    name: str
    created_at: datetime
    counts: dict[str, int]
    done: bool
    events_url: str
    manifest_url: str


def _owned_batch(services: ServicesDep, principal: Principal, batch_id: str) -> BatchRecord:
    """The batch, when this caller may see it: with auth on, only the key that submitted it does."""
    batch = BatchStore(services.store.engine).get(batch_id)
    if batch is None or (principal.authenticated and batch.client_id != principal.key_id):
        raise HTTPException(404, f"batch {batch_id} not found")
    return batch


def _public(services: ServicesDep, principal: Principal, batch_id: str) -> BatchPublic:
    batch = _owned_batch(services, principal, batch_id)
    job_ids = BatchStore(services.store.engine).job_ids(batch_id)
    counts = progress_counts(services.store, list(job_ids.values()), len(job_ids))
    finished = counts["succeeded"] + counts["failed"] + counts["canceled"]
    return BatchPublic(
        id=batch.id,
        name=batch.name,
        created_at=batch.created_at,
        counts=counts,
        done=finished == counts["total"],
        events_url=f"/v1/batches/{batch.id}/events",
        manifest_url=f"/v1/batches/{batch.id}/manifest",
    )


@router.post("/v1/batches", status_code=202, response_model=BatchPublic, operation_id="create_batch")
def create_batch(
    spec: BatchSpec, services: ServicesDep, principal: PrincipalDep, client_id: ClientId = None
) -> BatchPublic | JSONResponse:
    """Expand a spec (prompts inline or as a template) into items on the long queue.

    Items already rendered (by this spec before, or another spec sharing them) are not rendered again.
    """
    if isinstance(spec.prompts, PromptFile):
        detail = [{"loc": ["body", "prompts", "file"], "msg": "prompt files are read locally only; "
                   "send the prompts inline or as a template", "type": "value_error"}]  # fmt: skip
        return JSONResponse({"detail": detail}, status_code=422)
    models = services.catalog.models()
    try:
        parsed, base_dir = load_spec(spec.model_dump())
        # pictures by hash from here on: the stored spec stays small and expands the same later
        parsed = store_spec_pictures(
            parsed, base_dir, services.inputs, services.settings.limits, local_files=False
        )
        if parsed.kind == "video":
            items = expand_video(parsed, base_dir, models, services.settings)
        else:
            items = expand(parsed, base_dir, models, services.settings, services.inputs)
    except SpecError as error:
        detail = [
            {"loc": ["body", line.split(":", 1)[0]], "msg": line, "type": "spec_error"}
            for line in error.errors
        ]
        return JSONResponse({"detail": detail}, status_code=422)
    client = principal.client_id(client_id)
    if parsed.kind == "video":
        # Each clip as POST /v1/video/jobs takes it: the key's model, size and GPU-seconds limits.
        job_ids = {}
        for item in items:
            job, _ = submit_video_as(
                principal, video_job_body(item, parsed, request_id_for(item)), services, client_id
            )
            job_ids[item.key] = job.id
    else:
        admit_batch(principal, items, services)  # the key's model, size and quota limits
        job_ids = submit_items(services.store, items, parsed, models, client, principal.key_id)
    batch_id = BatchStore(services.store.engine).create(
        parsed.name, parsed.model_dump(), [(item.key, job_ids[item.key]) for item in items], client
    )
    return _public(services, principal, batch_id)


@router.get("/v1/batches/{batch_id}", response_model=BatchPublic, operation_id="get_batch")
def get_batch(batch_id: str, services: ServicesDep, principal: PrincipalDep) -> BatchPublic:
    return _public(services, principal, batch_id)


@router.delete("/v1/batches/{batch_id}", response_model=BatchPublic, operation_id="cancel_batch")
def cancel_batch(batch_id: str, services: ServicesDep, principal: PrincipalDep) -> BatchPublic:
    """Cancel every unfinished item (queued at once, running at the next step)."""
    _owned_batch(services, principal, batch_id)
    for job_id in BatchStore(services.store.engine).job_ids(batch_id).values():
        services.store.request_cancel(job_id)
    return _public(services, principal, batch_id)


@router.get(
    "/v1/batches/{batch_id}/manifest", operation_id="batch_manifest", response_class=PlainTextResponse
)
def batch_manifest(
    batch_id: str,
    services: ServicesDep,
    principal: PrincipalDep,
    format: Annotated[Literal["jsonl", "csv"], Query()] = "jsonl",
) -> PlainTextResponse:
    """One row per item: key, prompt, parameters, seed, image URL, sha256, timings, errors."""
    batch = _owned_batch(services, principal, batch_id)
    parsed, base_dir = load_spec(batch.spec)
    models = services.catalog.models()
    job_ids = BatchStore(services.store.engine).job_ids(batch_id)
    jobs = services.store.get_many(list(job_ids.values()))
    if parsed.kind == "video":
        items = expand_video(parsed, base_dir, models, services.settings)
        rows = video_manifest_rows(parsed, items, job_ids, jobs, video_store(services), None)
    else:
        items = expand(parsed, base_dir, models, services.settings, services.inputs)
        rows = manifest_rows(parsed, items, job_ids, jobs, services.images, None)
    if format == "csv":
        return PlainTextResponse(manifest_csv(rows), media_type="text/csv")
    return PlainTextResponse(manifest_jsonl(rows), media_type="application/x-ndjson")


@router.get(
    "/v1/batches/{batch_id}/events",
    operation_id="batch_events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "SSE stream of batch progress"}},
)
def batch_events(batch_id: str, services: ServicesDep, principal: PrincipalDep) -> StreamingResponse:
    """`progress` events with the counts whenever they change (id = items finished), then `completed`."""
    _owned_batch(services, principal, batch_id)

    async def stream():  # noqa: ANN202
        last = None
        while True:
            batch = await run_in_threadpool(_public, services, principal, batch_id)
            counts = batch.counts
            if counts != last:
                finished = counts["succeeded"] + counts["failed"] + counts["canceled"]
                kind = "completed" if batch.done else "progress"
                yield f"id: {finished}\nevent: {kind}\ndata: {json.dumps(counts)}\n\n"
                last = counts
                if batch.done:
                    return
            await anyio.sleep(0.5)

    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)

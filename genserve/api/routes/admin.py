"""Admin endpoints (admin keys only): API keys, and the queue across all keys."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, Field

from genserve.api.deps import ServicesDep
from genserve.api.submission import to_public
from genserve.auth.deps import AuthState, require_admin
from genserve.auth.keys import ApiKey, KeyLimits, Role
from genserve.schemas import JobList, JobPublic, JobState

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)])


class KeyLimitsModel(BaseModel):
    rate_per_second: float | None = Field(
        None, gt=0, description="Requests per second; server default if omitted."
    )
    rate_burst: int | None = Field(None, ge=1, description="Bucket size; server default if omitted.")
    images_per_day: int | None = Field(None, ge=0, description="Images per UTC day; unlimited if omitted.")
    gpu_seconds_per_day: float | None = Field(
        None, ge=0, description="GPU-seconds per UTC day; unlimited if omitted."
    )
    allowed_models: list[str] | None = Field(None, description="Models this key may use; all if omitted.")
    max_width: int | None = Field(None, ge=8, description="Largest width this key may ask for.")
    max_height: int | None = Field(None, ge=8, description="Largest height this key may ask for.")
    allowed_controls: list[str] | None = Field(
        None, description="ControlNets, T2I-Adapters and IP-Adapters this key may use; all if omitted."
    )
    allowed_loras: list[str] | None = Field(None, description="LoRAs this key may use; all if omitted.")


class KeyCreate(KeyLimitsModel):
    name: str = Field(..., min_length=1, max_length=200)
    role: Role = "user"


class KeyPublic(KeyLimitsModel):
    id: str
    name: str
    role: Role
    created_at: datetime
    revoked_at: datetime | None


class KeyCreated(KeyPublic):
    token: str = Field(description="The API key. Shown once: only its hash is stored.")


class KeyUsage(BaseModel):
    key_id: str
    images_today: int
    gpu_seconds_today: float


def _public(key: ApiKey) -> KeyPublic:
    return KeyPublic(
        id=key.id, name=key.name, role=key.role, created_at=key.created_at, revoked_at=key.revoked_at,
        **vars(key.limits),
    )  # fmt: skip


def _auth(request: Request) -> AuthState:
    return request.app.state.auth


@router.get("/keys", response_model=list[KeyPublic], operation_id="admin_list_keys")
def list_keys(request: Request) -> list[KeyPublic]:
    return [_public(key) for key in _auth(request).keys.list()]


@router.post("/keys", response_model=KeyCreated, status_code=201, operation_id="admin_create_key")
def create_key(body: KeyCreate, request: Request) -> KeyCreated:
    limits = KeyLimits(**body.model_dump(include=set(KeyLimitsModel.model_fields)))
    key, token = _auth(request).keys.create(body.name, body.role, limits)
    return KeyCreated(**_public(key).model_dump(), token=token)


@router.delete("/keys/{key_id}", response_model=KeyPublic, operation_id="admin_revoke_key")
def revoke_key(key_id: str, request: Request) -> KeyPublic:
    key = _auth(request).keys.revoke(key_id)
    if key is None:
        raise HTTPException(404, f"key {key_id} not found")
    return _public(key)


@router.get("/keys/{key_id}/usage", response_model=KeyUsage, operation_id="admin_key_usage")
def key_usage(key_id: str, request: Request) -> KeyUsage:
    keys = _auth(request).keys
    if keys.get(key_id) is None:
        raise HTTPException(404, f"key {key_id} not found")
    used = keys.usage(key_id)
    return KeyUsage(key_id=key_id, images_today=used.images, gpu_seconds_today=used.gpu_seconds)


@router.get("/jobs", response_model=JobList, operation_id="admin_list_jobs")
def list_all_jobs(
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    state: JobState | None = None,
    client_id: Annotated[str | None, Query(description="A key id (or X-Client-Id with auth off).")] = None,
) -> JobList:
    """Every key's jobs, newest first; `state=queued` is the queue."""
    jobs, total = services.store.list_jobs(limit=limit, offset=offset, state=state, client_id=client_id)
    return JobList(
        items=[to_public(job, services.store) for job in jobs], total=total, limit=limit, offset=offset
    )


@router.delete("/jobs/{job_id}", response_model=JobPublic, operation_id="admin_cancel_job")
def cancel_any_job(job_id: str, services: ServicesDep) -> JobPublic:
    """Cancel any key's job: a queued one at once, a running one at its next step."""
    job = services.store.request_cancel(job_id)
    if job is None:
        raise HTTPException(404, f"job {job_id} not found")
    return to_public(job, services.store)

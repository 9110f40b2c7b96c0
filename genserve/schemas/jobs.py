"""Job resource schemas: create / public / list, plus the public event shape."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

from genserve.schemas.generation import GenerationParams
from genserve.schemas.text import SafeText


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"
    # A long video waits while its segments run (each a job of its own); it is queued again,
    # exactly once, when the last one succeeds, and then stitches them.
    waiting = "waiting"

    @property
    def is_terminal(self) -> bool:
        return self in (JobState.succeeded, JobState.failed, JobState.canceled)


class JobCreate(GenerationParams):
    """POST /v1/jobs body: generation parameters plus delivery options."""

    request_id: SafeText | None = Field(
        None,
        max_length=200,
        description="Idempotency key (the Idempotency-Key header works too). "
        "Resubmitting returns the existing job; different parameters get 409.",
    )
    priority: int = Field(0, ge=-10, le=10, description="Higher runs first.")


class ImageRef(BaseModel):
    id: str
    url: str


class JobPublic(BaseModel):
    id: str
    request_id: str | None
    state: JobState
    params: GenerationParams
    priority: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    max_attempts: int
    error: str | None
    images: list[ImageRef]
    queue: str = Field("short", description="short or long, chosen from the estimated cost at submit.")
    estimated_seconds: float | None = Field(None, description="The cost model's estimate of the run time.")
    queue_position: int | None = Field(
        None, description="Jobs ahead in the same queue (0 = next); only while queued."
    )
    estimated_start_at: datetime | None = Field(
        None, description="Estimated start: the estimated work ahead in its queue over the live workers."
    )
    events_url: str


class JobList(BaseModel):
    items: list[JobPublic]
    total: int
    limit: int
    offset: int


class EventPublic(BaseModel):
    """One SSE event. `id` is a per-job sequence number, usable as Last-Event-ID."""

    id: int
    job_id: str
    type: str
    data: dict[str, Any]
    created_at: datetime

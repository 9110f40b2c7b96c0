"""Server-sent events for one job, read from the durable event log.

Each event's SSE `id` is its per-job sequence number, so a client that reconnects with
`Last-Event-ID: k` receives exactly the events after k. The stream ends after a terminal event.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import anyio
from starlette.concurrency import run_in_threadpool

from genserve.events.log import Event
from genserve.store.jobs import JobStore

TERMINAL_EVENTS = {"succeeded", "failed", "canceled"}
KEEPALIVE_SECONDS = 15.0
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def present_event(event: Event, store: JobStore) -> dict:
    """The public payload: image ids become URLs, and `queued` carries the current queue position."""
    data = dict(event.data)
    if event.type == "succeeded":
        data["images"] = [{"id": i, "url": f"/v1/images/{i}"} for i in event.data.get("images", [])]
    elif event.type == "queued" and "queue_position" not in data:
        data["queue_position"] = store.queue_position(event.job_id)
    data["job_id"] = event.job_id
    return data


def format_sse(event: Event, data: dict) -> str:
    return f"id: {event.seq}\nevent: {event.type}\ndata: {json.dumps(data, default=str)}\n\n"


MAX_EVENT_SEQ = 2**62  # the input guard refuses longer ids; a direct caller is clamped below bigint


def parse_last_event_id(header: str | None) -> int:
    try:
        return min(MAX_EVENT_SEQ, max(0, int(header))) if header else 0
    except ValueError:
        return 0


async def job_event_stream(
    store: JobStore, job_id: str, after_seq: int = 0, poll_seconds: float = 0.1
) -> AsyncIterator[str]:
    last_seq = after_seq
    last_sent = time.monotonic()
    while True:
        events = await run_in_threadpool(store.events.read_after, job_id, last_seq)
        for event in events:
            data = await run_in_threadpool(present_event, event, store)
            yield format_sse(event, data)
            last_seq = event.seq
            last_sent = time.monotonic()
            if event.type in TERMINAL_EVENTS:
                return
        if not events:
            if time.monotonic() - last_sent > KEEPALIVE_SECONDS:
                yield ": keepalive\n\n"
                last_sent = time.monotonic()
            await anyio.sleep(poll_seconds)

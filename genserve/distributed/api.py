"""What an API replica adds in multi-node mode: progress from Redis Streams, and the reaper."""

from __future__ import annotations

from typing import TYPE_CHECKING

from genserve.config import Settings
from genserve.store.jobs import JobStore

if TYPE_CHECKING:
    from genserve.distributed.reaper import Reaper


def attach_distributed(settings: Settings, store: JobStore) -> Reaper | None:
    """Wire an API replica for multi-node mode; returns the reaper to start (None in embedded mode)."""
    if settings.redis_events_url:
        from genserve.events.redis_streams import RedisStreamEventLog

        store.events = RedisStreamEventLog(
            store.engine,
            settings.redis_events_url,
            maxlen=settings.event_stream_maxlen,
            ttl_seconds=settings.event_stream_ttl_seconds,
        )
    if not settings.broker_url:
        return None
    from genserve.distributed.reaper import Reaper  # imports Celery: multi-node mode only

    return Reaper(settings, store)

"""Progress events in Redis Streams, state transitions in SQL, read back as one resumable log.

The store writes state transitions (queued, started, requeued, succeeded, ...) into `job_events` in the
transaction that changes the state; those stay in SQL. Progress and preview events, many per job, go
to Redis instead: one stream per job, capped at `maxlen` entries, expiring `ttl` seconds after the last
write. Writing to Redis is best-effort: when it fails, the events go to the SQL log, so a Redis outage
never fails a job.

Each progress event gets a per-job number n (a Redis counter, in the same script as the XADD, which
uses `n-0` as the entry id). A reader merges the SQL events (seq s) with the stream (n) by time, and
each merged event gets the id `s * 2**20 + n` of the position reached, so the SSE id stays an
integer and `Last-Event-ID` resumes exactly on any API replica. Embedded mode never uses this class.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

import redis
import sqlalchemy as sa

from genserve.events.log import Event, EventLog

log = logging.getLogger(__name__)

SHIFT = 2**20  # progress numbers per job fit below this; seq = sql_seq * SHIFT + progress_number
_RETRY_REDIS_AFTER_SECONDS = 5.0
KEY_PREFIX = "genserve:events:"

_APPEND = """
local n = redis.call('INCR', KEYS[2])
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], n .. '-0', 'type', ARGV[3], 'data', ARGV[4], 'ts', ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return n
"""


def split_seq(seq: int) -> tuple[int, int]:
    """A merged event id as (SQL seq, progress number)."""
    return divmod(seq, SHIFT)


class RedisStreamEventLog:
    """`EventLog`'s interface (append, append_many, read_after) over SQL transitions + Redis progress."""

    def __init__(
        self, engine: sa.Engine, redis_url: str, *, maxlen: int = 2000, ttl_seconds: int = 3600
    ) -> None:
        self.sql = EventLog(engine)
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self.maxlen = maxlen
        self.ttl_seconds = ttl_seconds
        self._script = self.redis.register_script(_APPEND)
        self._down_until = 0.0  # after a failure, skip Redis for a while instead of timing out per step

    def _keys(self, job_id: str) -> tuple[str, str]:
        return f"{KEY_PREFIX}{job_id}", f"{KEY_PREFIX}{job_id}:n"

    def _redis_usable(self) -> bool:
        return time.monotonic() >= self._down_until

    def _redis_failed(self, what: str) -> None:
        self._down_until = time.monotonic() + _RETRY_REDIS_AFTER_SECONDS
        log.warning("redis %s failed; using the SQL event log", what, exc_info=True)

    def append(self, job_id: str, type: str, data: dict[str, Any]) -> Event:
        return self.append_many([(job_id, type, data)])[0]

    def append_many(self, events: list[tuple[str, str, dict[str, Any]]]) -> list[Event]:
        """Append to the jobs' streams in one round trip; on any Redis error, to SQL instead."""
        if not events:
            return []
        now = datetime.now(UTC)
        if self._redis_usable():
            try:
                pipe = self.redis.pipeline(transaction=False)
                for job_id, type, data in events:
                    self._script(
                        keys=list(self._keys(job_id)),
                        args=[self.maxlen, self.ttl_seconds, type, json.dumps(data), now.timestamp()],
                        client=pipe,
                    )
                numbers = pipe.execute()
                return [
                    Event(job_id=job_id, seq=n, type=type, data=data, created_at=now)
                    for (job_id, type, data), n in zip(events, numbers, strict=True)
                ]
            except redis.RedisError:
                self._redis_failed("append")
        return self.sql.append_many(events)

    def _read_stream(self, job_id: str, after_n: int) -> list[tuple[int, Event]]:
        if not self._redis_usable():
            return []
        try:
            entries = self.redis.xrange(self._keys(job_id)[0], min=f"{after_n + 1}-0", max="+")
        except redis.RedisError:
            self._redis_failed("read")
            return []
        read = []
        for entry_id, fields in entries:
            n = int(entry_id.split(b"-")[0])
            created = datetime.fromtimestamp(float(fields[b"ts"]), UTC)
            event = Event(job_id, n, fields[b"type"].decode(), json.loads(fields[b"data"]), created)
            read.append((n, event))
        return read

    def read_after(self, job_id: str, after_seq: int = 0, limit: int = 1000) -> list[Event]:
        """Events after the merged position `after_seq`, oldest first, each carrying its merged seq.

        SQL is read before Redis, so progress written before a terminal event is always read with it.
        """
        sql_seq, progress_n = split_seq(after_seq)
        tagged = [(event.created_at, 0, event) for event in self.sql.read_after(job_id, sql_seq, limit)]
        tagged += [(event.created_at, 1, event) for _, event in self._read_stream(job_id, progress_n)]
        tagged.sort(key=lambda item: (item[0], item[1], item[2].seq))
        merged = []
        for _, from_redis, event in tagged[:limit]:
            if from_redis:
                progress_n = event.seq
            else:
                sql_seq = event.seq
            merged.append(
                Event(event.job_id, sql_seq * SHIFT + progress_n, event.type, event.data, event.created_at)
            )
        return merged

"""The durable, resumable per-job event log.

Each job's events are numbered 1, 2, 3... with no gaps. The number is the SSE `id:`, so a client
that reconnects with Last-Event-ID k reads exactly the events after k.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from genserve.store.db import db_now, write_transaction
from genserve.store.tables import job_events

# Each retry follows a commit by a competing appender, so this bound is never reached in practice.
_MAX_APPEND_TRIES = 50


@dataclass(frozen=True)
class Event:
    job_id: str
    seq: int
    type: str
    data: dict[str, Any]
    created_at: datetime


def append_event(conn: sa.Connection, job_id: str, type: str, data: dict[str, Any]) -> Event:
    """Append an event inside the caller's open transaction, so it commits with the caller's change.

    seq is max(seq)+1 for the job. Two appenders on PostgreSQL can compute the same number; the
    loser hits the (job_id, seq) primary key and tries again after the winner's commit. The
    savepoint keeps the caller's transaction usable after that failure.
    """
    now = db_now(conn)
    next_seq = (
        sa.select(sa.func.coalesce(sa.func.max(job_events.c.seq), 0) + 1)
        .where(job_events.c.job_id == job_id)
        .scalar_subquery()
    )
    for _ in range(_MAX_APPEND_TRIES):
        try:
            with conn.begin_nested():
                seq = conn.execute(
                    job_events.insert()
                    .values(job_id=job_id, seq=next_seq, type=type, data=data, created_at=now)
                    .returning(job_events.c.seq)
                ).scalar_one()
        except sa.exc.IntegrityError:
            continue
        return Event(job_id=job_id, seq=seq, type=type, data=data, created_at=now)
    raise RuntimeError(f"could not append a {type!r} event to job {job_id} after {_MAX_APPEND_TRIES} tries")


class EventLog:
    """Reads and appends job events on one engine."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def append(self, job_id: str, type: str, data: dict[str, Any]) -> Event:
        """Append in a transaction of its own (progress events from a worker)."""
        with write_transaction(self.engine) as conn:
            return append_event(conn, job_id, type, data)

    def append_many(self, events: list[tuple[str, str, dict[str, Any]]]) -> list[Event]:
        """Append (job_id, type, data) events in one transaction: a batch's progress for one step.

        One query for the jobs' last numbers and one multi-row insert, however many jobs the batch
        holds: the worker writes these between two denoising steps, where every millisecond counts.
        """
        if not events:
            return []
        job_ids = sorted({job_id for job_id, _, _ in events})
        last_seq = (
            sa.select(job_events.c.job_id, sa.func.max(job_events.c.seq))
            .where(job_events.c.job_id.in_(job_ids))
            .group_by(job_events.c.job_id)
        )
        with write_transaction(self.engine) as conn:
            now = db_now(conn)
            last = dict(conn.execute(last_seq).tuples().all())
            appended = []
            for job_id, type, data in events:
                last[job_id] = last.get(job_id, 0) + 1
                appended.append(Event(job_id=job_id, seq=last[job_id], type=type, data=data, created_at=now))
            try:
                with conn.begin_nested():  # an Event's fields are job_events' columns
                    conn.execute(job_events.insert(), [asdict(event) for event in appended])
            except sa.exc.IntegrityError:
                # Another appender (an API transition) took a number since the read: fall back to
                # one event at a time, each numbered inside its own insert.
                return [append_event(conn, job_id, type, data) for job_id, type, data in events]
            return appended

    def read_after(self, job_id: str, after_seq: int = 0, limit: int = 1000) -> list[Event]:
        """Events with seq > after_seq, oldest first."""
        query = (
            sa.select(job_events)
            .where(job_events.c.job_id == job_id, job_events.c.seq > after_seq)
            .order_by(job_events.c.seq)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [
            Event(job_id=r.job_id, seq=r.seq, type=r.type, data=r.data, created_at=r.created_at) for r in rows
        ]

    def latest(self, job_id: str, type: str) -> dict[str, Any] | None:
        """The data of the job's newest event of this type (a video's progress for polling clients)."""
        query = (
            sa.select(job_events.c.data)
            .where(job_events.c.job_id == job_id, job_events.c.type == type)
            .order_by(job_events.c.seq.desc())
            .limit(1)
        )
        with self.engine.connect() as conn:
            return conn.execute(query).scalar()

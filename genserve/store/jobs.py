"""The job store: every job state transition, each with its event in the same transaction.

Safe for many worker processes on many machines sharing one database:

- A claimed job is leased to one worker until `lease_until`; the worker renews it by heartbeat.
- Every write a worker makes about its job is fenced by (lease_owner, attempt). Once a job has been
  reaped or claimed again, the old worker's writes match no row and return False.
- Every transition is a conditional UPDATE, so two processes racing for one job cannot both win.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import uuid4

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from genserve.events.log import EventLog, append_event
from genserve.schemas.jobs import JobState
from genserve.store.db import create_db_engine, db_now, write_transaction
from genserve.store.tables import jobs, workers

QUEUED, RUNNING, WAITING = JobState.queued.value, JobState.running.value, JobState.waiting.value
SEGMENT = "segment"
# The claim order. `_ahead_of` below must agree with it.
_QUEUE_ORDER = (jobs.c.priority.desc(), jobs.c.created_at, jobs.c.id)
# Claims lost to other workers before claim_next gives up for this poll.
_MAX_CLAIM_TRIES = 20


class IdempotencyConflict(Exception):
    """A request_id was reused with different parameters. `job_id` is the job it already names."""

    def __init__(self, job_id: str, request_id: str) -> None:
        super().__init__(f"request_id {request_id!r} was already used for job {job_id} with other parameters")
        self.job_id = job_id
        self.request_id = request_id


@dataclass(frozen=True)
class JobRecord:
    id: str
    request_id: str | None
    request_hash: str | None
    params: dict[str, Any]
    state: JobState
    priority: int
    client_id: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    attempt: int  # claims so far
    max_attempts: int
    lease_owner: str | None
    lease_until: datetime | None
    cancel_requested: bool
    error: str | None
    image_ids: list[str]
    queue: str = "short"
    estimated_seconds: float | None = None
    trace_id: str | None = None
    retry_on_error: bool | None = None
    not_before: datetime | None = None
    kind: str = "image"  # image | video | segment (store/db.py)
    parent_id: str | None = None
    segment_index: int | None = None


@dataclass(frozen=True)
class HeartbeatResult:
    owned: bool  # False: the lease is lost; the worker must stop and write no results
    cancel_requested: bool


@dataclass(frozen=True)
class WorkerRecord:
    id: str
    host: str
    pid: int
    state: str  # starting | ready | stopping
    models_loaded: list[str]
    last_seen: datetime


def _record(row: sa.Row) -> JobRecord:
    return JobRecord(**{**row._mapping, "state": JobState(row.state), "image_ids": list(row.image_ids)})


def _in_chunks(values: list[str], size: int = 500) -> Iterator[list[str]]:
    """`values` in slices of `size`, so an IN list stays small (SQLite and PostgreSQL both cope badly
    with tens of thousands of bound parameters)."""
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _owned(job_id: str, worker_id: str, attempt: int) -> sa.ColumnElement[bool]:
    """The fence: the job is running under this worker's lease for this attempt."""
    return sa.and_(
        jobs.c.id == job_id,
        jobs.c.state == RUNNING,
        jobs.c.lease_owner == worker_id,
        jobs.c.attempt == attempt,
    )


def _ahead_of(job: sa.Row) -> sa.ColumnElement[bool]:
    """Rows that `_QUEUE_ORDER` puts before `job`."""
    same_priority_earlier = sa.or_(
        jobs.c.created_at < job.created_at,
        sa.and_(jobs.c.created_at == job.created_at, jobs.c.id < job.id),
    )
    return sa.or_(
        jobs.c.priority > job.priority,
        sa.and_(jobs.c.priority == job.priority, same_priority_earlier),
    )


class JobStore:
    """The single source of truth for jobs and workers. `events` is the event log on the same database."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.events = EventLog(engine)

    @classmethod
    def from_url(cls, url: str) -> JobStore:
        return cls(create_db_engine(url))

    def close(self) -> None:
        """Close pooled connections (the process is stopping, or a test is done)."""
        self.engine.dispose()

    # -- submitting and reading ------------------------------------------------------------------

    def submit(
        self,
        params: dict[str, Any],
        *,
        request_id: str | None = None,
        request_hash: str | None = None,
        priority: int = 0,
        max_attempts: int = 3,
        client_id: str | None = None,
        queue: str = "short",
        estimated_seconds: float | None = None,
        trace_id: str | None = None,
        retry_on_error: bool = False,
        kind: str = "image",
        segments: list[dict[str, Any]] | None = None,
        chained: bool = False,
    ) -> tuple[JobRecord, bool]:
        """Queue a job; returns (job, created). A known request_id returns its job instead.

        With `segments` (a long video), the job waits and each segment is a job of its own, in the
        same transaction: all queued at once, or with `chained` one at a time, each queued when the
        one before it succeeds (see `_segment_ended`).

        Raises IdempotencyConflict when the request_id is known with a different request_hash.
        """
        try:
            with write_transaction(self.engine) as conn:
                existing = self._find_request(conn, request_id)
                if existing is None:
                    now = db_now(conn)
                    row = conn.execute(
                        jobs.insert()
                        .values(
                            id=uuid4().hex,
                            request_id=request_id,
                            request_hash=request_hash,
                            params=params,
                            state=WAITING if segments else QUEUED,
                            kind=kind,
                            priority=priority,
                            client_id=client_id,
                            created_at=now,
                            updated_at=now,
                            attempt=0,
                            max_attempts=max_attempts,
                            cancel_requested=False,
                            image_ids=[],
                            queue=queue,
                            estimated_seconds=estimated_seconds,
                            trace_id=trace_id,
                            retry_on_error=retry_on_error or None,
                        )
                        .returning(*jobs.c)
                    ).one()
                    append_event(conn, row.id, "queued", {})
                    if segments:
                        self._insert_segments(conn, row, segments, chained)
                    return _record(row), True
        except sa.exc.IntegrityError:
            if request_id is None:
                raise
            # A concurrent submit of the same key committed first (PostgreSQL): that job wins.
            with self.engine.connect() as conn:
                existing = self._find_request(conn, request_id)
            if existing is None:
                raise
        if request_hash is not None and existing.request_hash not in (None, request_hash):
            raise IdempotencyConflict(existing.id, existing.request_id or "")
        return existing, False

    @staticmethod
    def _insert_segments(
        conn: sa.Connection, parent: sa.Row, segments: list[dict[str, Any]], chained: bool
    ) -> None:
        now = db_now(conn)
        for index, params in enumerate(segments):
            state = WAITING if chained and index > 0 else QUEUED
            segment_id = f"{parent.id[:28]}s{index:03d}"  # deterministic: readable next to its video
            conn.execute(
                jobs.insert().values(
                    id=segment_id,
                    params=params,
                    state=state,
                    kind=SEGMENT,
                    parent_id=parent.id,
                    segment_index=index,
                    priority=parent.priority,
                    client_id=parent.client_id,
                    created_at=now,
                    updated_at=now,
                    attempt=0,
                    max_attempts=parent.max_attempts,
                    cancel_requested=False,
                    image_ids=[],
                    queue=parent.queue,
                    estimated_seconds=(parent.estimated_seconds or 0.0) / len(segments),
                    trace_id=parent.trace_id,
                )
            )
            append_event(conn, segment_id, "queued" if state == QUEUED else "waiting", {"parent": parent.id})
        append_event(conn, parent.id, "segments", {"count": len(segments), "chained": chained})

    def segments_of(self, parent_id: str) -> list[JobRecord]:
        """A long video's segment jobs, in order."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(jobs).where(jobs.c.parent_id == parent_id).order_by(jobs.c.segment_index)
            ).all()
        return [_record(row) for row in rows]

    @staticmethod
    def _find_request(conn: sa.Connection, request_id: str | None) -> JobRecord | None:
        if request_id is None:
            return None
        row = conn.execute(sa.select(jobs).where(jobs.c.request_id == request_id)).first()
        return _record(row) if row else None

    def known_request_ids(self, request_ids: list[str]) -> set[str]:
        """Which of these request ids already have a job (a batch's de-duplicated items)."""
        known: set[str] = set()
        with self.engine.connect() as conn:
            for chunk in _in_chunks(request_ids):
                known.update(
                    conn.execute(sa.select(jobs.c.request_id).where(jobs.c.request_id.in_(chunk))).scalars()
                )
        return known

    def get(self, job_id: str) -> JobRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
        return _record(row) if row else None

    def list_jobs(
        self,
        *,
        limit: int = 50,
        offset: int = 0,
        state: JobState | None = None,
        client_id: str | None = None,
        kinds: tuple[str, ...] = ("image",),
    ) -> tuple[list[JobRecord], int]:
        """One page of jobs of these kinds, newest first, and the total that match the filters."""
        filters = [jobs.c.kind.in_(kinds)]
        if state is not None:
            filters.append(jobs.c.state == JobState(state).value)
        if client_id is not None:
            filters.append(jobs.c.client_id == client_id)
        page_query = (
            sa.select(jobs)
            .where(*filters)
            .order_by(jobs.c.created_at.desc(), jobs.c.id.desc())
            .limit(limit)
            .offset(offset)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(page_query).all()
            total = conn.execute(sa.select(sa.func.count()).select_from(jobs).where(*filters)).scalar_one()
        return [_record(r) for r in rows], total

    def queue_position(self, job_id: str) -> int | None:
        """How many queued jobs will be claimed before this one (0 = next); None unless queued."""
        with self.engine.connect() as conn:
            job = conn.execute(
                sa.select(jobs.c.id, jobs.c.priority, jobs.c.created_at).where(
                    jobs.c.id == job_id, jobs.c.state == QUEUED
                )
            ).first()
            if job is None:
                return None
            ahead = sa.select(sa.func.count()).select_from(jobs).where(jobs.c.state == QUEUED, _ahead_of(job))
            return conn.execute(ahead).scalar_one()

    def queue_standing(self, job_id: str) -> tuple[int, float] | None:
        """(jobs ahead in the same queue, their estimated seconds in total); None unless queued.

        The scheduler interleaves the two queues by share and batches compatible jobs, so this is
        an estimate: an upper bound on the wait for the job's own queue.
        """
        with self.engine.connect() as conn:
            job = conn.execute(
                sa.select(jobs.c.id, jobs.c.priority, jobs.c.created_at, jobs.c.queue).where(
                    jobs.c.id == job_id, jobs.c.state == QUEUED
                )
            ).first()
            if job is None:
                return None
            ahead = sa.select(
                sa.func.count(), sa.func.coalesce(sa.func.sum(jobs.c.estimated_seconds), 0.0)
            ).where(jobs.c.state == QUEUED, jobs.c.queue == job.queue, _ahead_of(job))
            count, seconds = conn.execute(ahead).one()
            return int(count), float(seconds)

    def counts_by_state(self) -> dict[str, int]:
        counts = {state.value: 0 for state in JobState}
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(jobs.c.state, sa.func.count()).group_by(jobs.c.state)).all()
        counts.update({state: n for state, n in rows})
        return counts

    # -- a worker's side of a job ----------------------------------------------------------------

    def claim_next(self, worker_id: str, lease_seconds: float) -> JobRecord | None:
        """Lease the next queued job (priority, then arrival) to this worker; None when nothing is queued."""
        while head := self.queued_jobs(limit=_MAX_CLAIM_TRIES):
            for job in head:  # in queue order; a job another worker took meanwhile is skipped
                claimed = self.claim_jobs([job.id], worker_id, lease_seconds)
                if claimed:
                    return claimed[0]
        return None

    def get_many(self, job_ids: list[str]) -> dict[str, JobRecord]:
        """Jobs by id (missing ids are left out), in chunks so the IN list stays small."""
        found: dict[str, JobRecord] = {}
        with self.engine.connect() as conn:
            for chunk in _in_chunks(job_ids):
                for row in conn.execute(sa.select(jobs).where(jobs.c.id.in_(chunk))):
                    found[row.id] = _record(row)
        return found

    def counts_for(self, job_ids: list[str]) -> dict[str, int]:
        """How many of these jobs are in each state: one aggregate per chunk, not a record per job
        (a batch of 10,000 items on SQLite: 27 ms instead of 348 ms, benchmarks/batch_progress_count.py)."""
        counts = {state.value: 0 for state in JobState}
        with self.engine.connect() as conn:
            for chunk in _in_chunks(job_ids):
                query = (
                    sa.select(jobs.c.state, sa.func.count())
                    .where(jobs.c.id.in_(chunk))
                    .group_by(jobs.c.state)
                )
                for state, count in conn.execute(query):
                    counts[state] += count
        return counts

    def reopen(self, job_id: str, extra_attempts: int) -> bool:
        """A failed or canceled job goes back to the queue with `extra_attempts` more attempts (a batch re-run)."""
        with write_transaction(self.engine) as conn:
            now = db_now(conn)
            row = conn.execute(
                jobs.update()
                .where(
                    jobs.c.id == job_id, jobs.c.state.in_([JobState.failed.value, JobState.canceled.value])
                )
                .values(
                    state=QUEUED,
                    max_attempts=jobs.c.attempt + extra_attempts,
                    cancel_requested=False,
                    not_before=None,
                    finished_at=None,
                    updated_at=now,
                )
                .returning(jobs.c.attempt)
            ).first()
            if row is None:
                return False
            append_event(conn, job_id, "requeued", {"reason": "reopened by a re-run", "attempt": row.attempt})
            return True

    def queued_by_queue(self) -> dict[str, int]:
        """Queued jobs per queue; both queues always present."""
        counts = {"short": 0, "long": 0}
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(jobs.c.queue, sa.func.count()).where(jobs.c.state == QUEUED).group_by(jobs.c.queue)
            ).all()
        counts.update({queue: count for queue, count in rows})
        return counts

    def queued_jobs(self, limit: int = 500, per_group: int = 64) -> list[JobRecord]:
        """What a scheduler chooses a batch from, in queue order (priority, then arrival): the head
        of the queue, plus the first `per_group` jobs of every (queue, client) group that has work
        but is not in that head. Without them, a client or the long queue behind a backlog of more
        than `limit` jobs would be invisible to the scheduler, and never get its turn.
        """
        with self.engine.connect() as conn:
            due = sa.and_(
                jobs.c.state == QUEUED,
                sa.or_(jobs.c.not_before.is_(None), jobs.c.not_before <= db_now(conn)),
            )
            head = conn.execute(sa.select(jobs).where(due).order_by(*_QUEUE_ORDER).limit(limit)).all()
            if len(head) < limit:  # the whole queue is in the head
                return [_record(row) for row in head]
            # One pass over the covering index ix_jobs_groups (about 20 ms per 100,000 queued jobs
            # on SQLite), then each missing group's first jobs.
            groups = conn.execute(sa.select(jobs.c.queue, jobs.c.client_id).where(due).distinct()).all()
            seen = {(row.queue, row.client_id) for row in head}
            rows = list(head)
            for queue, client_id in groups:
                if (queue, client_id) in seen:
                    continue
                same_client = (
                    jobs.c.client_id.is_(None) if client_id is None else jobs.c.client_id == client_id
                )
                group = sa.select(jobs).where(due, jobs.c.queue == queue, same_client)
                rows += conn.execute(group.order_by(*_QUEUE_ORDER).limit(per_group)).all()
        rows.sort(key=lambda row: (-row.priority, row.created_at, row.id))
        return [_record(row) for row in rows]

    def claim_jobs(self, job_ids: list[str], worker_id: str, lease_seconds: float) -> list[JobRecord]:
        """Lease the given jobs to this worker, all in one transaction: the ones still queued.

        Jobs another worker claimed meanwhile are skipped (SKIP LOCKED, then a conditional update),
        so two workers never share a job; the caller runs whatever came back as one batch.
        """
        if not job_ids:
            return []
        with write_transaction(self.engine) as conn:
            now = db_now(conn)
            lockable = conn.execute(
                sa.select(jobs.c.id)
                .where(jobs.c.id.in_(job_ids), jobs.c.state == QUEUED)
                .with_for_update(skip_locked=True)
            ).scalars()
            available = list(lockable)
            if not available:
                return []
            # One statement for the whole batch (a worker claims every batch this way).
            rows = conn.execute(
                jobs.update()
                .where(jobs.c.id.in_(available), jobs.c.state == QUEUED)
                .values(
                    state=RUNNING,
                    attempt=jobs.c.attempt + 1,
                    lease_owner=worker_id,
                    lease_until=now + timedelta(seconds=lease_seconds),
                    started_at=now,
                    updated_at=now,
                )
                .returning(*jobs.c)
            ).all()
            by_id = {row.id: row for row in rows}
            claimed = [_record(by_id[job_id]) for job_id in job_ids if job_id in by_id]  # the caller's order
            for job in claimed:
                append_event(conn, job.id, "started", {"attempt": job.attempt, "worker": worker_id})
        return claimed

    def heartbeat(self, job_id: str, worker_id: str, attempt: int, lease_seconds: float) -> HeartbeatResult:
        """Renew the lease while this worker still owns the job, and report a pending cancel."""
        with write_transaction(self.engine) as conn:
            now = db_now(conn)
            renewed = conn.execute(
                jobs.update()
                .where(_owned(job_id, worker_id, attempt))
                .values(lease_until=now + timedelta(seconds=lease_seconds))
                .returning(jobs.c.cancel_requested)
            ).first()
            if renewed is not None:
                return HeartbeatResult(owned=True, cancel_requested=renewed.cancel_requested)
            cancel = conn.execute(sa.select(jobs.c.cancel_requested).where(jobs.c.id == job_id)).scalar()
            return HeartbeatResult(owned=False, cancel_requested=bool(cancel))

    def heartbeat_many(
        self, worker_id: str, held: list[tuple[str, int]], lease_seconds: float
    ) -> dict[str, HeartbeatResult]:
        """`heartbeat` for every (job_id, attempt) of a batch, in one transaction."""
        results = {}
        with write_transaction(self.engine) as conn:
            now = db_now(conn)
            for job_id, attempt in held:
                renewed = conn.execute(
                    jobs.update()
                    .where(_owned(job_id, worker_id, attempt))
                    .values(lease_until=now + timedelta(seconds=lease_seconds))
                    .returning(jobs.c.cancel_requested)
                ).first()
                if renewed is not None:
                    results[job_id] = HeartbeatResult(owned=True, cancel_requested=renewed.cancel_requested)
                else:
                    results[job_id] = HeartbeatResult(owned=False, cancel_requested=False)
        return results

    def complete(self, job_id: str, worker_id: str, attempt: int, image_ids: list[str]) -> bool:
        values = {"state": JobState.succeeded.value, "image_ids": list(image_ids)}
        return self._finish(job_id, worker_id, attempt, values, "succeeded", {"images": list(image_ids)})

    def fail(
        self, job_id: str, worker_id: str, attempt: int, error: str, retry_delay_seconds: float = 0.0
    ) -> bool:
        """Fenced. A job submitted with retry_on_error goes back to the queue (after the delay) while
        attempts remain; any other job, or the last attempt, becomes failed with the error."""
        with write_transaction(self.engine) as conn:
            row = conn.execute(
                sa.select(jobs).where(_owned(job_id, worker_id, attempt)).with_for_update()
            ).first()
            if row is None:
                return False
            if row.retry_on_error and row.attempt < row.max_attempts:
                now = db_now(conn)
                conn.execute(
                    jobs.update()
                    .where(_owned(job_id, worker_id, attempt))
                    .values(
                        state=QUEUED,
                        lease_owner=None,
                        lease_until=None,
                        error=error,
                        not_before=now + timedelta(seconds=retry_delay_seconds),
                        updated_at=now,
                    )
                )
                data = {"reason": error, "attempt": row.attempt, "retry_in_s": retry_delay_seconds}
                append_event(conn, job_id, "requeued", data)
                return True
        values = {"state": JobState.failed.value, "error": error}
        return self._finish(job_id, worker_id, attempt, values, "failed", {"error": error})

    def mark_canceled(self, job_id: str, worker_id: str, attempt: int) -> bool:
        """The worker stopped the job because cancel was requested."""
        return self._finish(job_id, worker_id, attempt, {"state": JobState.canceled.value}, "canceled", {})

    def _finish(
        self,
        job_id: str,
        worker_id: str,
        attempt: int,
        values: dict[str, Any],
        event_type: str,
        event_data: dict[str, Any],
    ) -> bool:
        """A fenced move to a terminal state. False (and no change) if the lease is no longer ours."""
        with write_transaction(self.engine) as conn:
            now = db_now(conn)
            row = conn.execute(
                jobs.update()
                .where(_owned(job_id, worker_id, attempt))
                .values(**values, lease_owner=None, lease_until=None, finished_at=now, updated_at=now)
                .returning(jobs.c.kind, jobs.c.parent_id, jobs.c.segment_index)
            ).first()
            if row is None:
                return False
            append_event(conn, job_id, event_type, event_data)
            if row.kind == SEGMENT:
                _segment_ended(conn, row.parent_id, row.segment_index, values["state"], values.get("error"))
            return True

    def release(self, job_id: str, worker_id: str, attempt: int, reason: str) -> bool:
        """Give a job back (graceful shutdown): queued again, keeping its attempt count."""
        with write_transaction(self.engine) as conn:
            row = conn.execute(
                sa.select(jobs).where(_owned(job_id, worker_id, attempt)).with_for_update()
            ).first()
            return row is not None and self._take_back(conn, row, reason)

    def unclaim(self, worker_id: str, held: list[tuple[str, int]], reason: str) -> list[str]:
        """Give back jobs this worker claimed but never started (a prefetched batch when the worker
        stops): queued again in their old place, and the claim does not count as an attempt. A job
        whose cancel was requested meanwhile is canceled. Fenced; returns the ids given back."""
        given_back = []
        with write_transaction(self.engine) as conn:
            now = db_now(conn)
            for job_id, attempt in held:
                row = conn.execute(
                    sa.select(jobs.c.cancel_requested)
                    .where(_owned(job_id, worker_id, attempt))
                    .with_for_update()
                ).first()
                if row is None:
                    continue
                if row.cancel_requested:
                    values: dict[str, Any] = {"state": JobState.canceled.value, "finished_at": now}
                    event: tuple[str, dict[str, Any]] = ("canceled", {"reason": reason})
                else:
                    values = {"state": QUEUED, "attempt": attempt - 1, "started_at": None}
                    event = ("requeued", {"reason": reason, "attempt": attempt - 1})
                conn.execute(
                    jobs.update()
                    .where(_owned(job_id, worker_id, attempt))
                    .values(**values, lease_owner=None, lease_until=None, updated_at=now)
                )
                append_event(conn, job_id, *event)
                given_back.append(job_id)
        return given_back

    # -- recovering jobs from dead workers --------------------------------------------------------

    def requeue_owner(self, worker_id: str, reason: str) -> list[str]:
        """Take back every job leased to a worker whose process died. Returns the job ids."""
        query = (
            sa.select(jobs)
            .where(jobs.c.state == RUNNING, jobs.c.lease_owner == worker_id)
            .with_for_update(skip_locked=True)
        )
        with write_transaction(self.engine) as conn:
            rows = conn.execute(query).all()
            return [row.id for row in rows if self._take_back(conn, row, f"worker died ({reason})")]

    def reap_expired(self) -> list[str]:
        """Take back every running job whose lease ran out. Returns the job ids."""
        with write_transaction(self.engine) as conn:
            query = (
                sa.select(jobs)
                .where(jobs.c.state == RUNNING, jobs.c.lease_until < db_now(conn))
                .with_for_update(skip_locked=True)
            )
            rows = conn.execute(query).all()
            return [row.id for row in rows if self._take_back(conn, row, "lease expired")]

    @staticmethod
    def _take_back(conn: sa.Connection, job: sa.Row, cause: str) -> bool:
        """Move a running job off its worker: queued again, or failed when it is out of attempts.

        A job whose cancel was requested is canceled instead of being run again. The row is locked
        by the caller's SELECT ... FOR UPDATE (PostgreSQL) or write transaction (SQLite); the UPDATE
        is conditional all the same, so a racing reaper or requeue can never apply twice.
        """
        if job.cancel_requested:
            values = {"state": JobState.canceled.value}
            event: tuple[str, dict[str, Any]] = ("canceled", {"reason": cause})
        elif job.attempt >= job.max_attempts:
            plural = "s" if job.attempt != 1 else ""
            error = f"gave up after {job.attempt} attempt{plural}: {cause}"
            values = {"state": JobState.failed.value, "error": error}
            event = ("failed", {"error": error})
        else:
            values = {"state": QUEUED}
            event = ("requeued", {"reason": cause, "attempt": job.attempt})
        now = db_now(conn)
        if values["state"] != QUEUED:
            values["finished_at"] = now
        result = conn.execute(
            jobs.update()
            .where(_owned(job.id, job.lease_owner, job.attempt))
            .values(**values, lease_owner=None, lease_until=None, updated_at=now)
        )
        if result.rowcount != 1:
            return False
        append_event(conn, job.id, *event)
        if job.kind == SEGMENT and values["state"] != QUEUED:
            _segment_ended(conn, job.parent_id, job.segment_index, values["state"], values.get("error"))
        return True

    # -- a client's side of a job ----------------------------------------------------------------

    def request_cancel(self, job_id: str) -> JobRecord | None:
        """Cancel a queued job at once; ask a running one to stop. None if there is no such job.

        A running job's worker sees `cancel_requested` at its next heartbeat and calls mark_canceled.
        Finished jobs are returned unchanged.
        """
        with write_transaction(self.engine) as conn:
            job = conn.execute(sa.select(jobs).where(jobs.c.id == job_id).with_for_update()).first()
            if job is None:
                return None
            now = db_now(conn)
            if job.state in (QUEUED, WAITING):
                values = {"state": JobState.canceled.value, "finished_at": now}
            elif job.state == RUNNING and not job.cancel_requested:
                values = {}
            else:
                return _record(job)
            row = conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id, jobs.c.state == job.state)
                .values(**values, cancel_requested=True, updated_at=now)
                .returning(*jobs.c)
            ).one()
            if row.state == JobState.canceled:
                append_event(conn, job_id, "canceled", {})
                _cancel_segments(conn, job_id, "the video was canceled")
            return _record(row)

    # -- the worker registry ----------------------------------------------------------------------

    def worker_heartbeat(
        self, worker_id: str, *, host: str, pid: int, state: str, models_loaded: list[str]
    ) -> None:
        """Create or refresh a worker's row."""
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        with write_transaction(self.engine) as conn:
            values = {
                "host": host,
                "pid": pid,
                "state": state,
                "models_loaded": list(models_loaded),
                "last_seen": db_now(conn),
            }
            upsert = dialect.insert(workers).values(id=worker_id, **values)
            conn.execute(upsert.on_conflict_do_update(index_elements=[workers.c.id], set_=values))

    def live_workers(self, max_age_seconds: float | None) -> list[WorkerRecord]:
        """Workers seen within the last max_age_seconds (every recorded worker for None), by id."""
        query = sa.select(workers).order_by(workers.c.id)
        with self.engine.connect() as conn:
            if max_age_seconds is not None:
                query = query.where(workers.c.last_seen >= db_now(conn) - timedelta(seconds=max_age_seconds))
            rows = conn.execute(query).all()
        return [WorkerRecord(**{**r._mapping, "models_loaded": list(r.models_loaded)}) for r in rows]

    def remove_worker(self, worker_id: str) -> None:
        with write_transaction(self.engine) as conn:
            conn.execute(workers.delete().where(workers.c.id == worker_id))


# -- long videos: a parent job and its segment jobs ---------------------------------------------------


def _segment_ended(conn: sa.Connection, parent_id: str, index: int, state: str, error: str | None) -> None:
    """A segment reached a terminal state, in the transaction that put it there.

    Success queues the next chained segment, and after the last one the video itself (to stitch):
    each move is a conditional update from "waiting", so it happens exactly once however many
    workers finish segments at the same moment. A failed or canceled segment fails the video and
    cancels the segments that have not run.
    """
    parent = conn.execute(sa.select(jobs).where(jobs.c.id == parent_id).with_for_update()).first()
    if parent is None or parent.state != WAITING:
        return  # canceled or failed already
    now = db_now(conn)
    if state != JobState.succeeded.value:
        reason = f"segment {index} {state}" + (f": {error}" if error else "")
        conn.execute(
            jobs.update()
            .where(jobs.c.id == parent_id, jobs.c.state == WAITING)
            .values(state=JobState.failed.value, error=reason, finished_at=now, updated_at=now)
        )
        append_event(conn, parent_id, "failed", {"error": reason})
        _cancel_segments(conn, parent_id, f"segment {index} {state}")
        return
    append_event(conn, parent_id, "segment_done", {"segment": index})
    siblings = conn.execute(
        sa.select(jobs.c.id, jobs.c.state).where(jobs.c.parent_id == parent_id).order_by(jobs.c.segment_index)
    ).all()
    waiting = [row.id for row in siblings if row.state == WAITING]
    if waiting:  # a chained video: the next segment continues this one
        conn.execute(
            jobs.update()
            .where(jobs.c.id == waiting[0], jobs.c.state == WAITING)
            .values(state=QUEUED, updated_at=now)
        )
        append_event(conn, waiting[0], "queued", {"after": index})
    elif all(row.state == JobState.succeeded.value for row in siblings):
        conn.execute(
            jobs.update()
            .where(jobs.c.id == parent_id, jobs.c.state == WAITING)
            .values(state=QUEUED, updated_at=now)
        )
        append_event(conn, parent_id, "queued", {"stage": "stitch", "segments": len(siblings)})


def _cancel_segments(conn: sa.Connection, parent_id: str, reason: str) -> None:
    """Cancel a video's segments that have not finished: queued or waiting ones at once, running
    ones at their next step (their worker sees cancel_requested)."""
    now = db_now(conn)
    rows = conn.execute(
        sa.select(jobs.c.id, jobs.c.state).where(
            jobs.c.parent_id == parent_id, jobs.c.state.in_([QUEUED, WAITING, RUNNING])
        )
    ).all()
    for row in rows:
        if row.state == RUNNING:
            conn.execute(
                jobs.update().where(jobs.c.id == row.id).values(cancel_requested=True, updated_at=now)
            )
            continue
        conn.execute(
            jobs.update()
            .where(jobs.c.id == row.id, jobs.c.state == row.state)
            .values(state=JobState.canceled.value, cancel_requested=True, finished_at=now, updated_at=now)
        )
        append_event(conn, row.id, "canceled", {"reason": reason})

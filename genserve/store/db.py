"""Database plumbing shared by the job store and the event log: engine, tables, clock, transactions.

One schema serves SQLite (a single machine) and PostgreSQL (several machines). Times are stored
as UTC and always come back as timezone-aware UTC datetimes.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

# Any constant works; it only has to be the same in every process that creates the schema.
_SCHEMA_LOCK_KEY = 0x67656E73  # "gens"
_WRITE_OPTION = "genserve_write"


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timestamp that goes in as any aware datetime and comes out as aware UTC.

    SQLite has no time zones, so it stores naive UTC; PostgreSQL stores `timestamptz`.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use an aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = sa.MetaData()

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("request_id", sa.String(200), unique=True),
    sa.Column("request_hash", sa.String(128)),
    sa.Column("params", sa.JSON, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False, default=0),
    sa.Column("client_id", sa.String(200)),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("started_at", UTCDateTime),
    sa.Column("finished_at", UTCDateTime),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False, default=0),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("lease_owner", sa.String(200)),
    sa.Column("lease_until", UTCDateTime),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("error", sa.Text),
    sa.Column("image_ids", sa.JSON, nullable=False),
    # Scheduling: short or long queue, chosen at submit from the cost model's estimate.
    sa.Column("queue", sa.String(16), nullable=False, server_default="short"),
    sa.Column("estimated_seconds", sa.Float),
    # The request's trace (W3C trace id), so worker logs and spans join the API's trace.
    sa.Column("trace_id", sa.String(32)),
    # Retries of engine failures (batch items): a failed attempt goes back to the queue, not
    # before `not_before`, until max_attempts. Interactive jobs fail at once (retry_on_error null).
    sa.Column("retry_on_error", sa.Boolean),
    sa.Column("not_before", UTCDateTime),
    # What the job makes: "image" (GenerationParams), "video" (VideoParams) or "segment" (one
    # segment of a long video, a VideoSegment; parent_id names the video job it belongs to).
    sa.Column("kind", sa.String(16), nullable=False, server_default="image"),
    sa.Column("parent_id", sa.String(32)),
    sa.Column("segment_index", sa.Integer),
    # The claim order, so picking the next job is an index scan.
    sa.Index("ix_jobs_queue", "state", sa.desc("priority"), "created_at", "id"),
    sa.Index("ix_jobs_lease", "state", "lease_until"),
    sa.Index("ix_jobs_lease_owner", "lease_owner"),
    sa.Index("ix_jobs_created", "created_at", "id"),
    sa.Index("ix_jobs_client", "client_id", "created_at"),
    sa.Index("ix_jobs_parent", "parent_id", "segment_index"),
    # The scheduler's (queue, client) groups (JobStore.queued_jobs): covers "which groups have work"
    # and serves "a group's first jobs in queue order" without a sort.
    sa.Index(
        "ix_jobs_groups", "state", "queue", "client_id", sa.desc("priority"), "created_at", "id", "not_before"
    ),
)

# The primary key (job_id, seq) is both the uniqueness guarantee and the read index.
job_events = sa.Table(
    "job_events",
    metadata,
    sa.Column("job_id", sa.String(32), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("type", sa.String(32), nullable=False),
    sa.Column("data", sa.JSON, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

workers = sa.Table(
    "workers",
    metadata,
    sa.Column("id", sa.String(200), primary_key=True),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("models_loaded", sa.JSON, nullable=False),
    sa.Column("last_seen", UTCDateTime, nullable=False),
)


def create_db_engine(url: str) -> sa.Engine:
    """An engine for `url` with the schema in place; safe to call from many processes at once."""
    # Tables defined in other store modules join `metadata` when imported (they import this module).
    from genserve.auth import keys  # noqa: F401
    from genserve.store import batches, calibration, experiments  # noqa: F401

    sa_url = sa.make_url(url)
    if sa_url.get_backend_name() == "sqlite":
        engine = _sqlite_engine(sa_url)
    else:
        engine = sa.create_engine(sa_url, pool_pre_ping=True)
    with write_transaction(engine) as conn:
        if engine.dialect.name == "postgresql":
            # Workers on several machines start together; without the lock two of them can both
            # see a table missing and the second CREATE TABLE fails.
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_SCHEMA_LOCK_KEY)))
        metadata.create_all(conn)
        _add_missing_columns(conn)
        _add_missing_indexes(conn)
    return engine


def _add_missing_indexes(conn: sa.Connection) -> None:
    """Create indexes that newer versions define on tables an older version created."""
    inspector = sa.inspect(conn)
    for table in metadata.sorted_tables:
        present = {index["name"] for index in inspector.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in present:
                index.create(conn)


def _add_missing_columns(conn: sa.Connection) -> None:
    """Add columns that newer versions define to tables an older version created.

    Only nullable columns or columns with a server default are ever added, so this is always safe.
    """
    inspector = sa.inspect(conn)
    for table in metadata.sorted_tables:
        present = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            column_type = column.type.compile(dialect=conn.dialect)
            default = f" DEFAULT '{column.server_default.arg}'" if column.server_default is not None else ""
            nullable = "" if column.nullable else " NOT NULL"
            conn.execute(
                sa.text(
                    f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {column_type}{default}{nullable}'
                )
            )


def _use_wal(cursor: Any) -> None:
    """Switch the database to WAL (a no-op once it is). The switch needs the file to itself, and
    SQLite answers "database is locked" at once, without waiting in the busy handler, while another
    process is opening it: so try again for up to the busy timeout."""
    deadline = time.monotonic() + 30
    while True:
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _sqlite_engine(url: sa.URL) -> sa.Engine:
    if url.database and url.database != ":memory:" and not url.database.startswith("file:"):
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    # timeout: the driver's busy timeout, in force before any PRAGMA below runs (processes starting
    # together race to switch the journal mode).
    engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take BEGIN away from the sqlite3 driver, which skips it before SELECT and SAVEPOINT,
        # so transactions and savepoints mean what they say (see `_on_begin`).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout=30000")
        _use_wal(cursor)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        # A write transaction takes the write lock up front, waiting up to busy_timeout. A deferred
        # one that reads first and writes later fails at once (SQLITE_BUSY) if another process
        # committed in between, which busy_timeout cannot help with. Reads stay deferred, so they
        # never wait for writers under WAL.
        write = conn.get_execution_options().get(_WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


@contextmanager
def write_transaction(engine: sa.Engine) -> Iterator[sa.Connection]:
    """A transaction that will write: committed on success, rolled back on error."""
    with engine.connect() as conn:
        conn.execution_options(**{_WRITE_OPTION: True})
        with conn.begin():
            yield conn


def db_now(conn: sa.Connection) -> datetime:
    """The current time, from the database server's clock on PostgreSQL.

    Leases are written by one machine and checked by another; one clock for all of them means
    clock skew between workers cannot expire a lease early.
    """
    if conn.dialect.name == "postgresql":
        return conn.execute(sa.select(sa.func.clock_timestamp())).scalar_one().astimezone(UTC)
    return datetime.now(UTC)

"""Database plumbing shared by the job store and the event log: engine, clock, transactions.

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

from genserve.store.tables import metadata

# Any constant works; it only has to be the same in every process that creates the schema.
_SCHEMA_LOCK_KEY = 0x67656E73  # "gens"
_WRITE_OPTION = "genserve_write"


def create_db_engine(url: str) -> sa.Engine:
    """An engine for `url` with the schema in place; safe to call from many processes at once."""
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

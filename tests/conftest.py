"""Shared fixtures: tiny on-disk models, and store URLs for SQLite and the real PostgreSQL server.

PostgreSQL tests skip with the reason when the server is unreachable (a laptop without it), and fail
instead when GENSERVE_REQUIRE_SERVICES=1, which `.ci/run` sets so CI never skips them silently.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

POSTGRES_ADMIN_URL = os.environ.get(
    "GENSERVE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REQUIRE_SERVICES = os.environ.get("GENSERVE_REQUIRE_SERVICES") == "1"


def _unavailable(what: str, error: Exception) -> None:
    message = f"{what} is not reachable ({type(error).__name__}: {error})"
    if REQUIRE_SERVICES:
        pytest.fail(message + " and GENSERVE_REQUIRE_SERVICES=1", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_database_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    import sqlalchemy as sa

    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"genserve_test_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except Exception as error:  # noqa: BLE001 - any connection failure means "not reachable"
        admin.dispose()
        _unavailable("PostgreSQL at " + POSTGRES_ADMIN_URL, error)
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A job-store URL with empty tables, on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    import sqlalchemy as sa

    url = request.getfixturevalue("postgres_database_url")
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP SCHEMA public CASCADE; CREATE SCHEMA public;"))
    engine.dispose()
    yield url


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory holding a tiny random-weight diffusers pipeline of every family."""
    from genserve.engine.models.fixtures import write_tiny_pipeline

    root = tmp_path_factory.mktemp("models")
    for family in ("sd15", "sdxl", "sd3"):
        write_tiny_pipeline(family, root / f"tiny-{family}")
    return root


REDIS_URL = os.environ.get("GENSERVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The real Redis server (skipped with the reason where there is none, failed in CI)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError as error:
        _unavailable("Redis at " + REDIS_URL, error)
    yield REDIS_URL
    client.close()


@pytest.fixture(autouse=True)
def _ordinary_scheduling(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test starts, and starts its servers and browsers, under the ordinary time-sharing policy.

    A CI run hung for 75 minutes, and a run here for 15, with the test process found at SCHED_FIFO
    priority 99 (set by something native during the run; nothing in genserve asks for it). Children
    inherit the policy: Playwright's driver and Chromium then spun at real-time priority on both cores
    and starved everything else, pytest-timeout's watchdog thread included. Resetting it here keeps
    the suite running; the warning names the test after which it was found, to find the cause."""
    if hasattr(os, "sched_getscheduler") and os.sched_getscheduler(0) != os.SCHED_OTHER:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    yield
    if hasattr(os, "sched_getscheduler") and os.sched_getscheduler(0) != os.SCHED_OTHER:
        import warnings

        warnings.warn(
            f"the test process was at real-time scheduling after {request.node.nodeid}", stacklevel=1
        )
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))

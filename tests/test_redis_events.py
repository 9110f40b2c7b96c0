"""RedisStreamEventLog against the real Redis server: merged ids resume exactly, capped streams with a TTL,
and a Redis outage sends progress to the SQL log instead of failing the job."""

from __future__ import annotations

import uuid

import pytest

from genserve.events.redis_streams import KEY_PREFIX, RedisStreamEventLog, split_seq
from genserve.store.jobs import JobStore


@pytest.fixture
def store(tmp_path):
    store = JobStore.from_url(f"sqlite:///{tmp_path / 'store.db'}")
    yield store
    store.close()


def test_transitions_and_progress_merge_and_resume_exactly(store, redis_url):
    log = RedisStreamEventLog(store.engine, redis_url, maxlen=100, ttl_seconds=60)
    job, _ = store.submit({"prompt": "x"})  # "queued" in SQL
    try:
        log.append_many([(job.id, "progress", {"step": 1}), (job.id, "progress", {"step": 2})])
        store.request_cancel(job.id)  # "canceled" in SQL, after the progress
        events = log.read_after(job.id, 0)
        assert [e.type for e in events] == ["queued", "progress", "progress", "canceled"]
        assert [e.seq for e in events] == sorted({e.seq for e in events})
        assert split_seq(events[-1].seq) == (2, 2)
        for index, event in enumerate(events):  # resuming from any id gives exactly the rest
            assert [e.seq for e in log.read_after(job.id, event.seq)] == [e.seq for e in events[index + 1 :]]
        ttl = log.redis.ttl(f"{KEY_PREFIX}{job.id}")
        assert 0 < ttl <= 60
    finally:
        log.redis.delete(f"{KEY_PREFIX}{job.id}", f"{KEY_PREFIX}{job.id}:n")


def test_streams_are_capped(store, redis_url):
    log = RedisStreamEventLog(store.engine, redis_url, maxlen=10, ttl_seconds=60)
    job_id = uuid.uuid4().hex
    try:
        log.append_many([(job_id, "progress", {"step": i}) for i in range(500)])
        assert log.redis.xlen(f"{KEY_PREFIX}{job_id}") < 200  # MAXLEN ~ trims in whole nodes
    finally:
        log.redis.delete(f"{KEY_PREFIX}{job_id}", f"{KEY_PREFIX}{job_id}:n")


def test_redis_down_falls_back_to_sql(store):
    log = RedisStreamEventLog(store.engine, "redis://127.0.0.1:1/0")  # nothing listens there
    job, _ = store.submit({"prompt": "x"})
    log.append(job.id, "progress", {"step": 1})  # never raises
    assert [e.type for e in log.read_after(job.id, 0)] == ["queued", "progress"]
    assert [e.type for e in store.events.read_after(job.id, 0)] == ["queued", "progress"]  # in SQL

"""The per-job event log on SQLite and PostgreSQL: order, resume, and gap-free numbering under races."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC

import pytest
import sqlalchemy as sa

from genserve.events.log import EventLog, append_event
from genserve.store.db import create_db_engine, write_transaction
from genserve.store.jobs import JobStore


@pytest.fixture
def store(store_url: str) -> Iterator[JobStore]:
    store = JobStore.from_url(store_url)
    yield store
    store.close()


def test_a_jobs_life_reads_back_as_its_events(store: JobStore) -> None:
    job = store.submit({"prompt": "cat"})[0]
    claimed = store.claim_next("w1", 30)
    store.events.append(job.id, "progress", {"step": 1, "steps": 2})
    store.events.append(job.id, "progress", {"step": 2, "steps": 2})
    store.complete(job.id, "w1", claimed.attempt, ["img-1"])

    events = store.events.read_after(job.id)
    assert [(e.seq, e.type) for e in events] == [
        (1, "queued"),
        (2, "started"),
        (3, "progress"),
        (4, "progress"),
        (5, "succeeded"),
    ]
    assert events[2].data == {"step": 1, "steps": 2}
    assert events[4].data == {"images": ["img-1"]}
    assert all(e.job_id == job.id and e.created_at.tzinfo is UTC for e in events)
    assert [e.created_at for e in events] == sorted(e.created_at for e in events)


def test_read_after_resumes_exactly(store_url: str) -> None:
    engine = create_db_engine(store_url)
    log = EventLog(engine)
    try:
        appended = [log.append("job-a", "progress", {"step": i}) for i in range(1, 11)]
        log.append("job-b", "progress", {"step": 1})
        assert [e.seq for e in appended] == list(range(1, 11))

        assert log.read_after("job-a") == appended
        for k in (0, 3, 9, 10):
            assert [e.seq for e in log.read_after("job-a", after_seq=k)] == list(range(k + 1, 11))
        assert [e.seq for e in log.read_after("job-a", after_seq=2, limit=3)] == [3, 4, 5]
        assert log.read_after("no-such-job") == []
        assert [e.data for e in log.read_after("job-b")] == [{"step": 1}]
    finally:
        engine.dispose()


def test_concurrent_appends_number_events_without_gaps_or_duplicates(store_url: str) -> None:
    threads, per_thread = 8, 25
    engines = [create_db_engine(store_url) for _ in range(threads)]
    barrier = threading.Barrier(threads)

    def append_many(i: int) -> list[int]:
        log = EventLog(engines[i])
        barrier.wait()
        return [log.append("job-a", "progress", {"thread": i, "n": n}).seq for n in range(per_thread)]

    try:
        with ThreadPoolExecutor(threads) as pool:
            seqs = [seq for batch in pool.map(append_many, range(threads)) for seq in batch]
        events = EventLog(engines[0]).read_after("job-a", limit=10_000)
    finally:
        for engine in engines:
            engine.dispose()

    total = threads * per_thread
    assert sorted(seqs) == list(range(1, total + 1))
    assert [e.seq for e in events] == list(range(1, total + 1))
    # Each thread's own events stay in the order it wrote them.
    for i in range(threads):
        mine = [e.data["n"] for e in events if e.data["thread"] == i]
        assert mine == list(range(per_thread))


def test_a_batchs_appends_race_single_appends_without_gaps_or_duplicates(store_url: str) -> None:
    # A worker writes a batch's step (several jobs, sometimes two events for one job) while the API
    # appends transitions to the same jobs.
    threads, rounds = 6, 20
    engines = [create_db_engine(store_url) for _ in range(threads)]
    barrier = threading.Barrier(threads)

    def write(i: int) -> None:
        log = EventLog(engines[i])
        barrier.wait()
        for n in range(rounds):
            if i % 2:
                step = [
                    ("job-a", "progress", {"thread": i, "n": n}),
                    ("job-b", "progress", {"thread": i, "n": n}),
                ]
                appended = log.append_many([*step, ("job-a", "preview", {"thread": i, "n": n})])
                assert [e.job_id for e in appended] == ["job-a", "job-b", "job-a"]
                assert appended[2].seq == appended[0].seq + 1
            else:
                log.append("job-a", "progress", {"thread": i, "n": n})

    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(write, range(threads)))
        a = EventLog(engines[0]).read_after("job-a", limit=10_000)
        b = EventLog(engines[0]).read_after("job-b", limit=10_000)
    finally:
        for engine in engines:
            engine.dispose()

    batch_writers, single_writers = threads // 2, threads - threads // 2
    assert [e.seq for e in a] == list(range(1, rounds * (2 * batch_writers + single_writers) + 1))
    assert [e.seq for e in b] == list(range(1, rounds * batch_writers + 1))
    for i in range(threads):  # each writer's events in the order it wrote them
        mine = [(e.data["n"], e.type) for e in a if e.data["thread"] == i]
        expected = [
            (n, t) for n in range(rounds) for t in (("progress", "preview") if i % 2 else ("progress",))
        ]
        assert mine == expected


def test_append_inside_a_transaction_rolls_back_with_it(store_url: str) -> None:
    engine = create_db_engine(store_url)
    log = EventLog(engine)
    try:
        log.append("job-a", "queued", {})
        with pytest.raises(RuntimeError), write_transaction(engine) as conn:
            append_event(conn, "job-a", "started", {})
            raise RuntimeError("the state change failed")
        assert [e.type for e in log.read_after("job-a")] == ["queued"]
        # The sequence carries on with no gap where the rolled-back event was.
        assert log.append("job-a", "started", {}).seq == 2
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM job_events")).scalar_one() == 2
    finally:
        engine.dispose()

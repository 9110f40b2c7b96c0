"""The job store on SQLite and on the real PostgreSQL server: transitions, leases, fencing, races."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from genserve.schemas.jobs import JobState
from genserve.store.db import create_db_engine
from genserve.store.jobs import IdempotencyConflict, JobStore


@pytest.fixture
def store(store_url: str) -> Iterator[JobStore]:
    store = JobStore.from_url(store_url)
    yield store
    store.close()


def run_together(count: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run fn(0..count-1) on `count` threads released at the same moment, returning their results."""
    barrier = threading.Barrier(count)

    def start(i: int) -> Any:
        barrier.wait()
        return fn(i)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(start, range(count)))


def event_types(store: JobStore, job_id: str) -> list[str]:
    return [event.type for event in store.events.read_after(job_id)]


# -- schema and engine ------------------------------------------------------------------------------


def test_create_db_engine_is_idempotent_when_processes_start_together(store_url: str) -> None:
    engines = run_together(4, lambda _: create_db_engine(store_url))
    engines.append(create_db_engine(store_url))
    try:
        assert {"jobs", "job_events", "workers"} <= set(sa.inspect(engines[0]).get_table_names())
    finally:
        for engine in engines:
            engine.dispose()


def test_sqlite_engine_creates_directory_and_sets_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "store.db"
    engine = create_db_engine(f"sqlite:///{path}")
    try:
        assert path.exists()
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    finally:
        engine.dispose()


# -- submit, get, list --------------------------------------------------------------------------------


def test_submit_get_and_list_newest_first(store: JobStore) -> None:
    submitted = [
        store.submit({"prompt": f"p{i}"}, client_id="alice" if i % 2 else "bob", priority=i)[0]
        for i in range(5)
    ]
    job = store.get(submitted[0].id)
    assert job == submitted[0]
    assert job.state is JobState.queued
    assert job.params == {"prompt": "p0"}
    assert (job.attempt, job.max_attempts, job.image_ids, job.cancel_requested) == (0, 3, [], False)
    assert job.created_at.tzinfo is UTC
    assert abs(job.created_at - datetime.now(UTC)) < timedelta(seconds=30)
    assert job.started_at is None and job.finished_at is None and job.lease_owner is None
    assert store.get("no-such-job") is None

    newest_first = [j.id for j in reversed(submitted)]
    page, total = store.list_jobs()
    assert ([j.id for j in page], total) == (newest_first, 5)
    page, total = store.list_jobs(limit=2, offset=2)
    assert ([j.id for j in page], total) == (newest_first[2:4], 5)

    page, total = store.list_jobs(client_id="alice")
    assert ([j.id for j in page], total) == ([submitted[3].id, submitted[1].id], 2)

    claimed = store.claim_next("w1", 30)
    page, total = store.list_jobs(state=JobState.running)
    assert ([j.id for j in page], total) == ([claimed.id], 1)
    assert store.list_jobs(state=JobState.queued)[1] == 4


def test_queue_position_and_claim_order_follow_priority_then_fifo(store: JobStore) -> None:
    low1 = store.submit({"prompt": "low1"})[0]
    high1 = store.submit({"prompt": "high1"}, priority=5)[0]
    low2 = store.submit({"prompt": "low2"})[0]
    high2 = store.submit({"prompt": "high2"}, priority=5)[0]
    urgent = store.submit({"prompt": "urgent"}, priority=10)[0]
    expected = [urgent, high1, high2, low1, low2]

    assert [store.queue_position(j.id) for j in expected] == [0, 1, 2, 3, 4]
    claimed = store.claim_next("w1", 30)
    assert claimed.id == urgent.id
    assert store.queue_position(urgent.id) is None
    assert [store.queue_position(j.id) for j in expected[1:]] == [0, 1, 2, 3]
    assert [store.claim_next("w1", 30).id for _ in range(4)] == [j.id for j in expected[1:]]
    assert store.claim_next("w1", 30) is None
    assert store.queue_position("no-such-job") is None


def test_counts_by_state_lists_every_state(store: JobStore) -> None:
    assert store.counts_by_state() == {state.value: 0 for state in JobState}
    for i in range(3):
        store.submit({"prompt": str(i)})
    job = store.claim_next("w1", 30)
    store.complete(job.id, "w1", job.attempt, ["img"])
    store.claim_next("w1", 30)
    assert store.counts_by_state() == {
        "queued": 1,
        "running": 1,
        "succeeded": 1,
        "failed": 0,
        "canceled": 0,
        "waiting": 0,
    }


# -- idempotency ----------------------------------------------------------------------------------------


def test_same_request_id_returns_the_same_job_also_after_restart(store: JobStore, store_url: str) -> None:
    job, created = store.submit({"prompt": "cat"}, request_id="key-1", request_hash="h1")
    assert created
    again, created = store.submit({"prompt": "cat"}, request_id="key-1", request_hash="h1")
    assert (again.id, created) == (job.id, False)

    restarted = JobStore.from_url(store_url)
    try:
        after_restart, created = restarted.submit({"prompt": "cat"}, request_id="key-1", request_hash="h1")
        assert (after_restart.id, created) == (job.id, False)
        with pytest.raises(IdempotencyConflict) as conflict:
            restarted.submit({"prompt": "dog"}, request_id="key-1", request_hash="h2")
        assert conflict.value.job_id == job.id
    finally:
        restarted.close()

    assert store.list_jobs()[1] == 1
    assert event_types(store, job.id) == ["queued"]
    # Without a key every submit is a new job.
    assert store.submit({"prompt": "cat"})[0].id != store.submit({"prompt": "cat"})[0].id


def test_concurrent_submits_of_one_key_create_one_job(store: JobStore) -> None:
    results = run_together(8, lambda _: store.submit({"prompt": "cat"}, request_id="race", request_hash="h"))
    assert len({job.id for job, _ in results}) == 1
    assert sorted(created for _, created in results) == [False] * 7 + [True]
    assert store.list_jobs()[1] == 1
    assert event_types(store, results[0][0].id) == ["queued"]


# -- claiming -----------------------------------------------------------------------------------------


def test_claim_leases_the_job_and_counts_attempts(store: JobStore) -> None:
    job = store.submit({"prompt": "cat"})[0]
    before = datetime.now(UTC)
    claimed = store.claim_next("w1", lease_seconds=30)
    assert claimed.id == job.id
    assert claimed.state is JobState.running
    assert (claimed.attempt, claimed.lease_owner) == (1, "w1")
    assert claimed.started_at is not None
    assert timedelta(seconds=25) < claimed.lease_until - before < timedelta(seconds=35)
    assert store.get(job.id) == claimed
    assert store.events.read_after(job.id)[-1].data == {"attempt": 1, "worker": "w1"}
    assert store.claim_next("w2", 30) is None

    store.release(job.id, "w1", 1, "shutdown")
    assert store.claim_next("w2", 30).attempt == 2


def test_concurrent_claims_take_each_job_exactly_once(store: JobStore, store_url: str) -> None:
    job_ids = {store.submit({"prompt": str(i)})[0].id for i in range(40)}
    stores = [JobStore.from_url(store_url) for _ in range(8)]

    def claim_all(i: int) -> list[str]:
        claimed = []
        while (job := stores[i].claim_next(f"w{i}", 30)) is not None:
            claimed.append(job.id)
        return claimed

    try:
        claimed = [job_id for ids in run_together(8, claim_all) for job_id in ids]
    finally:
        for s in stores:
            s.close()
    assert len(claimed) == 40
    assert set(claimed) == job_ids
    for job_id in job_ids:
        assert store.get(job_id).attempt == 1
        assert event_types(store, job_id) == ["queued", "started"]


# -- leases, fencing and recovery ---------------------------------------------------------------------------


def test_old_attempt_is_fenced_out_after_reap_and_reclaim(store: JobStore) -> None:
    job = store.submit({"prompt": "cat"})[0]
    store.claim_next("old", lease_seconds=0.01)
    time.sleep(0.05)
    assert store.reap_expired() == [job.id]
    requeued = store.get(job.id)
    assert (requeued.state, requeued.lease_owner, requeued.lease_until) == (JobState.queued, None, None)

    store.claim_next("new", lease_seconds=30)
    current = store.get(job.id)
    assert (current.attempt, current.lease_owner) == (2, "new")

    assert store.heartbeat(job.id, "old", 1, 30).owned is False
    assert store.complete(job.id, "old", 1, ["stale"]) is False
    assert store.fail(job.id, "old", 1, "stale") is False
    assert store.mark_canceled(job.id, "old", 1) is False
    assert store.release(job.id, "old", 1, "stale") is False
    # Right attempt, wrong owner: still fenced.
    assert store.complete(job.id, "old", 2, ["stale"]) is False
    assert store.get(job.id) == current
    assert event_types(store, job.id) == ["queued", "started", "requeued", "started"]

    assert store.heartbeat(job.id, "new", 2, 30).owned is True
    assert store.complete(job.id, "new", 2, ["img-1", "img-2"]) is True
    done = store.get(job.id)
    assert (done.state, done.image_ids, done.lease_owner) == (JobState.succeeded, ["img-1", "img-2"], None)
    assert done.finished_at is not None


def test_heartbeat_renews_the_lease_so_the_reaper_leaves_it(store: JobStore) -> None:
    job = store.submit({"prompt": "cat"})[0]
    claimed = store.claim_next("w1", lease_seconds=0.01)
    result = store.heartbeat(job.id, "w1", 1, lease_seconds=30)
    assert (result.owned, result.cancel_requested) == (True, False)
    assert store.get(job.id).lease_until > claimed.lease_until + timedelta(seconds=20)
    time.sleep(0.05)
    assert store.reap_expired() == []
    assert store.get(job.id).state is JobState.running


def test_reap_takes_only_expired_leases_and_never_twice(store: JobStore, store_url: str) -> None:
    live = store.submit({"prompt": "live"})[0]
    expired = [store.submit({"prompt": str(i)})[0] for i in range(3)]
    store.claim_next("w-live", 30)
    for _ in expired:
        store.claim_next("w-dead", lease_seconds=0.01)
    time.sleep(0.05)

    reapers = [JobStore.from_url(store_url) for _ in range(4)]
    try:
        reaped = run_together(4, lambda i: reapers[i].reap_expired())
    finally:
        for s in reapers:
            s.close()
    assert sorted(job_id for ids in reaped for job_id in ids) == sorted(j.id for j in expired)
    assert store.reap_expired() == []
    assert store.get(live.id).state is JobState.running
    for job in expired:
        assert store.get(job.id).state is JobState.queued
        assert event_types(store, job.id) == ["queued", "started", "requeued"]
        assert store.events.read_after(job.id)[-1].data == {"reason": "lease expired", "attempt": 1}


def test_requeue_owner_takes_back_only_that_workers_jobs(store: JobStore) -> None:
    for i in range(3):
        store.submit({"prompt": str(i)})
    dead = [store.claim_next("w-dead", 30).id, store.claim_next("w-dead", 30).id]
    alive = store.claim_next("w-alive", 30).id

    assert sorted(store.requeue_owner("w-dead", "exit code -9")) == sorted(dead)
    assert store.requeue_owner("w-dead", "exit code -9") == []
    assert store.get(alive).state is JobState.running
    for job_id in dead:
        job = store.get(job_id)
        assert (job.state, job.attempt, job.lease_owner) == (JobState.queued, 1, None)
        assert store.events.read_after(job_id)[-1].data == {
            "reason": "worker died (exit code -9)",
            "attempt": 1,
        }


def test_job_fails_with_a_reason_once_out_of_attempts(store: JobStore) -> None:
    job = store.submit({"prompt": "cat"}, max_attempts=2)[0]
    for _ in range(2):
        assert store.claim_next("w1", 30).id == job.id
        assert store.requeue_owner("w1", "exit code -11") == [job.id]
    failed = store.get(job.id)
    assert failed.state is JobState.failed
    assert failed.error == "gave up after 2 attempts: worker died (exit code -11)"
    assert failed.finished_at is not None and failed.lease_owner is None
    assert event_types(store, job.id) == ["queued", "started", "requeued", "started", "failed"]
    assert store.claim_next("w1", 30) is None

    once = store.submit({"prompt": "dog"}, max_attempts=1)[0]
    store.claim_next("w1", lease_seconds=0.01)
    time.sleep(0.05)
    assert store.reap_expired() == [once.id]
    assert store.get(once.id).error == "gave up after 1 attempt: lease expired"


def test_release_keeps_the_attempt_count(store: JobStore) -> None:
    job = store.submit({"prompt": "cat"}, max_attempts=2)[0]
    store.claim_next("w1", 30)
    assert store.release(job.id, "w1", 1, "shutdown") is True
    released = store.get(job.id)
    assert (released.state, released.attempt, released.lease_owner) == (JobState.queued, 1, None)
    assert store.events.read_after(job.id)[-1].data == {"reason": "shutdown", "attempt": 1}
    assert store.release(job.id, "w1", 1, "shutdown") is False

    store.claim_next("w2", 30)
    assert store.release(job.id, "w2", 2, "shutdown") is True
    assert store.get(job.id).state is JobState.failed
    assert store.get(job.id).error == "gave up after 2 attempts: shutdown"


def test_counts_for_counts_only_the_given_jobs_by_state(store: JobStore) -> None:
    ids = [store.submit({"prompt": str(i)})[0].id for i in range(4)]
    done = store.claim_next("w", 30)
    store.complete(done.id, "w", 1, [])
    store.claim_next("w", 30)  # running
    counts = store.counts_for([*ids[:3], "no-such-job"])
    assert {state: n for state, n in counts.items() if n} == {"succeeded": 1, "running": 1, "queued": 1}
    assert set(counts) == {state.value for state in JobState}


def test_unclaim_gives_a_job_back_without_counting_the_attempt(store: JobStore) -> None:
    # A worker that claimed a batch ahead (prefetch) and stops before running it.
    first, second = (store.submit({"prompt": p}, max_attempts=1)[0] for p in ("cat", "dog"))
    claimed = store.claim_jobs([first.id, second.id], "w1", 30)
    assert [job.attempt for job in claimed] == [1, 1]
    store.request_cancel(second.id)
    held = [(job.id, job.attempt) for job in claimed]
    assert store.unclaim("w1", held, "stopping") == [first.id, second.id]

    back = store.get(first.id)
    assert (back.state, back.attempt, back.lease_owner, back.started_at) == (JobState.queued, 0, None, None)
    assert store.events.read_after(first.id)[-1].data == {"reason": "stopping", "attempt": 0}
    assert store.get(second.id).state is JobState.canceled
    assert store.unclaim("w1", held, "stopping") == []  # fenced: no longer this worker's
    assert store.claim_next("w2", 30).attempt == 1  # its only attempt is still to come


def test_fail_records_the_error(store: JobStore) -> None:
    job = store.submit({"prompt": "cat"})[0]
    store.claim_next("w1", 30)
    assert store.fail(job.id, "w1", 1, "CUDA out of memory") is True
    failed = store.get(job.id)
    assert (failed.state, failed.error) == (JobState.failed, "CUDA out of memory")
    assert store.events.read_after(job.id)[-1].data == {"error": "CUDA out of memory"}
    assert store.fail(job.id, "w1", 1, "again") is False


# -- cancel -------------------------------------------------------------------------------------------------


def test_cancel_of_a_queued_job_is_immediate(store: JobStore) -> None:
    job = store.submit({"prompt": "cat"})[0]
    canceled = store.request_cancel(job.id)
    assert canceled.state is JobState.canceled
    assert canceled.finished_at is not None
    assert store.get(job.id) == canceled
    assert store.claim_next("w1", 30) is None
    assert event_types(store, job.id) == ["queued", "canceled"]
    # Terminal jobs come back unchanged, with no new event.
    assert store.request_cancel(job.id) == canceled
    assert event_types(store, job.id) == ["queued", "canceled"]
    assert store.request_cancel("no-such-job") is None


def test_cancel_of_a_running_job_goes_through_its_worker(store: JobStore) -> None:
    job = store.submit({"prompt": "cat"})[0]
    store.claim_next("w1", 30)
    assert store.heartbeat(job.id, "w1", 1, 30).cancel_requested is False

    requested = store.request_cancel(job.id)
    assert (requested.state, requested.cancel_requested) == (JobState.running, True)
    result = store.heartbeat(job.id, "w1", 1, 30)
    assert (result.owned, result.cancel_requested) == (True, True)
    assert store.mark_canceled(job.id, "w1", 1) is True
    assert store.get(job.id).state is JobState.canceled
    assert event_types(store, job.id) == ["queued", "started", "canceled"]


def test_a_job_whose_cancel_was_requested_is_not_run_again(store: JobStore) -> None:
    job = store.submit({"prompt": "cat"})[0]
    store.claim_next("w1", 30)
    store.request_cancel(job.id)
    assert store.requeue_owner("w1", "exit code 1") == [job.id]
    assert store.get(job.id).state is JobState.canceled
    assert store.claim_next("w2", 30) is None


# -- workers ------------------------------------------------------------------------------------------------


def test_worker_registry_upserts_lists_live_and_removes(store: JobStore) -> None:
    store.worker_heartbeat("w-stale", host="a", pid=1, state="ready", models_loaded=[])
    time.sleep(0.3)
    store.worker_heartbeat("w1", host="gpu-box", pid=42, state="starting", models_loaded=[])
    store.worker_heartbeat("w1", host="gpu-box", pid=42, state="ready", models_loaded=["sd15"])

    live = store.live_workers(max_age_seconds=0.2)
    assert [(w.id, w.host, w.pid, w.state, w.models_loaded) for w in live] == [
        ("w1", "gpu-box", 42, "ready", ["sd15"])
    ]
    assert live[0].last_seen.tzinfo is UTC
    assert [w.id for w in store.live_workers(max_age_seconds=60)] == ["w-stale", "w1"]

    store.remove_worker("w1")
    store.remove_worker("never-registered")
    assert [w.id for w in store.live_workers(max_age_seconds=60)] == ["w-stale"]


def test_every_transition_writes_exactly_one_event(store: JobStore) -> None:
    for i in range(4):
        store.submit({"prompt": str(i)})
    a = store.claim_next("w", 30)
    store.complete(a.id, "w", 1, ["x"])
    b = store.claim_next("w", 30)
    store.fail(b.id, "w", 1, "boom")
    c = store.claim_next("w", 30)
    store.release(c.id, "w", 1, "shutdown")
    d = store.claim_next("w", 30)
    assert d.id == c.id  # a released job keeps its place in line
    totals = Counter(t for job in store.list_jobs()[0] for t in event_types(store, job.id))
    assert totals == {"queued": 4, "started": 4, "succeeded": 1, "failed": 1, "requeued": 1}


def test_retrying_jobs_back_off_then_fail_after_max_attempts(store: JobStore) -> None:
    job, _ = store.submit({"p": 1}, max_attempts=2, retry_on_error=True)
    first = store.claim_jobs([job.id], "w", 30)[0]
    assert store.fail(job.id, "w", first.attempt, "boom", retry_delay_seconds=0.3)
    assert store.get(job.id).state == JobState.queued
    assert store.queued_jobs() == []  # not due yet
    time.sleep(0.35)
    assert [j.id for j in store.queued_jobs()] == [job.id]
    second = store.claim_jobs([job.id], "w", 30)[0]
    assert second.attempt == 2
    assert store.fail(job.id, "w", 2, "boom again", retry_delay_seconds=0.3)
    final = store.get(job.id)
    assert final.state == JobState.failed and final.error == "boom again"
    assert event_types(store, job.id) == ["queued", "started", "requeued", "started", "failed"]


def test_interactive_jobs_fail_at_once(store: JobStore) -> None:
    job, _ = store.submit({"p": 1}, max_attempts=3)
    claimed = store.claim_jobs([job.id], "w", 30)[0]
    assert store.fail(job.id, "w", claimed.attempt, "engine error", retry_delay_seconds=1)
    assert store.get(job.id).state == JobState.failed


def test_a_client_or_queue_behind_a_deep_backlog_is_still_listed(store: JobStore) -> None:
    from genserve.scheduler.policy import SchedulerState, plan_batch, record_served

    params = {"prompt": "p", "num_images": 1, "cfg_scale": 4.0}
    flood = [store.submit({**params, "seed": i}, client_id="flood")[0] for i in range(12)]
    late = store.submit({**params, "width": 64, "height": 64}, client_id="late")[0]
    long = store.submit(params, client_id="flood", queue="long")[0]
    listed = store.queued_jobs(limit=5, per_group=2)
    # The head (5 of flood's jobs), then the first jobs of each group the head does not reach.
    assert [j.id for j in listed] == [j.id for j in flood[:5]] + [late.id, long.id]
    # So the scheduler can give the late client its turn on the very next batch.
    state = SchedulerState()
    first = plan_batch(listed, state, long_share=0.0, max_images=lambda p: 1)
    record_served(state, first[0])
    second = plan_batch(listed, state, long_share=0.0, max_images=lambda p: 1)
    assert [first[0].id, second[0].id] == [flood[0].id, late.id]
    # A queue that fits in the head is listed whole, as before.
    assert len(store.queued_jobs(limit=100)) == 14


def test_a_store_made_by_an_older_version_gets_the_new_indexes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    engine = create_db_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP INDEX ix_jobs_groups")
    engine.dispose()
    engine = create_db_engine(url)
    try:
        assert "ix_jobs_groups" in {index["name"] for index in sa.inspect(engine).get_indexes("jobs")}
    finally:
        engine.dispose()

"""Scheduling policy on plain store records: queues, shares, priority, fair share, batch assembly."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from genserve.scheduler.policy import (
    LONG,
    SHORT,
    SchedulerState,
    batch_limit,
    choose_queue,
    classify,
    fill_batch,
    plan_batch,
    record_served,
)
from genserve.schemas import GenerationParams
from genserve.store.jobs import JobRecord, JobState

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def job(n: int, *, client: str | None = None, queue: str = SHORT, priority: int = 0, **params) -> JobRecord:
    values = {"prompt": f"p{n}", "model": "m", "seed": n, "steps": 20, "width": 64, "height": 64, **params}
    return JobRecord(
        id=f"j{n}",
        request_id=None,
        request_hash=None,
        params=GenerationParams(**values).model_dump(),
        state=JobState.queued,
        priority=priority,
        client_id=client,
        created_at=T0 + timedelta(seconds=n),
        started_at=None,
        finished_at=None,
        updated_at=T0,
        attempt=0,
        max_attempts=3,
        lease_owner=None,
        lease_until=None,
        cancel_requested=False,
        error=None,
        image_ids=[],
        queue=queue,
    )


def queue_order(jobs):
    return sorted(jobs, key=lambda j: (-j.priority, j.created_at, j.id))


def drain(jobs, *, long_share=0.25, max_images=1):
    """Run the policy to exhaustion; returns the ids in the order their batches were picked."""
    state, remaining, order = SchedulerState(), queue_order(jobs), []
    while remaining:
        batch = plan_batch(remaining, state, long_share=long_share, max_images=lambda p: max_images)
        record_served(state, batch[0])
        order.append([j.id for j in batch])
        remaining = [j for j in remaining if j.id not in {b.id for b in batch}]
    return order


def test_classify_by_estimate():
    assert classify(None, 30) == SHORT
    assert classify(29.9, 30) == SHORT
    assert classify(31, 30) == LONG


def test_long_queue_gets_its_share_and_neither_starves():
    jobs = [job(i, queue=SHORT) for i in range(12)] + [job(100 + i, queue=LONG) for i in range(12)]
    picks = [batch[0] for batch in drain(jobs, long_share=0.25)][:16]
    long_picks = sum(1 for pick in picks if int(pick[1:]) >= 100)
    assert long_picks == 4  # a quarter of the first 16 batches
    assert all(choose_queue(True, False, SchedulerState(), 0.25) == SHORT for _ in range(3))
    assert choose_queue(False, True, SchedulerState(), 0.0) == LONG  # an idle short queue never blocks long


def test_priority_first_then_arrival():
    jobs = [job(1), job(2, priority=5), job(3)]
    assert [batch[0] for batch in drain(jobs)] == ["j2", "j1", "j3"]


def test_clients_take_turns():
    # Client a floods the queue first; b and c still get every other turn.
    jobs = [job(i, client="a") for i in range(6)] + [
        job(10, client="b"),
        job(11, client="c"),
        job(12, client="b"),
    ]
    order = [batch[0] for batch in drain(jobs)]
    assert order[:6] == ["j0", "j10", "j11", "j1", "j12", "j2"]


def test_batch_joins_compatible_jobs_across_clients_and_queues_up_to_the_limit():
    head = job(1, client="a")
    same = [job(2, client="b", cfg_scale=3.0), job(3, queue=LONG, negative_prompt="x"), job(4, num_images=2)]
    other = [job(5, steps=30), job(6, width=128), job(7, sampler="ddim"), job(8, model="other")]
    batch = fill_batch(head, queue_order([head, *same, *other]), max_images=4)
    assert [j.id for j in batch] == ["j1", "j2", "j3"]  # j4 (2 images) would exceed 4 images
    assert [j.id for j in fill_batch(head, queue_order([head, *same]), max_images=8)] == [
        "j1",
        "j2",
        "j3",
        "j4",
    ]


def test_batch_limit_precedence():
    params = GenerationParams(prompt="x", model="m", width=512, height=512)
    assert batch_limit({}, params, None, 8) == 8
    assert batch_limit({}, params, 12, 8) == 12
    assert batch_limit({"*": 3}, params, 12, 8) == 3
    assert batch_limit({"*": 3, "*@512x512": 5}, params, 12, 8) == 5
    assert batch_limit({"*@512x512": 5, "m": 6}, params, 12, 8) == 6
    assert batch_limit({"m": 6, "m@512x512": 7}, params, 12, 8) == 7

"""The serving loop: the next batch is claimed while the current one ends, a batch's images are
stored and its jobs ended on a finisher thread while the next batch runs, and nothing is left
half-done or lost when the loop stops or the finishing crashes."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from genserve.artifacts.images import ImageStore
from genserve.config import Settings
from genserve.engine.engine import Engine
from genserve.engine.models.registry import scan_models
from genserve.schemas import GenerationParams
from genserve.store.jobs import JobStore
from genserve.worker.loop import Worker


@pytest.fixture
def worker(tiny_models_dir: Path, tmp_path: Path) -> Worker:
    settings = Settings(
        data_dir=tmp_path,
        models_dir=tiny_models_dir,
        builtin_models=False,
        default_model="tiny-sd15",
        default_max_batch_images=1,  # one job per batch: three jobs are three consecutive batches
        heartbeat_seconds=0.5,
        background_finish=True,  # these two are the defaults only with a GPU
        prefetch_batches=True,
    )
    store = JobStore.from_url(settings.resolved_store_url)
    engine = Engine(scan_models(tiny_models_dir), device="cpu")
    return Worker(settings, store, engine, ImageStore(settings.images_dir), "worker-test")


def submit(worker: Worker, count: int) -> list[str]:
    params = GenerationParams(
        prompt="a red star", model="tiny-sd15", steps=2, width=64, height=64, cfg_scale=3.0
    )
    return [worker.store.submit({**params.model_dump(), "seed": seed})[0].id for seed in range(count)]


def states(worker: Worker, ids: list[str]) -> list[str]:
    jobs = worker.store.get_many(ids)
    return [jobs[job_id].state.value for job_id in ids]


def test_a_batch_is_finished_on_its_own_thread_while_the_next_one_runs(worker: Worker):
    ids = submit(worker, 3)
    next_batch_started = threading.Event()
    overlapped: list[bool] = []
    finishing_threads: list[str] = []
    generate, finish = worker.engine.generate_batch, worker._finish

    def generate_batch(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if finishing_threads:  # a batch before this one is being (or has been) finished
            next_batch_started.set()
        return generate(*args, **kwargs)

    def finish_job(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        finishing_threads.append(threading.current_thread().name)
        if len(finishing_threads) == 1:
            # Finishing inline, the next batch could not start before this returns: the wait would time out.
            overlapped.append(next_batch_started.wait(timeout=60))
        return finish(*args, **kwargs)

    worker.engine.generate_batch = generate_batch
    worker._finish = finish_job
    worker.work(threading.Event(), until_idle=True)

    assert overlapped == [True]
    assert len(finishing_threads) == 3 and all(
        name.startswith("batch-finisher") for name in finishing_threads
    )
    assert states(worker, ids) == ["succeeded"] * 3
    jobs = worker.store.get_many(ids).values()
    assert all(len(job.image_ids) == 1 and worker.images.exists(job.image_ids[0]) for job in jobs)


def test_stopping_the_loop_ends_the_batch_it_generated_and_gives_back_the_one_it_claimed(worker: Worker):
    ids = submit(worker, 3)
    stop = threading.Event()
    generate = worker.engine.generate_batch

    def generate_then_stop(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        stop.set()  # the stop request arrives while the first batch is on the device
        return generate(*args, **kwargs)

    worker.engine.generate_batch = generate_then_stop
    worker.work(stop)
    assert states(worker, ids) == ["succeeded", "queued", "queued"]
    # The second job was claimed ahead during the first batch's last step; giving it back did not
    # use up its attempt.
    jobs = worker.store.get_many(ids)
    assert [jobs[job_id].attempt for job_id in ids] == [1, 0, 0]
    assert [event.type for event in worker.store.events.read_after(ids[1])] == [
        "queued",
        "started",
        "requeued",
    ]


def test_the_next_batch_is_claimed_while_the_current_one_runs_its_last_step(worker: Worker):
    ids = submit(worker, 2)
    steps_done: list[int] = []
    claims: list[tuple[str, int]] = []  # (thread, steps of the running batch done when claiming)
    claimed_ahead = threading.Event()
    generate, claim_next = worker.engine.generate_batch, worker.claim_next

    def generate_batch(items, on_batch_step):  # noqa: ANN001, ANN202
        steps_done.clear()

        def count_step(step: int, total: int, rows: int) -> None:
            steps_done.append(step)
            on_batch_step(step, total, rows)

        outcomes = generate(items, on_batch_step=count_step)
        if len(claims) == 1:
            # Claiming after this returns, the wait would time out: the claim must overlap the batch.
            assert claimed_ahead.wait(timeout=30)
        return outcomes

    def recorded_claim_next():  # noqa: ANN202
        claims.append((threading.current_thread().name, len(steps_done)))
        jobs = claim_next()
        if len(claims) == 2:
            claimed_ahead.set()
        return jobs

    worker.engine.generate_batch = generate_batch
    worker.claim_next = recorded_claim_next
    worker.work(threading.Event(), until_idle=True)
    assert states(worker, ids) == ["succeeded"] * 2
    first, ahead = claims[0], claims[1]
    assert first[0] == threading.current_thread().name
    # Late, so requests arriving during the batch can still join the next one: the steps are 2.
    assert ahead[0].startswith("batch-prefetch") and ahead[1] >= 1


def test_a_crash_while_storing_fails_that_job_and_the_loop_goes_on(worker: Worker):
    ids = submit(worker, 2)
    save = worker.images.save

    def save_or_fail(image_id: str, png: bytes) -> None:
        if image_id.startswith(ids[0]):
            raise OSError("disk full")
        save(image_id, png)

    worker.images.save = save_or_fail
    worker.work(threading.Event(), until_idle=True)
    first = worker.store.get_many(ids)[ids[0]]
    assert first.state.value == "failed" and "OSError: disk full" in first.error
    assert states(worker, ids)[1] == "succeeded"


def test_on_a_cpu_the_loop_claims_and_finishes_each_batch_itself(worker: Worker):
    # There claiming and finishing would compete with the batch for the same cores (measured slower).
    worker.settings = worker.settings.model_copy(update={"background_finish": None, "prefetch_batches": None})
    ids = submit(worker, 2)
    threads: list[str] = []
    finish, claim_next = worker._finish, worker.claim_next

    def finish_job(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        threads.append(threading.current_thread().name)
        return finish(*args, **kwargs)

    def recorded_claim_next():  # noqa: ANN202
        threads.append(threading.current_thread().name)
        return claim_next()

    worker._finish, worker.claim_next = finish_job, recorded_claim_next
    worker.work(threading.Event(), until_idle=True)
    # claim, finish, claim, finish, and the claim that finds the queue empty
    assert threads == [threading.current_thread().name] * 5
    assert states(worker, ids) == ["succeeded"] * 2


def test_a_prefetched_batch_keeps_its_leases_while_it_waits(worker: Worker):
    worker.settings = worker.settings.model_copy(update={"lease_seconds": 0.5, "heartbeat_seconds": 0.1})
    worker.leases.lease_seconds, worker.leases.interval = 0.5, 0.1
    ids = submit(worker, 2)
    reaped: list[list[str]] = []
    generate = worker.engine.generate_batch

    def slow_generate(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        outcomes = generate(*args, **kwargs)
        if not reaped:  # the first batch: the second job is claimed by now, and waits
            time.sleep(1.5)  # three lease lengths
            reaped.append(worker.store.reap_expired())
        return outcomes

    worker.engine.generate_batch = slow_generate
    worker.work(threading.Event(), until_idle=True)
    assert reaped == [[]]  # neither the running job's lease nor the waiting one's ran out
    jobs = worker.store.get_many(ids)
    assert [(jobs[i].state.value, jobs[i].attempt) for i in ids] == [("succeeded", 1), ("succeeded", 1)]


def test_a_prefetched_job_canceled_while_it_waits_never_reaches_the_engine(worker: Worker):
    ids = submit(worker, 2)
    batches: list[list[str]] = []
    generate = worker.engine.generate_batch

    def generate_then_cancel_the_waiting_job(items, on_batch_step):  # noqa: ANN001, ANN202
        batches.append([item.params.prompt for item in items])
        outcomes = generate(items, on_batch_step=on_batch_step)
        if len(batches) == 1:  # the second job is claimed by now; cancel it and let a heartbeat see it
            waiting = wait_for_state(worker, ids[1], "running")
            worker.store.request_cancel(waiting)
            deadline = time.monotonic() + 30
            while not worker.leases.is_canceled(waiting) and time.monotonic() < deadline:
                time.sleep(0.05)
        return outcomes

    worker.engine.generate_batch = generate_then_cancel_the_waiting_job
    worker.work(threading.Event(), until_idle=True)
    assert states(worker, ids) == ["succeeded", "canceled"]
    assert len(batches) == 1  # the canceled job cost no denoising step


def wait_for_state(worker: Worker, job_id: str, state: str) -> str:
    deadline = time.monotonic() + 30
    while worker.store.get(job_id).state.value != state and time.monotonic() < deadline:
        time.sleep(0.02)
    return job_id


def test_the_gap_between_back_to_back_batches_is_a_metric_idle_time_is_not(worker: Worker):
    from prometheus_client import REGISTRY

    def gaps_observed() -> float:
        return REGISTRY.get_sample_value("genserve_batch_gap_seconds_count") or 0.0

    before = gaps_observed()
    submit(worker, 3)  # one job per batch: three batches back to back, two gaps
    worker.work(threading.Event(), until_idle=True)
    assert gaps_observed() - before == 2
    time.sleep(0.2)  # the queue is empty: this wait is not the worker's gap
    submit(worker, 1)
    worker.work(threading.Event(), until_idle=True)
    assert gaps_observed() - before == 2

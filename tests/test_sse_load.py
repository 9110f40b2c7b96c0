"""SSE under load: 100 concurrent clients follow 25 jobs on a live server (4 each), a third of them
reconnecting mid-stream with Last-Event-ID, 2 of the jobs canceled. Each client's events, joined across
its connections, must be the job's whole event log: ids 1..n without a gap or a repeat, the last one
terminal. Afterwards the API process's threads and file descriptors must come back to where they
were before the load.

Two things come back only in their own way, and the test waits for them:
- Starlette runs each stream's store reads on anyio's worker threads (at most 40). An idle worker
  thread exits when a later call finds it idle for 10 s, so threads are counted after 11 quiet
  seconds and one request.
- SQLite defers closing a closed connection's database descriptor while other connections of the
  process hold locks on the file, and reuses it for the next connection. The pool keeps 5
  connections and closes up to 10 overflow ones, so the store's descriptors (genserve.db, -wal,
  -shm) go from 3 to 21 after any burst and stay there (measured in-process: 15 connections open
  31, closed back to the pool 21, the same after every further burst); they stay within 31.
  Every other descriptor must come back exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import LiveServer

CLIENTS = 100
JOBS = 25  # 4 clients follow each job: 100 streams at once, a quarter of the engine work
TERMINAL = {"succeeded", "failed", "canceled"}
ANYIO_IDLE_SECONDS = 10  # anyio's WorkerThread.MAX_IDLE_TIME
ANYIO_THREADS = 40  # anyio's default thread limiter
# SQLAlchemy's default pool: 5 kept + 10 overflow connections, each with the database and its WAL
# open, plus one shared-memory file: the store's descriptors stay within this (module docstring).
STORE_POOL_FDS = (5 + 10) * 2 + 1


def proc_counts(pid: int) -> tuple[int, int]:
    """(threads, open file descriptors) of a process."""
    return len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd"))


def store_fds(pid: int, data_dir: Path) -> int:
    """Open descriptors on the SQLite store's files (genserve.db, -wal, -shm): pooled connections."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith(str(data_dir / "genserve.db"))
    return count


async def counts(server: LiveServer, quiet_seconds: float) -> tuple[int, int, int]:
    """Threads, fds and store fds after `quiet_seconds` and one threadpool request, which prunes
    anyio's worker threads idle for 10 s (module docstring) and leaves one idle thread, as the
    server's readiness polls did before the load."""
    await asyncio.sleep(quiet_seconds)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        (await http.get("/healthz")).raise_for_status()
    await asyncio.sleep(0.5)
    return (*proc_counts(server.process.pid), store_fds(server.process.pid, server.data_dir.resolve()))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    live = LiveServer(
        models_dir=tmp_path_factory.mktemp("models"),  # empty: the built-in model only
        data_dir=tmp_path_factory.mktemp("data"),
        env={
            "GENSERVE_BUILTIN_MODELS": "true",
            "GENSERVE_DEFAULT_MODEL": "genserve-shapes",
            "GENSERVE_LIMITS__MAX_WIDTH": "64",
            "GENSERVE_LIMITS__MAX_HEIGHT": "64",
            "GENSERVE_LIMITS__MAX_STEPS": "6",
            "GENSERVE_PREVIEW_EVERY": "0",
        },
    ).start()
    yield live
    live.kill_all()  # nothing to keep: a graceful stop would only cost seconds


async def read_stream(response: httpx.Response, limit: int | None):
    """Parse SSE events as (id, type) until the stream ends or `limit` events were read."""
    current: dict = {}
    count = 0
    async for line in response.aiter_lines():
        if line.startswith("id:"):
            current["id"] = int(line[3:].strip())
        elif line.startswith("event:"):
            current["type"] = line[6:].strip()
        elif line.startswith("data:"):
            json.loads(line[5:])  # every payload must be JSON
        elif line == "" and "type" in current:
            yield current["id"], current["type"]
            current, count = {}, count + 1
            if limit is not None and count >= limit:
                return


async def follow(http: httpx.AsyncClient, job_id: str, cuts: list[int]) -> tuple[list, int]:
    """Follow a job's events; after cuts[i] events of connection i, drop it and reconnect with
    Last-Event-ID. Returns the (id, type) events seen and the number of mid-stream reconnects."""
    seen: list[tuple[int, str]] = []
    reconnects = 0
    for cut in [*cuts, None]:
        headers = {"Last-Event-ID": str(seen[-1][0])} if seen else {}
        async with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
            assert response.status_code == 200, response.status_code
            async for event in read_stream(response, cut):
                seen.append(event)
                if event[1] in TERMINAL:
                    return seen, reconnects
        reconnects += 1  # left before the terminal event: the server sees a disconnect mid-stream
    return seen, reconnects


async def cancel_after(http: httpx.AsyncClient, job_id: str, seconds: float) -> None:
    await asyncio.sleep(seconds)
    (await http.delete(f"/v1/jobs/{job_id}")).raise_for_status()


async def run_load(server: LiveServer, rng: random.Random) -> dict:
    """Submit JOBS jobs, staggered; CLIENTS followers start at random moments of their job's life."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as http:

        async def client(i: int, job_id: str) -> tuple[str, list, int]:
            await asyncio.sleep(rng.uniform(0, 1))
            # A third reconnect: once or twice, after 1-3 events each time.
            cuts = [rng.randint(1, 3) for _ in range(rng.choice([1, 2]))] if i % 3 == 0 else []
            seen, reconnects = await follow(http, job_id, cuts)
            return job_id, seen, reconnects

        async def job(j: int) -> list:
            await asyncio.sleep(rng.uniform(0, 1))  # staggered, so jobs are at every stage at once
            body = {"prompt": f"load {j}", "steps": rng.randint(3, 6), "width": 64, "height": 64}
            response = await http.post("/v1/jobs", json=body)
            assert response.status_code == 202, response.text
            job_id = response.json()["id"]
            per_job = CLIENTS // JOBS
            tasks = [client(j * per_job + k, job_id) for k in range(per_job)]
            if j % 10 == 5:  # jobs 5 and 15: canceled while queued or running
                # Job 5 at once, so at least one cancel lands before its job can end (a 3-step job
                # on this model can finish within a second); job 15 at a random moment.
                tasks.append(cancel_after(http, job_id, 0.0 if j == 5 else rng.uniform(0, 1)))
            return [r for r in await asyncio.gather(*tasks) if r is not None]

        followed = [r for rs in await asyncio.gather(*(job(j) for j in range(JOBS))) for r in rs]
        # The whole log of each job, read again from the start, to compare the followers against.
        full = {}
        for job_id in {job_id for job_id, _, _ in followed}:
            full[job_id], _ = await follow(http, job_id, [])
    return {"followed": followed, "full": full}


def check_load(result: dict) -> dict:
    reconnects, terminals = 0, {}
    for job_id, seen, n in result["followed"]:
        ids = [event_id for event_id, _ in seen]
        assert ids == list(range(1, len(ids) + 1)), f"{job_id}: ids {ids} have a gap or a repeat"
        assert seen[-1][1] in TERMINAL, f"{job_id}: ends with {seen[-1]}"
        assert seen == result["full"][job_id], f"{job_id}: {seen} != its log {result['full'][job_id]}"
        reconnects += n
    for log in result["full"].values():
        terminals[log[-1][1]] = terminals.get(log[-1][1], 0) + 1
    return {"clients": len(result["followed"]), "reconnects": reconnects, "jobs_ended": terminals}


def test_sse_under_load_is_gapless_and_leaks_nothing(server):
    async def scenario() -> None:
        rng = random.Random(15)
        pid = server.process.pid
        started = time.monotonic()
        base_threads, base_fds, base_store_fds = await counts(server, 0)
        peak = [0, 0]

        async def watch() -> None:
            while True:
                threads, fds = proc_counts(pid)
                peak[0], peak[1] = max(peak[0], threads), max(peak[1], fds)
                await asyncio.sleep(0.2)

        watcher = asyncio.create_task(watch())
        load_started, cpu_before = time.monotonic(), cpu_seconds(pid)
        summary = check_load(await run_load(server, rng))
        load_seconds, api_cpu = time.monotonic() - load_started, cpu_seconds(pid) - cpu_before
        watcher.cancel()
        threads, fds, store = await counts(server, ANYIO_IDLE_SECONDS + 1)
        print(
            f"\nSSE load: {summary} in {load_seconds:.1f} s (API process CPU {api_cpu:.1f} s); threads "
            f"{base_threads} -> peak {peak[0]} -> {threads}, fds {base_fds} -> peak {peak[1]} -> {fds} "
            f"(store files {base_store_fds} -> {store}); whole test {time.monotonic() - started:.1f} s"
        )
        assert summary["clients"] == CLIENTS, summary
        assert summary["reconnects"] >= CLIENTS // 4, summary  # the reconnect path was exercised
        assert summary["jobs_ended"].get("canceled", 0) >= 1, summary
        assert peak[1] >= base_fds + CLIENTS // 2, "the streams were not open at the same time"
        assert peak[0] <= base_threads + ANYIO_THREADS + 5, f"threads {peak[0]} beyond anyio's bound"
        assert threads <= base_threads, f"threads {base_threads} -> {threads} after the load"
        # Sockets, pipes and every other descriptor come back exactly; the store's stay within the
        # pool's bound (a leak would grow with the number of streams).
        assert fds - store <= base_fds - base_store_fds, f"fds {base_fds} -> {fds} after the load"
        assert store <= STORE_POOL_FDS, f"store fds {base_store_fds} -> {store}"

    asyncio.run(scenario())

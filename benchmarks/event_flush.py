"""The worker's per-step event write: one batch step's progress events, as the worker writes them
between two denoising steps (on the device's critical path), on SQLite and PostgreSQL.

Compares, alternating on the same store: one numbered insert per event (`append_event` in one
transaction, how `EventLog.append_many` wrote until 2026-11-24, and still its fallback when another
appender races it) against `EventLog.append_many` (one read of the jobs' last numbers, one multi-row
insert).

    .venv/bin/python benchmarks/event_flush.py
    .venv/bin/python benchmarks/event_flush.py --postgres postgresql+psycopg://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import date
from pathlib import Path

import sqlalchemy as sa

from genserve.engine.speed.optimize import device_name
from genserve.events.log import EventLog, append_event
from genserve.store.db import write_transaction
from genserve.store.jobs import JobStore

Events = list[tuple[str, str, dict]]


def per_event(engine: sa.Engine) -> Callable[[Events], object]:
    def write(events: Events) -> object:
        with write_transaction(engine) as conn:
            return [append_event(conn, job_id, type, data) for job_id, type, data in events]

    return write


def measure(url: str, jobs_per_batch: list[int], steps: int) -> dict:
    store = JobStore.from_url(url)  # creates the tables
    log = EventLog(store.engine)
    writers = {"per_event": per_event(store.engine), "append_many": log.append_many}
    results = {}
    for jobs in jobs_per_batch:
        times: dict[str, list[float]] = {name: [] for name in writers}
        job_ids = [f"bench-{uuid.uuid4().hex[:8]}" for _ in range(jobs)]
        for step in range(1, steps + 1):
            progress = {"step": step, "steps": steps, "percent": 100 * step / steps, "eta_s": 1.0, "ts": 0.0}
            events = [(job_id, "progress", progress) for job_id in job_ids]
            for name, write in writers.items():  # alternating, so drift hits both
                start = time.perf_counter()
                write(events)
                times[name].append(1000 * (time.perf_counter() - start))
        results[f"{jobs}_jobs"] = {f"{name}_ms_median": statistics.median(t) for name, t in times.items()}
    store.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", help="a server URL; a scratch database is created and dropped")
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    stores: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        stores["sqlite"] = measure(f"sqlite:///{Path(tmp) / 'bench.db'}", args.jobs, args.steps)
    if args.postgres:
        admin = sa.create_engine(args.postgres, isolation_level="AUTOCOMMIT")
        scratch = f"genserve_bench_{uuid.uuid4().hex[:8]}"
        with admin.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE {scratch}"))
        try:
            url = admin.url.set(database=scratch).render_as_string(hide_password=False)
            stores["postgresql"] = measure(url, args.jobs, args.steps)
        finally:
            with admin.connect() as conn:
                conn.execute(sa.text(f"DROP DATABASE {scratch} WITH (FORCE)"))
            admin.dispose()
    for name, rows in stores.items():
        for jobs, r in rows.items():
            print(
                f"{name:>10} {jobs:>8}: one insert per event {r['per_event_ms_median']:.2f} ms, "
                f"append_many {r['append_many_ms_median']:.2f} ms (median of {args.steps} steps)"
            )
    record = {
        "benchmark": "event_flush",
        "date": date.today().isoformat(),
        "device": device_name("cpu"),
        "steps": args.steps,
        "results": stores,
        "command": "python benchmarks/event_flush.py"
        + (" --postgres postgresql+psycopg://postgres@127.0.0.1:5432/postgres" if args.postgres else ""),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{date.today().isoformat()}-cpu-event-flush.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

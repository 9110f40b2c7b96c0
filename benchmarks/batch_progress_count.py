"""Counting a large batch's items by state, as the batch CLI's progress bar and GET /v1/batches do.

Compares, alternating on the same SQLite store: loading every item's job and counting in Python
(`JobStore.get_many`, how the counts were taken until 2026-11-24) against one aggregate query per
500 ids (`JobStore.counts_for`). The batch CLI took the count between every two batches.

    .venv/bin/python benchmarks/batch_progress_count.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import Counter
from datetime import date
from pathlib import Path

from genserve.engine.speed.optimize import device_name
from genserve.store.jobs import JobStore


def median_ms(repeats: int, count: object) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        count()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = JobStore.from_url(f"sqlite:///{Path(tmp) / 'bench.db'}")
        ids = [store.submit({"prompt": f"item {i}"})[0].id for i in range(max(args.items))]
        for n in args.items:
            subset = ids[:n]
            load_all = median_ms(
                args.repeats, lambda s=subset: Counter(j.state for j in store.get_many(s).values())
            )
            aggregate = median_ms(args.repeats, lambda s=subset: store.counts_for(s))
            results[f"{n}_items"] = {"get_many_ms_median": load_all, "counts_for_ms_median": aggregate}
            print(f"{n:>6} items: load every job {load_all:.1f} ms, counts_for {aggregate:.1f} ms")
        store.close()
    record = {
        "benchmark": "batch_progress_count",
        "date": date.today().isoformat(),
        "device": device_name("cpu"),
        "store": "sqlite",
        "repeats": args.repeats,
        "results": results,
        "command": "python benchmarks/batch_progress_count.py",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{date.today().isoformat()}-cpu-batch-progress-count.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Soak: many jobs through a real `genserve serve` (and `genserve worker`s) over HTTP; does anything leak?

4 concurrent HTTP clients submit `--jobs` jobs with the built-in genserve-shapes model (4-8 steps,
1-2 images, random prompts and seeds, the default sampler, so jobs with equal step counts can share
a batch), each keeping `--in-flight` jobs outstanding. About
`--cancel-fraction` of the jobs get DELETE /v1/jobs/{id} at a random moment while queued or running.
Every 10 s a sampler records the RSS, open file descriptors and threads of the API process and of
every worker process. At the end it checks that every job is terminal, counts them by state, takes
submit->done percentiles from the jobs' own timestamps, measures the store and the image folder,
downloads 50 sampled images (each must be a valid PNG), restarts the whole stack and checks that no
job changed.

    # embedded mode: SQLite store, one supervised worker
    .venv/bin/python benchmarks/soak.py --store sqlite --jobs 1000
    # multi-node mode: a fresh PostgreSQL database, Redis broker, `--workers 0` API + 2 `genserve worker`
    .venv/bin/python benchmarks/soak.py --store postgres --celery-workers 2 --jobs 1000

The recorded runs (2026-12-04, results in benchmarks/results/*-soak-*.json) measured commit 9f4aa5a,
exported with `git archive 9f4aa5a genserve | tar -x -C /tmp/gs-head` because the shared working
tree was mid-refactor, and were run from /tmp as

    PYTHONPATH=/tmp/gs-head .venv/bin/python benchmarks/soak.py --store sqlite --jobs 1000
    PYTHONPATH=/tmp/gs-head .venv/bin/python benchmarks/soak.py --store postgres --celery-workers 2 --jobs 1000
    PYTHONPATH=/tmp/gs-head .venv/bin/python benchmarks/soak.py --store postgres --celery-workers 2 --jobs 2000

The PostgreSQL database is created fresh (genserve_soak_<hex>) and dropped at the end unless --keep;
the Celery queue is private to the run (genserve-soak-<hex>) on the shared Redis, databases 14/15.

Memory growth is measured from minute 2 (model loaded, allocator warm) to the end of the run, per
process; the issue's bar is 10%. The record goes to
benchmarks/results/<date>-<device>-soak-<store>[-celery<N>]-<jobs>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import date, datetime
from pathlib import Path

import httpx
import psutil  # installed with accelerate, a genserve dependency
import sqlalchemy as sa
from PIL import Image

TERMINAL = {"succeeded", "failed", "canceled"}
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star"]
POSTGRES_ADMIN_URL = os.environ.get(
    "GENSERVE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REPO = Path(__file__).resolve().parent.parent


def code_commit(source: Path) -> str:
    """The commit of the genserve package this run imported, when it is this repository's."""
    if not source.resolve().is_relative_to(REPO):
        return "unknown: genserve imported from outside this repository; pass --code-commit"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    changed = subprocess.run(
        ["git", "status", "--porcelain", "genserve"], cwd=REPO, capture_output=True, text=True
    )
    return head.stdout.strip() + (" with uncommitted changes in genserve/" if changed.stdout.strip() else "")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def proc_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def proc_threads(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return None


class Stack:
    """The API server and, in multi-node mode, the `genserve worker` processes."""

    def __init__(self, args: argparse.Namespace, data_dir: Path, store_url: str | None) -> None:
        self.args = args
        self.data_dir = data_dir
        self.store_url = store_url
        self.port = free_port()
        self.api: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "GENSERVE_PORT": str(self.port),
            "GENSERVE_DATA_DIR": str(data_dir),
            "GENSERVE_MODELS_DIR": str(data_dir / "models"),  # empty: only the built-in model
            "GENSERVE_DEFAULT_MODEL": "genserve-shapes",
            "GENSERVE_AUTH": "off",
        }
        if store_url:
            self.env["GENSERVE_STORE_URL"] = store_url
        if args.celery_workers:
            queue = f"genserve-soak-{uuid.uuid4().hex[:8]}"  # the shared Redis: keep to our own queue
            self.env |= {
                "GENSERVE_BROKER_URL": args.broker,
                "GENSERVE_BROKER_QUEUE": queue,
                "GENSERVE_REDIS_EVENTS_URL": args.redis_events,
                "GENSERVE_WORKERS": "0",
                # Two workers on a 2-core machine: one torch thread each, not two fighting for both.
                "GENSERVE_TORCH_THREADS": str(args.torch_threads or 1),
            }
        elif args.torch_threads:
            self.env["GENSERVE_TORCH_THREADS"] = str(args.torch_threads)
        self.logs = data_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, argv: list[str], log_name: str) -> subprocess.Popen:
        log = open(self.logs / log_name, "ab")  # noqa: SIM115 - the child owns it
        return subprocess.Popen(
            [sys.executable, "-m", "genserve.cli", *argv],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.data_dir,
        )

    def start(self, timeout: float = 240) -> None:
        self.api = self._spawn(["serve"], "api.log")
        for i in range(self.args.celery_workers):
            self.workers.append(self._spawn(["worker", "--name", f"soak-w{i}"], f"worker{i}.log"))
        expected = max(1, self.args.celery_workers)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.api.poll() is not None:
                raise RuntimeError(f"server exited with {self.api.returncode}; see {self.logs}")
            with contextlib.suppress(httpx.HTTPError):
                ready = httpx.get(self.url + "/readyz", timeout=5).json().get("ready_workers", [])
                if len(ready) >= expected:
                    return
            time.sleep(0.5)
        raise TimeoutError(f"stack not ready within {timeout}s; see {self.logs}")

    def stop(self) -> None:
        """A graceful stop: SIGINT to the server, SIGTERM to the workers (a warm shutdown)."""
        for process, sig in [(self.api, signal.SIGINT)] + [(w, signal.SIGTERM) for w in self.workers]:
            if process and process.poll() is None:
                process.send_signal(sig)
        for process in [self.api, *self.workers]:
            if process is None:
                continue
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            with contextlib.suppress(ProcessLookupError):  # no pool child may outlive its parent
                os.killpg(process.pid, signal.SIGKILL)
        self.api, self.workers = None, []

    def processes(self) -> dict[str, psutil.Process]:
        """role -> process: the API, and each worker process (embedded: the supervised children;
        multi-node: each `genserve worker` and its prefork pool child)."""
        found: dict[str, psutil.Process] = {}
        api = psutil.Process(self.api.pid)
        found["api"] = api
        if not self.workers:
            for i, child in enumerate(api.children(recursive=True)):
                found[f"worker{i}"] = child
        for i, worker in enumerate(self.workers):
            main = psutil.Process(worker.pid)
            found[f"worker{i}-main"] = main
            for j, child in enumerate(main.children(recursive=True)):
                found[f"worker{i}-pool{j}"] = child
        return found


class Sampler(threading.Thread):
    """Every `interval` seconds: RSS, fds and threads of every process of the stack."""

    def __init__(self, stack: Stack, interval: float, start: float) -> None:
        super().__init__(daemon=True)
        self.stack, self.interval, self.t0 = stack, interval, start
        self.samples: list[dict] = []
        self.done = threading.Event()

    def sample(self) -> None:
        # The load average shows how much else ran on the machine (CPU shared with other work).
        row: dict = {"t": round(time.monotonic() - self.t0, 1), "loadavg": os.getloadavg(), "processes": {}}
        with contextlib.suppress(psutil.Error):
            for role, process in self.stack.processes().items():
                with contextlib.suppress(psutil.Error):
                    row["processes"][role] = {
                        "pid": process.pid,
                        "rss_mib": round(process.memory_info().rss / 2**20, 2),
                        "fds": proc_fds(process.pid),
                        "threads": proc_threads(process.pid),
                    }
        self.samples.append(row)

    def run(self) -> None:
        while not self.done.is_set():
            self.sample()
            self.done.wait(self.interval)
        self.sample()


def growth(samples: list[dict], from_seconds: float) -> dict:
    """Per process: RSS at the first sample at or after `from_seconds`, at the end, and the growth."""
    out = {}
    roles = {role for s in samples for role in s["processes"]}
    for role in sorted(roles):
        series = [(s["t"], s["processes"][role]) for s in samples if role in s["processes"]]
        late = [(t, p) for t, p in series if t >= from_seconds] or series[-1:]
        (t0, first), (t1, last) = late[0], late[-1]
        pids = sorted({p["pid"] for _, p in series})
        out[role] = {
            "pids": pids,  # more than one: the process was replaced during the run
            "from_t": t0,
            "to_t": t1,
            "rss_mib_from": first["rss_mib"],
            "rss_mib_to": last["rss_mib"],
            "rss_mib_max": max(p["rss_mib"] for _, p in series),
            "growth_pct": round(100 * (last["rss_mib"] - first["rss_mib"]) / first["rss_mib"], 2),
            "fds_from": first["fds"],
            "fds_to": last["fds"],
            "fds_max": max(p["fds"] or 0 for _, p in series),
            "threads_from": first["threads"],
            "threads_to": last["threads"],
        }
    return out


class Client:
    """One HTTP client: submits its share of jobs, `in_flight` at a time, cancels some, waits for all."""

    def __init__(self, index: int, url: str, jobs: int, args: argparse.Namespace, rng: random.Random) -> None:
        self.index, self.url, self.jobs, self.args, self.rng = index, url, jobs, args, rng
        self.records: list[dict] = []
        self.errors: list[str] = []

    def params(self, n: int) -> dict:
        color, background = self.rng.sample(COLORS, 2)
        return {
            "prompt": f"a {color} {self.rng.choice(SHAPES)} on a {background} background",
            "steps": self.rng.randint(4, 8),
            "num_images": self.rng.randint(1, 2),
            "seed": self.rng.randrange(2**31),
            "request_id": f"soak-{self.index}-{n}",
        }

    async def run(self, latency_hint: list[float]) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=60) as http:
            window = asyncio.Semaphore(self.args.in_flight)
            tasks = []
            for n in range(self.jobs):
                await window.acquire()
                tasks.append(asyncio.create_task(self.one(http, n, window, latency_hint)))
            await asyncio.gather(*tasks)

    async def one(
        self, http: httpx.AsyncClient, n: int, window: asyncio.Semaphore, latency_hint: list[float]
    ) -> None:
        try:
            record = {"client": self.index, "submitted": time.monotonic(), "cancel": None}
            response = await http.post("/v1/jobs", json=self.params(n))
            if response.status_code != 202:
                self.errors.append(f"submit {n}: {response.status_code} {response.text[:200]}")
                return
            job_id = response.json()["id"]
            record["id"] = job_id
            self.records.append(record)
            cancel_at = None
            if self.rng.random() < self.args.cancel_fraction:
                # A random moment within the typical life of a job: some land while it is queued,
                # some while it runs, a few after it finished (recorded as too late).
                typical = statistics.median(latency_hint[-50:]) if latency_hint else 1.0
                cancel_at = time.monotonic() + self.rng.uniform(0, typical)
            while True:
                if cancel_at is not None and time.monotonic() >= cancel_at:
                    before = (await http.get(f"/v1/jobs/{job_id}")).json()["state"]
                    after = (await http.delete(f"/v1/jobs/{job_id}")).json()["state"]
                    record["cancel"] = {"state_before": before, "answer": after}
                    cancel_at = None
                job = (await http.get(f"/v1/jobs/{job_id}")).json()
                if job["state"] in TERMINAL:
                    record["state"] = job["state"]
                    record["seen_done"] = time.monotonic()
                    latency_hint.append(record["seen_done"] - record["submitted"])
                    return
                await asyncio.sleep(self.args.poll_seconds)
        except (httpx.HTTPError, KeyError, ValueError) as error:
            self.errors.append(f"job {n}: {type(error).__name__}: {error}")
        finally:
            window.release()


async def drive(url: str, args: argparse.Namespace) -> list[Client]:
    rng = random.Random(args.seed)
    share = [
        args.jobs // args.clients + (1 if i < args.jobs % args.clients else 0) for i in range(args.clients)
    ]
    clients = [Client(i, url, share[i], args, random.Random(rng.random())) for i in range(args.clients)]
    latency_hint: list[float] = []
    await asyncio.gather(*(c.run(latency_hint) for c in clients))
    return clients


def snapshot(store: sa.Engine) -> dict[str, tuple]:
    with store.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT id, state, attempt, finished_at, image_ids, error FROM jobs")
        ).all()
    return {r.id: (r.state, r.attempt, str(r.finished_at), json.dumps(r.image_ids), r.error) for r in rows}


def check_images(url: str, store: sa.Engine, count: int, rng: random.Random) -> dict:
    with store.connect() as conn:
        ids = [
            image
            for (images,) in conn.execute(sa.text("SELECT image_ids FROM jobs WHERE state = 'succeeded'"))
            for image in (json.loads(images) if isinstance(images, str) else images)
        ]
    sample = rng.sample(ids, min(count, len(ids)))
    ok, bad = 0, []
    with httpx.Client(base_url=url, timeout=30) as http:
        for image_id in sample:
            response = http.get(f"/v1/images/{image_id}")
            try:
                assert response.status_code == 200, response.status_code
                assert response.content.startswith(b"\x89PNG\r\n\x1a\n"), "not a PNG signature"
                with Image.open(io.BytesIO(response.content)) as image:
                    image.verify()
                ok += 1
            except Exception as error:  # noqa: BLE001 - record every kind of failure
                bad.append(f"{image_id}: {error}")
    return {"images_total": len(ids), "sampled": len(sample), "valid_png": ok, "failures": bad}


def store_bytes(store_url: str | None, data_dir: Path, store: sa.Engine) -> int:
    if store_url and store_url.startswith("postgresql"):
        with store.connect() as conn:
            return conn.execute(sa.text("SELECT pg_database_size(current_database())")).scalar_one()
    return sum(p.stat().st_size for p in data_dir.glob("genserve.db*"))


def table_rows(store: sa.Engine) -> dict:
    with store.connect() as conn:
        return {
            table: conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()
            for table in ("jobs", "job_events")
        }


def create_postgres_database() -> tuple[str, str]:
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"genserve_soak_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    admin.dispose()
    return name, url


def drop_postgres_database(name: str) -> None:
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--celery-workers", type=int, default=0, help="multi-node mode with N workers")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--redis-events", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--in-flight", type=int, default=4, help="outstanding jobs per client")
    parser.add_argument("--cancel-fraction", type=float, default=0.10)
    parser.add_argument("--poll-seconds", type=float, default=0.5)
    parser.add_argument("--sample-seconds", type=float, default=10.0)
    parser.add_argument("--growth-from", type=float, default=120.0, help="seconds into the run")
    parser.add_argument("--torch-threads", type=int, default=None)
    parser.add_argument("--images", type=int, default=50, help="images to download and check")
    parser.add_argument("--restart-wait", type=float, default=15.0, help="seconds after the restart")
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--keep", action="store_true", help="keep the data folder and database")
    parser.add_argument(
        "--code-commit", help="the commit of the genserve tree on PYTHONPATH, if not this repository's"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    if args.celery_workers and args.store != "postgres":
        parser.error("--celery-workers needs --store postgres")

    tmp = Path(tempfile.mkdtemp(prefix="genserve-soak-"))
    db_name, store_url = create_postgres_database() if args.store == "postgres" else (None, None)
    stack = Stack(args, tmp, store_url)
    store = sa.create_engine(store_url or f"sqlite:///{tmp / 'genserve.db'}")
    record: dict = {}
    try:
        t_start = time.monotonic()
        stack.start()
        ready_seconds = time.monotonic() - t_start
        print(f"stack ready in {ready_seconds:.1f} s at {stack.url} (data {tmp})", flush=True)
        t0 = time.monotonic()
        sampler = Sampler(stack, args.sample_seconds, t0)
        sampler.start()
        started_at = datetime.now().astimezone()
        clients = asyncio.run(drive(stack.url, args))
        run_seconds = time.monotonic() - t0
        sampler.done.set()
        sampler.join()
        print(f"run finished in {run_seconds:.1f} s", flush=True)

        records = [r for c in clients for r in c.records]
        errors = [e for c in clients for e in c.errors]
        with store.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT id, state, created_at, started_at, finished_at, attempt, params FROM jobs")
            ).all()
        counts: dict[str, int] = {}
        for row in rows:
            counts[row.state] = counts.get(row.state, 0) + 1

        def when(value: datetime | str) -> datetime:  # SQLite gives strings, PostgreSQL datetimes
            return datetime.fromisoformat(value) if isinstance(value, str) else value

        def seconds(row: sa.Row, start: str = "created_at", end: str = "finished_at") -> float:
            return (when(getattr(row, end)) - when(getattr(row, start))).total_seconds()

        # Where the time went, for succeeded jobs: waiting in the queue vs running, and by step count.
        ok = [r for r in rows if r.state == "succeeded" and r.started_at is not None]
        breakdown: dict = {
            "queue_wait_p50": percentile([seconds(r, end="started_at") for r in ok], 0.5),
            "queue_wait_p95": percentile([seconds(r, end="started_at") for r in ok], 0.95),
            "running_p50": percentile([seconds(r, start="started_at") for r in ok], 0.5),
            "running_p95": percentile([seconds(r, start="started_at") for r in ok], 0.95),
        }
        for steps in range(4, 9):
            of = [
                seconds(r)
                for r in ok
                if (json.loads(r.params) if isinstance(r.params, str) else r.params)["steps"] == steps
            ]
            breakdown[f"steps_{steps}"] = {
                "jobs": len(of),
                "p50": percentile(of, 0.5),
                "p95": percentile(of, 0.95),
            }

        done = [seconds(r) for r in rows if r.state == "succeeded" and r.finished_at is not None]
        all_terminal = [seconds(r) for r in rows if r.finished_at is not None]
        client_seen = [r["seen_done"] - r["submitted"] for r in records if "seen_done" in r]
        cancels = [r["cancel"] for r in records if r["cancel"]]
        cancel_summary: dict[str, int] = {}
        for c in cancels:
            key = f"{c['state_before']}->{c['answer']}"
            cancel_summary[key] = cancel_summary.get(key, 0) + 1
        images_dir = tmp / "images"
        sizes = {
            "store_bytes": store_bytes(store_url, tmp, store),
            "images_dir_bytes": folder_bytes(images_dir) if images_dir.exists() else 0,
            "image_files": sum(1 for p in images_dir.rglob("*.png")) if images_dir.exists() else 0,
            "rows": table_rows(store),
        }
        image_check = check_images(stack.url, store, args.images, random.Random(args.seed))
        with store.connect() as conn:
            succeeded_images = sum(
                len(json.loads(i) if isinstance(i, str) else i)
                for (i,) in conn.execute(sa.text("SELECT image_ids FROM jobs WHERE state = 'succeeded'"))
            )
        mem = growth(sampler.samples, args.growth_from)

        before = snapshot(store)
        stack.stop()
        stack.start()
        time.sleep(args.restart_wait)  # the reaper and the recovery of dead workers run meanwhile
        after = snapshot(store)
        changed = sorted(job for job in before if after.get(job) != before[job])
        record_restart = {
            "jobs_before": len(before),
            "jobs_after": len(after),
            "changed": len(changed),
            "changed_examples": [{"id": j, "before": before[j], "after": after.get(j)} for j in changed[:5]],
            "waited_seconds_after_ready": args.restart_wait,
        }
        stack.stop()

        import genserve
        from genserve.engine.speed.optimize import device_name, device_slug

        command = "python benchmarks/soak.py " + " ".join(sys.argv[1:])
        record = {
            "benchmark": "soak",
            "date": date.today().isoformat(),
            "started_at": started_at.isoformat(timespec="seconds"),
            "device": device_name("cpu"),
            "cpus": os.cpu_count(),
            "store": args.store,
            "mode": f"multi-node: 1 API (--workers 0) + {args.celery_workers} genserve worker (Celery)"
            if args.celery_workers
            else "embedded: genserve serve with 1 supervised worker",
            "model": "genserve-shapes",
            "command": command,
            "genserve_source": str(Path(genserve.__file__).parent),
            "genserve_commit": args.code_commit or code_commit(Path(genserve.__file__).parent),
            "settings": {
                k: v
                for k, v in stack.env.items()
                if k.startswith("GENSERVE_") and k not in ("GENSERVE_PORT", "GENSERVE_DATA_DIR")
            },
            "jobs_requested": args.jobs,
            "clients": args.clients,
            "in_flight_per_client": args.in_flight,
            "ready_seconds": round(ready_seconds, 1),
            "run_seconds": round(run_seconds, 1),
            "client_errors": errors,
            "jobs_in_store": len(rows),
            "all_terminal": all(r.state in TERMINAL for r in rows),
            "counts_by_state": counts,
            "attempts_above_1": sum(1 for r in rows if r.attempt > 1),
            "cancel_requests": len(cancels),
            "cancel_outcomes": cancel_summary,
            "throughput": {
                "jobs_per_minute": round(60 * len(rows) / run_seconds, 1),
                "succeeded_images_per_minute": round(60 * succeeded_images / run_seconds, 1),
                "succeeded_images": succeeded_images,
            },
            "submit_to_done_seconds": {
                "succeeded_p50": percentile(done, 0.50),
                "succeeded_p95": percentile(done, 0.95),
                "all_terminal_p50": percentile(all_terminal, 0.50),
                "all_terminal_p95": percentile(all_terminal, 0.95),
                "client_observed_p50": percentile(client_seen, 0.50),
                "client_observed_p95": percentile(client_seen, 0.95),
                "succeeded_breakdown": breakdown,
                "note": "succeeded/all_terminal: the store's created_at -> finished_at; client_observed "
                "adds the client's poll interval",
            },
            "memory_from_t": args.growth_from,
            "memory": mem,
            "max_growth_pct": max(m["growth_pct"] for m in mem.values()),
            "sizes": sizes,
            "image_check": image_check,
            "restart": record_restart,
            "samples": sampler.samples,
        }
        suffix = f"{args.store}" + (f"-celery{args.celery_workers}" if args.celery_workers else "")
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"{date.today().isoformat()}-{device_slug('cpu')}-soak-{suffix}-{args.jobs}.json"
        path.write_text(json.dumps(record, indent=2, default=str) + "\n")
        summary = {k: record[k] for k in ("all_terminal", "counts_by_state", "throughput", "max_growth_pct")}
        print(json.dumps(summary | {"latency": record["submit_to_done_seconds"], "restart": record_restart}))
        print(f"wrote {path}")
    finally:
        stack.stop()
        store.dispose()
        if not args.keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            if db_name:
                drop_postgres_database(db_name)


if __name__ == "__main__":
    main()

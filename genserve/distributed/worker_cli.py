"""`genserve worker`: one Celery worker process per GPU, taking jobs woken through the broker.

With `--gpus all` (or a list such as `0,1`) this process starts one worker per GPU, each pinned with
CUDA_VISIBLE_DEVICES, forwards SIGTERM/SIGINT to them and exits when they have all exited.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from genserve.config import Settings


def visible_gpus() -> list[str]:
    """GPU indices this machine shows (nvidia-smi), or the ones CUDA_VISIBLE_DEVICES names."""
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        return [gpu for gpu in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if gpu.strip()]
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU ")]


def spawn_per_gpu(gpus: list[str], name: str, argv: list[str]) -> int:
    """Start `genserve worker` once per GPU, each pinned to its GPU; wait for all of them."""
    children = []
    for gpu in gpus:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu, "GENSERVE_DEVICE": "cuda"}
        command = [
            sys.executable,
            "-m",
            "genserve.cli",
            "worker",
            *argv,
            "--gpus",
            "none",
            "--name",
            f"{name}-gpu{gpu}",
        ]
        children.append(subprocess.Popen(command, env=env))

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [child.wait() for child in children]
    return max(codes, default=0)


def worker(
    broker: Annotated[
        str | None, typer.Option(help="Broker URL (redis://...); default GENSERVE_BROKER_URL.")
    ] = None,
    store: Annotated[str | None, typer.Option("--store", help="Job store URL (postgresql://...).")] = None,
    models_dir: Annotated[Path | None, typer.Option(help="Models directory (read-only is fine).")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Shared data directory (images).")] = None,
    gpus: Annotated[
        str, typer.Option(help="none: this process only; all or 0,1,...: one worker per GPU.")
    ] = "none",
    name: Annotated[str | None, typer.Option(help="Worker name (default: genserve-<pid>).")] = None,
    pool: Annotated[str, typer.Option(help="Celery pool; only prefork is accepted.")] = "prefork",
    concurrency: Annotated[
        int, typer.Option(help="Pool size; only 1 is accepted (one process per GPU).")
    ] = 1,
    spot_shutdown_seconds: Annotated[
        float | None, typer.Option(help="Spot pools: requeue the running job this long after SIGTERM.")
    ] = None,
    metrics_port: Annotated[int, typer.Option(help="Serve Prometheus metrics on this port (0: off).")] = 0,
) -> None:
    """Run a GPU worker for multi-node serving: jobs from the store, wake-ups from the broker."""
    from genserve.distributed.worker_app import PoolRefused, check_pool

    try:
        check_pool(pool, concurrency)
    except PoolRefused as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(2) from None
    overrides = {
        "broker_url": broker,
        "store_url": store,
        "models_dir": models_dir,
        "data_dir": data_dir,
        "spot_shutdown_seconds": spot_shutdown_seconds,
    }
    settings = Settings(**{key: value for key, value in overrides.items() if value is not None})
    if not settings.broker_url:
        typer.echo("genserve worker needs a broker: --broker redis://... or GENSERVE_BROKER_URL", err=True)
        raise typer.Exit(2)
    name = name or f"genserve-{os.getpid()}"
    if gpus != "none":
        selected = visible_gpus() if gpus == "all" else [gpu.strip() for gpu in gpus.split(",")]
        if not selected:
            typer.echo("--gpus: no GPU found", err=True)
            raise typer.Exit(2)
        argv = [arg for arg in sys.argv[2:]]
        argv = _without_options(argv, {"--gpus", "--name", "--metrics-port"})
        raise typer.Exit(spawn_per_gpu(selected, name, argv))
    run_one(settings, name, metrics_port)


def _without_options(argv: list[str], names: set[str]) -> list[str]:
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in names:
            skip = True
            continue
        if arg.split("=", 1)[0] in names:
            continue
        kept.append(arg)
    return kept


def run_one(settings: Settings, name: str, metrics_port: int = 0) -> None:
    """One Celery worker: a main process (signals, no torch) and one pool child running the jobs."""
    from genserve.distributed.worker_app import build_worker_app
    from genserve.logs import configure_logging

    configure_logging()
    settings.images_dir.mkdir(parents=True, exist_ok=True)
    if metrics_port:
        os.environ["GENSERVE_WORKER_METRICS_PORT"] = str(metrics_port)
    worker_id = f"{socket.gethostname()}:{name}"
    node = f"{name}@{socket.gethostname()}"
    app = build_worker_app(settings, worker_id, node)
    app.worker_main(
        [
            "worker",
            "--pool=prefork",
            "--concurrency=1",
            "--prefetch-multiplier=1",
            f"--hostname={node}",
            f"--queues={settings.broker_queue}",
            "--without-gossip",
            "--without-mingle",
            "--loglevel=INFO",
        ]
    )

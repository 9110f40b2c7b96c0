"""`genserve worker` without a cluster: pools that lose jobs are refused; --gpus pins one process per GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest

from genserve.distributed import worker_cli
from genserve.distributed.worker_app import PoolRefused, check_pool


@pytest.mark.parametrize("pool,concurrency", [("threads", 1), ("solo", 1), ("gevent", 1), ("prefork", 2)])
def test_pools_that_lose_jobs_are_refused(pool, concurrency):
    with pytest.raises(PoolRefused):
        check_pool(pool, concurrency)
    check_pool("prefork", 1)


def test_the_command_refuses_the_threads_pool():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "genserve.cli",
            "worker",
            "--pool",
            "threads",
            "--broker",
            "redis://127.0.0.1:1/0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "refusing pool=threads" in result.stderr


def test_gpus_spawns_one_pinned_worker_per_gpu(monkeypatch):
    started = []

    class FakeProcess:
        def __init__(self, command, env):
            started.append((command, env["CUDA_VISIBLE_DEVICES"]))

        def wait(self):
            return 0

        def poll(self):
            return 0

    monkeypatch.setattr(worker_cli.subprocess, "Popen", FakeProcess)
    monkeypatch.setattr(worker_cli.signal, "signal", lambda *args: None)
    assert worker_cli.spawn_per_gpu(["0", "1"], "node", ["--broker", "redis://x"]) == 0
    assert [gpu for _, gpu in started] == ["0", "1"]
    for command, gpu in started:
        assert command[-4:] == ["--gpus", "none", "--name", f"node-gpu{gpu}"] and "--broker" in command


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert worker_cli.visible_gpus() == ["2", "3"]
    assert worker_cli._without_options(
        ["--gpus", "all", "--name=x", "--broker", "b"], {"--gpus", "--name"}
    ) == [
        "--broker",
        "b",
    ]

"""Test helpers: run `genserve serve` as a real subprocess on a loopback port, and read SSE."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveServer:
    """A `genserve serve` process, as a user would start it, with settings passed through the environment."""

    models_dir: Path
    data_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)

    def start(self, wait_ready: bool = True, timeout: float = 120) -> LiveServer:
        env = {
            **os.environ,
            "GENSERVE_PORT": str(self.port),
            "GENSERVE_MODELS_DIR": str(self.models_dir),
            "GENSERVE_DATA_DIR": str(self.data_dir),
            "GENSERVE_DEFAULT_MODEL": "tiny-sd15",
            "GENSERVE_BUILTIN_MODELS": "false",
            "GENSERVE_HEARTBEAT_SECONDS": "0.02",
            "GENSERVE_POLL_SECONDS": "0.05",
            "GENSERVE_TORCH_THREADS": "1",
            **self.env,
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "genserve.cli", "serve"],
            env=env,
            start_new_session=True,  # its own process group, so a test can kill server and workers together
        )
        deadline = time.monotonic() + timeout
        path = "/readyz" if wait_ready else "/healthz"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with code {self.process.returncode}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server not ready at {self.url}{path} within {timeout}s")

    def worker_pids(self) -> list[int]:
        workers = httpx.get(self.url + "/healthz", timeout=5).json()["workers"]
        return [w["pid"] for w in workers if w["alive"]]

    def kill_all(self) -> None:
        """SIGKILL the server and its workers at once, as a power cut would."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.kill_all()
        if self.process:
            try:  # make sure no worker outlives the test
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@dataclass
class SseEvent:
    id: int
    type: str
    data: dict


def read_events(
    client: httpx.Client,
    job_id: str,
    last_event_id: int | None = None,
    limit: int | None = None,
    into: list | None = None,
) -> list[SseEvent]:
    """Read a job's SSE stream until it ends (terminal event) or `limit` events were read.

    Events are appended to `into` as they arrive, so another thread can watch them live.
    """
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    events: list[SseEvent] = [] if into is None else into
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=120) as response:
        response.raise_for_status()
        for event in parse_sse(response.iter_lines(), limit):
            events.append(event)
    return events


def parse_sse(lines, limit: int | None = None):
    current: dict = {}
    count = 0
    for line in lines:
        if line.startswith("id:"):
            current["id"] = int(line[3:].strip())
        elif line.startswith("event:"):
            current["type"] = line[6:].strip()
        elif line.startswith("data:"):
            current["data"] = json.loads(line[5:])
        elif line == "" and "type" in current:
            yield SseEvent(**current)
            current = {}
            count += 1
            if limit is not None and count >= limit:
                return


def wait_for(predicate, timeout: float = 60, interval: float = 0.05, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {message}")


def wait_job(
    client: httpx.Client, job_id: str, states=("succeeded", "failed", "canceled"), timeout: float = 120
):
    return wait_for(
        lambda: (job := client.get(f"/v1/jobs/{job_id}").json())["state"] in states and job,
        timeout=timeout,
        message=f"job {job_id} to reach {states}",
    )


def keys_cli(data_dir: Path, *args: str):  # noqa: ANN201 - typer's Result
    """`genserve keys ...`, run in this process (typer's runner) on the server's store."""
    from typer.testing import CliRunner

    from genserve.cli import app

    return CliRunner().invoke(app, ["keys", *args], env={"GENSERVE_DATA_DIR": str(data_dir)})

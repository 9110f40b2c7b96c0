"""Durability: restarts, killed workers, a killed server, and a broken model never lose a job."""

from __future__ import annotations

import os
import shutil
import signal

import httpx
import pytest

from tests.helpers import LiveServer, read_events, wait_for, wait_job

LONG = {"prompt": "long job", "steps": 30, "width": 96, "height": 96}


def first_progress(client, job_id):
    return wait_for(
        lambda: (
            client.get(f"/v1/jobs/{job_id}").json()["state"] == "running"
            and any(e.type == "progress" for e in read_events(client, job_id, limit=3))
        ),
        message="the job to make progress",
    )


def test_restart_runs_queued_jobs(tiny_models_dir, tmp_path):
    api_only = LiveServer(tiny_models_dir, tmp_path, env={"GENSERVE_WORKERS": "0"}).start(wait_ready=False)
    try:
        with api_only.client() as client:
            ids = [
                client.post("/v1/jobs", json={"prompt": f"p{i}", "steps": 2}).json()["id"] for i in range(3)
            ]
            key = client.post("/v1/jobs", json={"prompt": "k", "steps": 2, "request_id": "survives"}).json()[
                "id"
            ]
            assert all(client.get(f"/v1/jobs/{i}").json()["state"] == "queued" for i in ids)
    finally:
        api_only.stop()

    server = LiveServer(tiny_models_dir, tmp_path).start()
    try:
        with server.client() as client:
            for job_id in ids + [key]:
                assert wait_job(client, job_id)["state"] == "succeeded"
            # The idempotency key survived the restart.
            again = client.post("/v1/jobs", json={"prompt": "k", "steps": 2, "request_id": "survives"})
            assert again.status_code == 200 and again.json()["id"] == key
    finally:
        server.stop()


def test_server_killed_mid_job_requeues_it_on_restart(tiny_models_dir, tmp_path):
    server = LiveServer(tiny_models_dir, tmp_path).start()
    with server.client() as client:
        job_id = client.post("/v1/jobs", json=LONG).json()["id"]
        first_progress(client, job_id)
    server.kill_all()  # API and worker die together, the job is left "running"

    restarted = LiveServer(tiny_models_dir, tmp_path).start()
    try:
        with restarted.client() as client:
            job = wait_job(client, job_id, timeout=180)
            assert job["state"] == "succeeded", job
            assert job["attempts"] == 2
            types = [e.type for e in read_events(client, job_id)]
            assert types.count("started") == 2 and "requeued" in types
    finally:
        restarted.stop()


def test_kill_9_worker_mid_job_api_keeps_answering_and_job_succeeds(tiny_models_dir, tmp_path):
    server = LiveServer(tiny_models_dir, tmp_path).start()
    try:
        with server.client() as client:
            job_id = client.post("/v1/jobs", json=LONG).json()["id"]
            first_progress(client, job_id)
            [pid] = server.worker_pids()
            os.kill(pid, signal.SIGKILL)
            # The API answers while the worker is dead and being replaced.
            assert client.get("/healthz").status_code == 200
            assert client.get(f"/v1/jobs/{job_id}").status_code == 200
            job = wait_job(client, job_id, timeout=180)
            assert job["state"] == "succeeded", job
            assert job["attempts"] == 2
            assert wait_for(lambda: server.worker_pids() and server.worker_pids()[0] != pid)
            restarts = client.get("/healthz").json()["workers"][0]["restarts"]
            assert restarts == 1
    finally:
        server.stop()


def test_broken_model_fails_its_job_and_worker_keeps_serving(tiny_models_dir, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(tiny_models_dir / "tiny-sd15", models / "tiny-sd15")
    shutil.copytree(tiny_models_dir / "tiny-sd15", models / "broken")
    for weights in (models / "broken" / "unet").glob("*.safetensors"):
        weights.write_bytes(b"this is not a safetensors file")
    server = LiveServer(models, tmp_path / "data").start()
    try:
        with server.client() as client:
            bad = client.post("/v1/jobs", json={"prompt": "x", "steps": 2, "model": "broken"}).json()
            good = client.post("/v1/jobs", json={"prompt": "x", "steps": 2}).json()
            failed = wait_job(client, bad["id"])
            assert failed["state"] == "failed"
            assert "broken" in failed["error"] and "Traceback" not in failed["error"]
            assert failed["attempts"] == 1  # an engine error is not retried
            assert wait_job(client, good["id"])["state"] == "succeeded"
            assert len(server.worker_pids()) == 1
            assert client.get("/healthz").json()["workers"][0]["restarts"] == 0
    finally:
        server.stop()


def test_postgres_store_serves_jobs(tiny_models_dir, tmp_path, postgres_database_url):
    import sqlalchemy as sa

    engine = sa.create_engine(postgres_database_url)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP SCHEMA public CASCADE; CREATE SCHEMA public;"))
    engine.dispose()
    server = LiveServer(tiny_models_dir, tmp_path, env={"GENSERVE_STORE_URL": postgres_database_url}).start()
    try:
        with server.client() as client:
            job = client.post("/v1/jobs", json={"prompt": "pg", "steps": 3}).json()
            assert wait_job(client, job["id"])["state"] == "succeeded"
            assert [e.type for e in read_events(client, job["id"])][-1] == "succeeded"
    finally:
        server.stop()


@pytest.mark.parametrize("server_flag", [False, True])
def test_cli_generate(tiny_models_dir, tmp_path, server_flag):
    import subprocess
    import sys

    from PIL import Image

    env = {
        **os.environ,
        "GENSERVE_MODELS_DIR": str(tiny_models_dir),
        "GENSERVE_DATA_DIR": str(tmp_path / "data"),
        "GENSERVE_DEFAULT_MODEL": "tiny-sd15",
    }
    command = [
        sys.executable,
        "-m",
        "genserve.cli",
        "generate",
        "a green star",
        "-o",
        str(tmp_path / "out.png"),
    ]
    command += ["--steps", "3", "--seed", "9", "--num-images", "2"]
    server = None
    if server_flag:
        server = LiveServer(tiny_models_dir, tmp_path / "srv").start()
        command += ["--server", server.url]
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    finally:
        if server:
            server.stop()
    assert result.returncode == 0, result.stderr
    for index in range(2):
        image = Image.open(tmp_path / f"out-{index}.png")
        assert f"Seed: {9 + index}" in image.text["parameters"]
    bad = subprocess.run(
        [*command[:5], "-o", str(tmp_path / "x.png"), "--steps", "0"], env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "steps" in bad.stderr


def test_healthz_answers_before_workers_are_ready(tiny_models_dir, tmp_path):
    server = LiveServer(tiny_models_dir, tmp_path, env={"GENSERVE_WORKERS": "0"}).start(wait_ready=False)
    try:
        assert httpx.get(server.url + "/healthz").status_code == 200
        ready = httpx.get(server.url + "/readyz")
        assert ready.status_code == 503 and ready.json()["ready"] is False
    finally:
        server.stop()

"""Access control against a live server with auth on: keys, scoping, rate limits, quotas, limits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import httpx
import openai
import pytest

from tests.helpers import LiveServer, free_port, keys_cli, wait_for, wait_job

FAST = {"steps": 3, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def admin_token(data_dir):
    created = keys_cli(data_dir, "create", "ops", "--role", "admin")
    assert created.exit_code == 0, created.output
    return created.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def server(tiny_models_dir, data_dir, admin_token):
    live = LiveServer(
        models_dir=tiny_models_dir,
        data_dir=data_dir,
        env={"GENSERVE_AUTH": "on", "GENSERVE_CORS_ORIGINS": '["https://app.example"]'},
    ).start(wait_ready=False)  # /readyz needs no key; the worker warms up while the 401 tests run
    yield live
    live.kill_all()  # nothing to keep: a graceful stop would only cost seconds


def client_for(server, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=server.url, timeout=60, headers=headers)


@pytest.fixture(scope="module")
def admin(server, admin_token):
    with client_for(server, admin_token) as client:
        yield client


def new_key(admin, name: str, **limits) -> tuple[str, str]:
    # Every request takes a token; the test helpers poll jobs faster than the default rate allows.
    limits = {"rate_per_second": 1000, **limits}
    response = admin.post("/v1/admin/keys", json={"name": name, **limits})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["token"].startswith("gs_") and body["role"] == "user"
    return body["id"], body["token"]


@pytest.fixture(scope="module")
def alice(server, admin):
    key_id, token = new_key(admin, "alice")
    with client_for(server, token) as client:
        client.key_id = key_id
        yield client


@pytest.fixture(scope="module")
def bob(server, admin):
    _, token = new_key(admin, "bob")
    with client_for(server, token) as client:
        yield client


def test_no_key_bad_key_and_revoked_key_are_401(server, admin, data_dir):
    with client_for(server, None) as anonymous:
        response = anonymous.get("/v1/jobs")
        assert response.status_code == 401 and "API key is required" in response.json()["detail"]
        assert response.headers["www-authenticate"] == "Bearer"
        assert anonymous.get("/healthz").status_code == 200  # probes stay open
    for bad in ("nonsense", "gs_000000000000_" + "x" * 43):
        with client_for(server, bad) as client:
            assert client.get("/v1/models").status_code == 401
    key_id, token = new_key(admin, "short-lived")
    with client_for(server, token) as client:
        assert client.get("/v1/models").status_code == 200
        listed = keys_cli(data_dir, "list")
        assert key_id in listed.stdout and token not in listed.output
        assert keys_cli(data_dir, "revoke", key_id).exit_code == 0
        response = client.get("/v1/models")
        assert response.status_code == 401 and "revoked" in response.json()["detail"]


def test_the_key_cookie_reads_but_cannot_change_anything(server, alice, admin):
    # The web UI's cookie, for the images and event streams the browser fetches itself.
    _, token = new_key(admin, "browser")
    job = alice.post("/v1/jobs", json={"prompt": "not yours", **FAST}).json()
    with client_for(server, None) as browser:
        browser.cookies.set("genserve_key", token)
        assert browser.get("/v1/models").status_code == 200
        response = browser.post("/v1/jobs", json={"prompt": "forged", **FAST})
        assert response.status_code == 401 and "API key is required" in response.json()["detail"]
        assert browser.delete(f"/v1/jobs/{job['id']}").status_code == 401
        browser.cookies.set("genserve_key", "gs_000000000000_" + "x" * 43)
        assert browser.get("/v1/models").status_code == 401


def test_another_keys_job_and_image_are_404(alice, bob):
    job = alice.post("/v1/jobs", json={"prompt": "mine", **FAST}).json()
    done = wait_job(alice, job["id"])
    assert done["state"] == "succeeded"
    image_url = done["images"][0]["url"]
    assert alice.get(image_url).status_code == 200
    assert "private" in alice.get(image_url).headers["cache-control"]
    for method, path in (
        ("GET", f"/v1/jobs/{job['id']}"),
        ("DELETE", f"/v1/jobs/{job['id']}"),
        ("GET", f"/v1/jobs/{job['id']}/events"),
        ("GET", image_url),
        ("GET", f"{image_url}?format=jpeg"),
    ):
        assert bob.request(method, path).status_code == 404, path
    assert job["id"] not in {item["id"] for item in bob.get("/v1/jobs").json()["items"]}
    assert job["id"] in {item["id"] for item in alice.get("/v1/jobs").json()["items"]}


def test_idempotency_keys_and_fair_share_identity_are_per_key(alice, bob, admin):
    body = {"prompt": "same key", **FAST}
    first = alice.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1", "X-Client-Id": "spoof"})
    other = bob.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k1"})
    assert first.status_code == 202 and other.status_code == 202
    assert first.json()["id"] != other.json()["id"]
    assert first.json()["request_id"] == "k1"
    # The scheduler's client identity is the key, whatever X-Client-Id says.
    listed = admin.get("/v1/admin/jobs", params={"client_id": alice.key_id}).json()
    assert first.json()["id"] in {item["id"] for item in listed["items"]}
    assert admin.get("/v1/admin/jobs", params={"client_id": "spoof"}).json()["total"] == 0


def test_rate_limit_is_429_with_retry_after(server, admin):
    _, token = new_key(admin, "hasty", rate_per_second=0.2, rate_burst=2)
    with client_for(server, token) as client:
        assert [client.get("/v1/models").status_code for _ in range(2)] == [200, 200]
        response = client.get("/v1/models")
        assert response.status_code == 429
        assert int(response.headers["retry-after"]) >= 1
        assert "rate limit" in response.json()["detail"]
    with openai.OpenAI(base_url=server.url + "/v1", api_key=token, max_retries=0) as oai:
        with pytest.raises(openai.RateLimitError) as caught:
            oai.images.generate(prompt="x", size="64x64")
        assert caught.value.body["code"] == "rate_limit_exceeded"


def test_quotas_images_and_gpu_seconds(server, admin):
    _, token = new_key(admin, "frugal", images_per_day=2)
    with client_for(server, token) as client:
        assert client.post("/v1/jobs", json={"prompt": "a", **FAST, "num_images": 2}).status_code == 202
        response = client.post("/v1/jobs", json={"prompt": "b", **FAST})
        assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
        assert "daily image quota exhausted: 2 of 2 images" in response.json()["detail"]
    key_id, token = new_key(admin, "gpu-frugal", gpu_seconds_per_day=0.000001)
    with client_for(server, token) as client:
        response = client.post("/v1/jobs", json={"prompt": "c", **FAST})
        assert response.status_code == 429 and "GPU-seconds quota" in response.json()["detail"]
    usage = admin.get(f"/v1/admin/keys/{key_id}/usage").json()
    assert usage == {"key_id": key_id, "images_today": 0, "gpu_seconds_today": 0.0}


def test_per_key_model_and_resolution_limits(server, admin):
    _, token = new_key(admin, "small", allowed_models=["tiny-sd15"], max_width=64, max_height=64)
    with client_for(server, token) as client:
        assert [m["name"] for m in client.get("/v1/models").json()["data"]] == ["tiny-sd15"]
        response = client.post("/v1/jobs", json={"prompt": "x", **FAST, "model": "tiny-sdxl"})
        assert response.status_code == 422
        assert "this API key may use only the models ['tiny-sd15']" in response.json()["detail"][0]["msg"]
        response = client.post("/v1/jobs", json={"prompt": "x", **FAST, "width": 128})
        assert response.status_code == 422
        assert "maximum width 64" in response.json()["detail"][0]["msg"]
        # The hires pass's size counts too: 64x64 doubled is past this key's 64x64.
        response = client.post("/v1/jobs", json={"prompt": "x", **FAST, "hires": {"scale": 2}})
        assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "hires"]
        assert "128x128 exceeds this API key's maximum size 64x64" in response.json()["detail"][0]["msg"]
        assert client.post("/v1/jobs", json={"prompt": "x", **FAST}).status_code == 202


def test_batches_belong_to_their_key_and_obey_its_limits(server, alice, bob, admin):
    spec = {
        "prompts": ["a batch of mine"],
        "variants": {"seed": [1, 2], "steps": [3], "size": ["64x64"]},
    }
    batch = alice.post("/v1/batches", json=spec)
    assert batch.status_code == 202, batch.text
    batch = batch.json()
    for method, path in (
        ("GET", f"/v1/batches/{batch['id']}"),
        ("GET", batch["manifest_url"]),
        ("GET", batch["events_url"]),
        ("DELETE", f"/v1/batches/{batch['id']}"),
    ):
        assert bob.request(method, path).status_code == 404, path
    wait_for(lambda: alice.get(f"/v1/batches/{batch['id']}").json()["done"], message="batch done")
    rows = [json.loads(line) for line in alice.get(batch["manifest_url"]).text.splitlines()]
    assert [row["state"] for row in rows] == ["succeeded", "succeeded"]
    assert all(alice.get(row["file"]).status_code == 200 for row in rows)  # the items are alice's jobs
    assert bob.get(rows[0]["file"]).status_code == 404
    # The same spec from another key renders its own items: de-duplication stays within a key.
    theirs = bob.post("/v1/batches", json=spec).json()
    their_rows = [json.loads(line) for line in bob.get(theirs["manifest_url"]).text.splitlines()]
    assert {row["job_id"] for row in their_rows}.isdisjoint({row["job_id"] for row in rows})

    _, token = new_key(admin, "batch-frugal", images_per_day=3, allowed_models=["tiny-sd15"])
    with client_for(server, token) as client:
        response = client.post(
            "/v1/batches", json={**spec, "variants": {**spec["variants"], "seed": [1, 2, 3, 4]}}
        )
        assert response.status_code == 429 and "this request asks for 4" in response.json()["detail"]
        response = client.post(
            "/v1/batches", json={**spec, "variants": {**spec["variants"], "model": ["tiny-sdxl"]}}
        )
        assert response.status_code == 422
        assert "may use only the models ['tiny-sd15']" in response.json()["detail"][0]["msg"]
        first = client.post("/v1/batches", json=spec)
        assert first.status_code == 202
        # Submitting it again asks for nothing new, so it is not refused although 2 + 2 > 3.
        assert client.post("/v1/batches", json=spec).status_code == 202


def test_admin_endpoints_need_an_admin_key(alice, bob, admin):
    assert alice.get("/v1/admin/keys").status_code == 403
    assert alice.get("/v1/admin/jobs").status_code == 403
    keys = admin.get("/v1/admin/keys").json()
    assert {"ops", "alice", "bob"} <= {key["name"] for key in keys}
    assert all("token" not in key and "secret_hash" not in key for key in keys)
    # Queue control: an admin sees and cancels any key's job.
    job = bob.post("/v1/jobs", json={"prompt": "to cancel", **FAST, "steps": 60, "width": 128}).json()
    assert job["id"] in {item["id"] for item in admin.get("/v1/admin/jobs").json()["items"]}
    assert admin.delete(f"/v1/admin/jobs/{job['id']}").status_code == 200
    assert wait_job(bob, job["id"])["state"] == "canceled"


def test_openai_and_a1111_routes_need_a_key(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="gs_wrong", max_retries=0) as oai:
        with pytest.raises(openai.AuthenticationError) as caught:
            oai.images.generate(prompt="x")
        assert caught.value.body["code"] == "invalid_api_key"
    with client_for(server, None) as anonymous:
        assert anonymous.get("/sdapi/v1/sd-models").status_code == 401


def test_cors_preflight_for_a_configured_origin(server):
    headers = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    allowed = httpx.options(server.url + "/v1/jobs", headers=headers, timeout=30)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    denied = httpx.options(server.url + "/v1/jobs", headers={**headers, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in denied.headers


def serve(tmp_path, *args: str, **env: str) -> subprocess.Popen:
    environment = {**os.environ, "GENSERVE_DATA_DIR": str(tmp_path), "GENSERVE_MODELS_DIR": str(tmp_path)}
    environment.update({"GENSERVE_WORKERS": "0", "GENSERVE_BUILTIN_MODELS": "false", **env})
    command = [sys.executable, "-m", "genserve.cli", "serve", *args]
    return subprocess.Popen(
        command, env=environment, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def test_refuses_to_serve_open_on_a_public_address(tmp_path):
    refused = serve(tmp_path, "--host", "0.0.0.0", "--auth", "off")
    assert refused.wait(timeout=60) == 2
    assert "refusing to serve without API keys on 0.0.0.0" in refused.stderr.read()


@pytest.mark.parametrize(("flags", "status"), [(["--allow-open"], 200), ([], 401)])
def test_public_address_is_open_only_when_told(tmp_path, flags, status):
    port = free_port()
    auth = ["--auth", "off"] if flags else []
    process = serve(tmp_path, "--host", "0.0.0.0", "--port", str(port), *auth, *flags)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _answers(url), timeout=60, message="the server to answer")
        assert httpx.get(url + "/v1/jobs", timeout=10).status_code == status
    finally:
        process.terminate()
        process.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# -- the pieces on their own (no server) -------------------------------------------------------------


def test_token_bucket_refills_at_its_rate():
    from genserve.auth.limits import RateLimited, RateLimiter

    now = [100.0]
    limiter = RateLimiter(clock=lambda: now[0])
    limiter.check("k", rate=2.0, burst=3)
    limiter.check("k", rate=2.0, burst=3)
    limiter.check("k", rate=2.0, burst=3)
    with pytest.raises(RateLimited) as caught:
        limiter.check("k", rate=2.0, burst=3)
    assert caught.value.retry_after == 1
    limiter.check("other", rate=2.0, burst=3)  # buckets are per key
    now[0] += 0.5  # one token back at 2/s
    limiter.check("k", rate=2.0, burst=3)
    with pytest.raises(RateLimited):
        limiter.check("k", rate=2.0, burst=3)
    limiter.check("k", rate=None, burst=3)  # no rate: unlimited


def test_api_replicas_share_rate_limit_buckets_in_redis(redis_url):
    import redis

    from genserve.auth.limits import RateLimited, RedisRateLimiter

    replicas = [RedisRateLimiter(redis_url), RedisRateLimiter(redis_url)]
    key_id = f"test-{uuid.uuid4().hex}"
    for replica in (0, 1, 0):  # a burst of 3, spent across both replicas
        replicas[replica].check(key_id, rate=0.5, burst=3)
    with pytest.raises(RateLimited) as caught:
        replicas[1].check(key_id, rate=0.5, burst=3)
    assert caught.value.retry_after == 2  # one token at 0.5/s
    ttl_ms = redis.Redis.from_url(redis_url).pttl(f"genserve:ratelimit:{key_id}")
    assert 0 < ttl_ms <= 7000  # an idle bucket is full again after burst / rate: then it can go
    replicas[0].check(key_id, rate=100.0, burst=3)  # the key's limits changed: a fresh bucket
    replicas[1].check(key_id, rate=None, burst=3)  # no rate: unlimited


def test_without_redis_the_rate_limit_lets_requests_through(caplog):
    from genserve.auth.limits import RedisRateLimiter

    limiter = RedisRateLimiter("redis://127.0.0.1:1/0")  # nothing listens there
    for _ in range(3):
        limiter.check("k", rate=0.001, burst=1)
    assert "Redis unreachable" in caplog.text


def test_a_broker_makes_the_buckets_shared():
    from fastapi import FastAPI

    from genserve.auth.deps import install_auth
    from genserve.auth.limits import RateLimiter, RedisRateLimiter
    from genserve.config import Settings

    for broker, limiter in ((None, RateLimiter), ("redis://10.0.0.5:6379/0", RedisRateLimiter)):
        app = FastAPI()
        install_auth(app, Settings(broker_url=broker), keys=None)
        assert type(app.state.auth.limiter) is limiter


def test_keys_are_stored_hashed_and_verified_in_constant_time(tmp_path):
    import sqlalchemy as sa

    from genserve.auth.keys import KeyStore, api_keys

    keys = KeyStore.from_url(f"sqlite:///{tmp_path / 'store.db'}")
    key, token = keys.create("ci", "admin")
    assert token.startswith(f"gs_{key.id}_")
    with keys.engine.connect() as conn:
        row = conn.execute(sa.select(api_keys)).one()
    assert token.split("_", 2)[2] not in str(tuple(row)) and len(row.secret_hash) == 64
    assert keys.verify(token).id == key.id and keys.verify(token).role == "admin"
    assert keys.verify(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    other, _ = keys.create("other")
    assert other.role == "user" and keys.verify(f"gs_{other.id}_{token.split('_', 2)[2]}") is None
    keys.revoke(key.id)
    assert keys.verify(token) is None and not keys.get(key.id).active


def test_usage_counts_images_and_gpu_seconds_of_today(tmp_path):
    from datetime import timedelta

    from genserve.auth.keys import KeyStore
    from genserve.store.jobs import JobStore

    url = f"sqlite:///{tmp_path / 'store.db'}"
    store, keys = JobStore.from_url(url), KeyStore.from_url(url)
    params = {"prompt": "x", "num_images": 2}
    store.submit(params, client_id="k1", estimated_seconds=1.5)  # queued: its estimate is reserved
    ran, _ = store.submit(params, client_id="k1", estimated_seconds=9.0)
    canceled, _ = store.submit(params, client_id="k1", estimated_seconds=9.0)
    store.request_cancel(canceled.id)  # canceled before it started: not counted
    store.submit(params, client_id="k2", estimated_seconds=9.0)  # another key
    [claimed] = store.claim_jobs([ran.id], "w", 30)
    store.complete(ran.id, "w", claimed.attempt, [])
    done = store.get(ran.id)
    run_time = (done.finished_at - done.started_at).total_seconds()
    used = keys.usage("k1")
    assert used.images == 4
    assert used.gpu_seconds == pytest.approx(1.5 + run_time)
    assert keys.usage("k1", now=done.created_at + timedelta(days=1)).images == 0  # a new UTC day


def test_a_keys_model_list_covers_the_refiner():
    from genserve.auth.limits import check_key_limits
    from genserve.schemas import GenerationParams, LimitError

    params = GenerationParams(
        prompt="x", model="base", width=64, height=64, refiner={"model": "other-refiner"}
    )
    with pytest.raises(LimitError) as refused:
        check_key_limits(params, ["base"], (None, None))
    assert refused.value.field == "refiner"
    check_key_limits(params, ["base", "other-refiner"], (None, None))

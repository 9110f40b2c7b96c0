"""Hostile input never reaches a 5xx, on SQLite and on PostgreSQL.

Each case is sent to the app in process (no worker is needed to reject input, and a worker-less app
answers in milliseconds) and expects a 4xx whose detail names the field; after each case the server
still serves: the health check answers and a valid job is accepted. The live, fuzzed counterpart is
tests/test_schemathesis.py; the hypothesis cases here send arbitrary text and raw bytes.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genserve.api.app import create_app
from genserve.api.input_guard import MAX_JSON_DEPTH
from genserve.config import Settings
from genserve.schemas import GenerationParams
from genserve.schemas.text import text_problem

VALID = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64}
HOSTILE_TEXT = {
    "nul": "a\u0000b",
    "lone surrogate": "a\ud800b",
    "terminal escape": "\x1b[31mred",
    "C1 control": "a\x85b",
}
# JSON bodies per route, each with its string fields and numeric fields.
ROUTES = {
    "/v1/jobs": (
        VALID,
        ["prompt", "negative_prompt", "model", "request_id", "sampler", "init_image", "mask"],
        [
            "width",
            "height",
            "steps",
            "cfg_scale",
            "seed",
            "num_images",
            "priority",
            "strength",
            "preview_every",
        ],
    ),
    "/v1/generate_stream": (VALID, ["prompt", "negative_prompt"], ["width", "cfg_scale", "seed"]),
    "/v1/estimate": (
        VALID,
        ["prompt", "model", "device"],
        ["width", "steps", "gpu_price_per_hour", "images"],
    ),
    "/v1/images/generations": (
        {"prompt": "a red circle", "size": "64x64", "n": 1, "steps": 2},
        ["prompt", "model", "size", "response_format", "user"],
        ["n", "steps", "seed", "cfg_scale"],
    ),
    "/sdapi/v1/txt2img": (
        {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64},
        ["prompt", "negative_prompt", "sampler_name", "force_task_id"],
        ["steps", "width", "height", "cfg_scale", "seed", "batch_size"],
    ),
    "/v1/batches": (
        {"prompts": ["a red circle"], "variants": {"size": ["64x64"], "steps": [2]}},
        ["name", "negative_prompt"],
        ["retries"],
    ),
}


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def client(request, tmp_path_factory):
    data = tmp_path_factory.mktemp(f"hostile-{request.param}")
    settings_kwargs = {
        "data_dir": data,
        "models_dir": data / "models",
        "workers": 0,
        "limits": {"max_width": 64, "max_height": 64, "max_steps": 4, "max_body_bytes": 16 * 1024 * 1024},
    }
    if request.param == "postgres":
        import sqlalchemy as sa

        url = request.getfixturevalue("postgres_database_url")
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            conn.execute(sa.text("DROP SCHEMA public CASCADE; CREATE SCHEMA public;"))
        engine.dispose()
        settings_kwargs["store_url"] = url
    app = create_app(Settings(**settings_kwargs), supervise_workers=False)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def assert_rejected(response, *field: str | int, status: tuple[int, ...] = (400, 413, 422)) -> None:
    """A 4xx whose detail names `field` (its last location parts), and a server that still serves."""
    assert response.status_code in status, (response.status_code, response.text[:500])
    if field:
        detail = response.json()
        errors = detail.get("detail") if isinstance(detail, dict) else None
        if isinstance(errors, list):  # FastAPI's shape: some error's loc ends with the field
            locs = [error["loc"] for error in errors]
            assert any(list(loc[-len(field) :]) == list(field) for loc in locs), locs
        else:  # OpenAI's error shape names the field as `param`
            assert detail["error"]["param"] == field[-1], detail


def assert_still_serves(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    response = client.post("/v1/jobs", json=VALID)
    assert response.status_code == 202, response.text


def post_raw(client: TestClient, path: str, raw: str | bytes, content_type: str = "application/json"):
    content = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    return client.post(path, content=content, headers={"content-type": content_type})


@pytest.mark.parametrize("path", list(ROUTES))
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_literals_name_the_field(client, path, literal):
    base, _, numeric = ROUTES[path]
    for field in numeric:
        body = json.dumps({**base, field: 0})[:-1].replace(f'"{field}": 0', f'"{field}": {literal}') + "}"
        assert_rejected(post_raw(client, path, body), field)
    assert_still_serves(client)


@pytest.mark.parametrize("path", list(ROUTES))
@pytest.mark.parametrize("kind", list(HOSTILE_TEXT))
def test_control_characters_and_lone_surrogates_in_every_string_field(client, path, kind):
    base, strings, _ = ROUTES[path]
    for field in strings:
        raw = json.dumps({**base, field: HOSTILE_TEXT[kind]}, ensure_ascii=True)  # \u escapes, as JSON sends
        assert_rejected(post_raw(client, path, raw), field)
    # In a field name too, and nested inside a list.
    assert_rejected(post_raw(client, path, json.dumps({**base, HOSTILE_TEXT[kind]: 1})))
    assert_still_serves(client)


def test_the_issue_cases_answer_422_not_500(client):
    assert_rejected(post_raw(client, "/v1/jobs", '{"prompt": "a", "width": NaN}'), "width")
    assert_rejected(client.post("/v1/jobs", json={"prompt": "a", "request_id": "\u0000"}), "request_id")
    assert_rejected(client.post("/v1/jobs", json={"prompt": "a\u0000"}), "prompt")
    assert_rejected(
        client.post("/v1/jobs", json={"prompt": "a", "negative_prompt": "\u0000"}), "negative_prompt"
    )
    assert_still_serves(client)


def test_tabs_newlines_and_unicode_are_ordinary_text(client):
    prompt = "a red circle,\n\ta star ✨ — 丸 \u200d"
    response = client.post("/v1/jobs", json={**VALID, "prompt": prompt})
    assert response.status_code == 202, response.text
    assert client.get(f"/v1/jobs/{response.json()['id']}").json()["params"]["prompt"] == prompt


@pytest.mark.parametrize(
    ("header", "value", "path", "method"),
    [
        ("Idempotency-Key", b"\x00", "/v1/jobs", "POST"),
        ("Idempotency-Key", "\u00ff\u00fe".encode("latin-1"), "/v1/jobs", "POST"),
        ("Idempotency-Key", b"k" * 201, "/v1/jobs", "POST"),
        ("X-Client-Id", b"\x1b[31m", "/v1/jobs", "POST"),
        ("X-Client-Id", b"\x00", "/sdapi/v1/txt2img", "POST"),
        ("X-Client-Id", "\u00e9".encode("latin-1"), "/v1/images/generations", "POST"),
        ("Last-Event-ID", b"99999999999999999999999999", "/v1/jobs/x/events", "GET"),
        ("Last-Event-ID", b"-1", "/v1/jobs/x/events", "GET"),
        ("Last-Event-ID", b"1e9", "/v1/jobs/x/events", "GET"),
        ("Last-Event-ID", b"\x00", "/v1/jobs/x/events", "GET"),
    ],
)
def test_hostile_headers_name_the_header(client, header, value, path, method):
    body = ROUTES.get(path, (VALID,))[0]
    content = json.dumps(body).encode() if method == "POST" else None
    headers = {"content-type": "application/json", header.lower(): value}
    response = client.request(method, path, content=content, headers=headers)
    assert_rejected(response, "header", header.lower())
    assert_still_serves(client)


def test_a_valid_last_event_id_on_a_real_job_still_resumes(client):
    job = client.post("/v1/jobs", json=VALID).json()
    client.delete(f"/v1/jobs/{job['id']}")  # canceled at once: queued, canceled
    with client.stream("GET", f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "1"}) as stream:
        text = "".join(stream.iter_text())
    assert "event: queued" not in text and "event: canceled" in text


@pytest.mark.parametrize(
    "path",
    [
        "/v1/jobs/%00",
        "/v1/jobs/a%00b/events",
        "/v1/images/%00",
        "/v1/batches/%1b",
        "/sdapi/v1/progress?id_task=%00",
        "/v1/jobs?state=%00",
        "/v1/jobs?limit=99999999999999999999999",
        "/v1/jobs?offset=99999999999999999999999",
        "/v1/jobs?offset=-1",
        "/v1/jobs/" + "a" * 5000,
        "/v1/images/%ED%A0%80",
    ],
)
def test_hostile_paths_and_queries_are_4xx(client, path):
    response = client.get(path)
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    assert_still_serves(client)


def test_ten_megabyte_bodies(client):
    # Under the body limit: parsed, and the prompt limit names the field.
    assert_rejected(client.post("/v1/jobs", json={**VALID, "prompt": "x" * 10_000_000}), "prompt")
    assert_rejected(client.post("/v1/jobs", json={**VALID, "junk": "x" * 10_000_000}), "junk")
    assert_rejected(client.post("/sdapi/v1/txt2img", json={"prompt": "x" * 10_000_000, "steps": 2}), "prompt")
    # Over it (16 MiB in this server): 413 before the body is read whole, declared or chunked.
    big = b'{"prompt": "' + b"x" * (17 * 1024 * 1024) + b'"}'
    assert_rejected(post_raw(client, "/v1/jobs", big), "body", status=(413,))

    def chunks():
        for _ in range(17):
            yield b"x" * 1024 * 1024

    response = client.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert_rejected(response, "body", status=(413,))
    assert_still_serves(client)


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 2, 5_000, 100_000])
def test_deeply_nested_json(client, depth):
    for path in ("/v1/jobs", "/v1/batches", "/sdapi/v1/txt2img"):
        raw = '{"prompt": ' + "[" * depth + "]" * depth + "}"
        assert_rejected(post_raw(client, path, raw))
    assert_still_serves(client)


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/xml",
        "",
    ],
)
def test_wrong_content_types(client, content_type):
    for path in ("/v1/jobs", "/v1/estimate", "/v1/batches", "/sdapi/v1/txt2img", "/v1/images/generations"):
        response = post_raw(client, path, json.dumps(VALID), content_type)
        assert 400 <= response.status_code < 500, (path, response.status_code, response.text[:300])
    for raw in (b"\xff\xfe\x00", b"not json", b"", b"null", b"[]", b'"a"', b"1e999999"):
        assert_rejected(post_raw(client, "/v1/jobs", raw))
    assert_still_serves(client)


# These routes wait for the images, and this app has no worker: a body that would be accepted gets an
# over-limit field besides the one under test, so it is refused after the edge value was parsed.
BLOCKING = {"/v1/generate_stream", "/sdapi/v1/txt2img", "/v1/images/generations"}


POISONS = {"/v1/images/generations": ("size", "4096x4096")}


def poison_for(path: str, field: str) -> tuple[str, object] | None:
    if path not in BLOCKING:
        return None
    if path in POISONS and field != POISONS[path][0]:
        return POISONS[path]
    return ("width", 4096) if field == "steps" else ("steps", 10**6)


def poisoned(path: str, body: dict, field: str) -> dict:
    poison = poison_for(path, field)
    return body if poison is None else {**body, poison[0]: poison[1]}


INT_EDGES = [-(2**64), -(2**63), -(2**31), -1, 0, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, 10**30]
FLOAT_EDGES = [-1e308, -0.0, 5e-324, 1e-300, 1e308, 0.1]


@pytest.mark.parametrize("path", list(ROUTES))
def test_every_numeric_field_at_its_types_edges(client, path):
    base, strings, numeric = ROUTES[path]
    for field in numeric:
        for value in [*INT_EDGES, *FLOAT_EDGES, True, "7", None, [], {}]:
            response = client.post(path, json=poisoned(path, {**base, field: value}, field))
            assert response.status_code < 500, (field, value, response.status_code, response.text[:300])
            if 400 <= response.status_code < 500 and response.status_code != 404:
                body = response.text
                poison = poison_for(path, field)
                named = [field, "body", *([poison[0]] if poison else [])]
                assert any(f'"{name}"' in body for name in named), (field, value, body[:300])
    for field in strings:
        for value in ["", " ", "x" * 100_000, 0, 1.5, True, [], {}]:
            response = client.post(path, json=poisoned(path, {**base, field: value}, field))
            assert response.status_code < 500, (field, value, response.status_code, response.text[:300])
    assert_still_serves(client)


def test_schema_rejects_hostile_text_outside_http_too():
    # The CLI and batch specs build GenerationParams directly: the same rule holds there.
    for text in HOSTILE_TEXT.values():
        # pydantic itself refuses a lone surrogate as invalid unicode; SafeText refuses the rest.
        with pytest.raises(ValueError, match="cannot be stored|valid string") as refused:
            GenerationParams(prompt=text)
        assert refused.value.errors()[0]["loc"] == ("prompt",)
    assert text_problem("tab\tnewline\ncr\r ✨") is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
field_names = st.sampled_from(
    [
        "prompt",
        "negative_prompt",
        "width",
        "height",
        "steps",
        "cfg_scale",
        "seed",
        "num_images",
        "sampler",
        "model",
        "request_id",
        "priority",
        "strength",
        "n",
        "size",
        "batch_size",
        "prompts",
        "variants",
    ]
)


@settings(
    max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
@given(
    path=st.sampled_from(list(ROUTES)),
    body=st.dictionaries(field_names, json_values, max_size=6),
)
def fuzz_json_bodies(client, path, body) -> None:
    raw = json.dumps(poisoned(path, {"prompt": "a", **body}, ""), allow_nan=True, ensure_ascii=False)
    response = post_raw(client, path, raw.encode("utf-8", "surrogatepass"))
    assert response.status_code < 500, (path, raw[:300], response.status_code, response.text[:300])


@settings(
    max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
@given(path=st.sampled_from(list(ROUTES)), raw=st.binary(max_size=300))
def fuzz_raw_bytes(client, path, raw) -> None:
    response = post_raw(client, path, raw)
    assert 400 <= response.status_code < 500, (path, raw, response.status_code, response.text[:300])


def test_fuzzed_json_bodies_and_raw_bytes_never_reach_a_5xx(client):
    fuzz_json_bodies(client)
    fuzz_raw_bytes(client)
    assert_still_serves(client)


def test_multipart_form_fields_obey_the_same_rules(client):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, "PNG")
    picture = ("a.png", buffer.getvalue(), "image/png")
    for prompt in HOSTILE_TEXT.values():
        raw = prompt.encode("utf-8", "surrogatepass")  # a lone surrogate travels as invalid UTF-8
        response = client.post("/v1/images/edits", files={"image": picture, "prompt": (None, raw)})
        assert response.status_code == 400 and response.json()["error"]["param"] == "prompt", response.text
    for field, value in (("n", "NaN"), ("n", "9" * 30), ("strength", "nan"), ("steps", "inf")):
        response = client.post(
            "/v1/images/edits", files={"image": picture}, data={"prompt": "a", field: value}
        )
        assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text
    response = client.post("/v1/uploads", files={"file": ("a.png", b"\x89PNG\r\n\x1a\n junk", "image/png")})
    assert_rejected(response, "file")
    assert_still_serves(client)

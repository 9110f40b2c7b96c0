"""Tracing in one process: the HTTP span, the job span, and the worker's spans hanging under it."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from genserve import tracing
from genserve.api.app import create_app
from genserve.config import Settings

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


@pytest.fixture
def spans(tmp_path, tiny_models_dir):
    exporter = InMemorySpanExporter()
    settings = Settings(data_dir=tmp_path, models_dir=tiny_models_dir, default_model="tiny-sd15", workers=0)
    assert tracing.configure_tracing(settings, "genserve-test", exporter=exporter)
    app = create_app(settings, supervise_workers=False)
    with TestClient(app) as client:
        yield client, app.state.services.store, exporter
    tracing.shutdown()


def by_name(exporter, name):
    return [span for span in exporter.get_finished_spans() if span.name == name]


def test_request_and_job_spans_share_the_callers_trace(spans, caplog):
    client, _, exporter = spans
    with caplog.at_level(logging.INFO, logger="genserve.http"):
        response = client.post(
            "/v1/jobs",
            json={"prompt": "secret prompt", "steps": 2},
            headers={"traceparent": f"00-{TRACE}-{PARENT}-01"},
        )
    assert response.status_code == 202 and response.headers["x-trace-id"] == TRACE
    [http] = by_name(exporter, "POST /v1/jobs")
    [job] = by_name(exporter, "genserve.job")
    assert format(http.context.trace_id, "032x") == TRACE and format(http.parent.span_id, "016x") == PARENT
    assert job.parent.span_id == http.context.span_id
    assert job.context.span_id == tracing.job_span_id(response.json()["id"])
    assert http.attributes["http.response.status_code"] == 202
    [record] = [r for r in caplog.records if r.getMessage() == "request"]
    assert record.trace_id == TRACE and record.status == 202
    assert "secret prompt" not in caplog.text and not hasattr(record, "key_id")


def test_a_request_without_traceparent_gets_one_trace_end_to_end(spans):
    client, _, exporter = spans
    response = client.post("/v1/jobs", json={"prompt": "x", "steps": 2})
    trace_id = response.headers["x-trace-id"]
    [http] = by_name(exporter, "POST /v1/jobs")
    [job] = by_name(exporter, "genserve.job")
    assert format(http.context.trace_id, "032x") == trace_id == format(job.context.trace_id, "032x")
    assert http.parent is None  # a root span
    assert client.get("/healthz").headers["x-trace-id"]  # every response says its trace


def test_worker_spans_hang_under_the_job_span(spans):
    client, store, exporter = spans
    job_id = client.post("/v1/jobs", json={"prompt": "x", "steps": 2}).json()["id"]
    [claimed] = store.claim_jobs([job_id], "worker-1", 30)
    tracing.record_queue_wait([claimed])
    with tracing.batch_spans([claimed]):
        with tracing.steps_span([claimed.id]):
            tracing.step_event(1, 2, 1)
            tracing.step_event(2, 2, 1)
        with tracing.job_span(claimed.id, "genserve.encode"):
            pass
        with tracing.job_span(claimed.id, "genserve.store"):
            pass
    job_span_id = tracing.job_span_id(job_id)
    [wait] = by_name(exporter, "genserve.queue_wait")
    [batch] = by_name(exporter, "genserve.batch")
    [steps] = by_name(exporter, "genserve.steps")
    assert wait.parent.span_id == job_span_id and batch.parent.span_id == job_span_id
    assert steps.parent.span_id == batch.context.span_id and [e.name for e in steps.events] == [
        "step",
        "step",
    ]
    for name in ("genserve.encode", "genserve.store"):
        assert by_name(exporter, name)[0].parent.span_id == batch.context.span_id
    traces = {span.context.trace_id for span in exporter.get_finished_spans()}
    assert traces == {int(claimed.trace_id, 16)}


def test_tracing_is_off_without_an_endpoint(tmp_path):
    assert not tracing.configure_tracing(Settings(data_dir=tmp_path), "genserve-test")
    with tracing.batch_spans([]), tracing.job_span("job", "genserve.encode"):
        tracing.step_event(1, 1, 1)  # no-ops

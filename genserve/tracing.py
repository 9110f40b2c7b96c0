"""OpenTelemetry tracing: one trace per request, from HTTP through the queue to the stored images.

Off by default: with no `otlp_endpoint` the OpenTelemetry API is a no-op and spans cost nothing.
With one, spans go over OTLP/HTTP. The trace id is decided at the edge (the client's `traceparent`,
or a new id), returned as `X-Trace-Id`, stored on the job and carried into the worker's logs.

The API and the worker are different processes that share only the job row, so the worker finds
its parent span from the job alone: the API's `genserve.job` span gets a span id derived from the
job id (`job_span_id`), and the worker's spans name that span as their parent.

    HTTP POST /v1/jobs
      genserve.job                      (API, at submit)
        genserve.queue_wait             (worker: created_at -> started_at)
        genserve.batch                  (worker: the batch that ran the job)
          genserve.steps                (denoising, one event per step)
          genserve.encode, genserve.store
Span attributes never carry prompts or API keys.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from datetime import datetime
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from genserve.config import Settings

log = logging.getLogger("genserve.http")

_provider: Any = None  # the SDK TracerProvider once configured; None: spans are no-ops
# Ids the next span must take (the SDK's id generator reads them): see `_forced_ids`.
_forced: ContextVar[tuple[int | None, int | None]] = ContextVar("genserve_forced_ids", default=(None, None))
# Spans of the batch running in this worker process, by job id: parents of its step/encode/store spans.
_batch: dict[str, trace.Span] = {}
_steps: dict[str, trace.Span] = {}
_QUIET_PATHS = ("/healthz", "/readyz", "/metrics", "/static/")


def configure_tracing(settings: Settings, service_name: str, exporter: SpanExporter | None = None) -> bool:
    """Record spans when an OTLP endpoint is configured (or a test passes an exporter)."""
    global _provider
    if exporter is None and not settings.otlp_endpoint:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name}), id_generator=_JobIdGenerator()
    )
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = settings.otlp_endpoint.rstrip("/")
        if not endpoint.endswith("/v1/traces"):
            endpoint += "/v1/traces"
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    _provider = provider
    return True


def shutdown() -> None:
    """Flush and stop the exporter (process exit)."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None


def tracer() -> trace.Tracer:
    return _provider.get_tracer("genserve") if _provider is not None else trace.get_tracer("genserve")


class _JobIdGenerator(RandomIdGenerator):
    """Random ids, except where `_forced_ids` says which id the next span takes."""

    def generate_trace_id(self) -> int:
        return _forced.get()[0] or super().generate_trace_id()

    def generate_span_id(self) -> int:
        return _forced.get()[1] or super().generate_span_id()


@contextmanager
def _forced_ids(trace_id: int | None = None, span_id: int | None = None) -> Iterator[None]:
    token = _forced.set((trace_id, span_id))
    try:
        yield
    finally:
        _forced.reset(token)


# -- ids ----------------------------------------------------------------------------------------------


def parse_traceparent(header: str | None) -> tuple[str, str, bool] | None:
    """(trace id, parent span id, sampled) of a valid W3C `traceparent`, else None."""
    parts = (header or "").strip().split("-")
    hexdigits = set("0123456789abcdef")
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2:
        return None
    if (
        not set(parts[1] + parts[2] + parts[3]) <= hexdigits
        or set(parts[1]) == {"0"}
        or set(parts[2]) == {"0"}
    ):
        return None
    return parts[1], parts[2], bool(int(parts[3], 16) & 1)


def job_span_id(job_id: str) -> int:
    """The span id of a job's `genserve.job` span, derived from the job id (never 0)."""
    return int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:8], "big") or 1


def _job_context(job_id: str, trace_id: str | None) -> Any:
    """A context whose parent is the job's `genserve.job` span, in the job's trace."""
    if job_id in _batch:
        return trace.set_span_in_context(_batch[job_id])
    if not trace_id:
        return None
    parent = SpanContext(
        trace_id=int(trace_id, 16),
        span_id=job_span_id(job_id),
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    return trace.set_span_in_context(NonRecordingSpan(parent))


def _ns(moment: datetime) -> int:
    return int(moment.timestamp() * 1e9)


# -- the API side ---------------------------------------------------------------------------------------


def job_submitted(job_id: str, trace_id: str | None) -> None:
    """The job's own span, under the current HTTP span; the worker's spans hang under it."""
    current = trace.get_current_span().get_span_context()
    context = None
    if not current.is_valid and trace_id:  # no HTTP span (tracing off, or called outside a request)
        context = trace.set_span_in_context(
            NonRecordingSpan(
                SpanContext(
                    int(trace_id, 16),
                    secrets.randbits(64) or 1,
                    is_remote=True,
                    trace_flags=TraceFlags(TraceFlags.SAMPLED),
                )
            )
        )
    with _forced_ids(span_id=job_span_id(job_id)):
        span = tracer().start_span("genserve.job", context=context, attributes={"genserve.job_id": job_id})
    span.end()


class TracingMiddleware:
    """Gives every request a trace: a server span, a `traceparent` for the routes, `X-Trace-Id` back.

    A request without `traceparent` gets a new trace id, and the middleware adds the header before
    the routes run, so the id the routes store on a job is the id of this span's trace.
    Mutating requests and errors are logged with the trace id (never the prompt or the key).
    """

    def __init__(self, app: ASGIApp, log_keys: bool = False) -> None:
        self.app = app
        self.log_keys = log_keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        incoming = parse_traceparent(headers.get(b"traceparent", b"").decode("latin-1"))
        method, path = scope["method"], scope["path"]
        attributes = {"http.request.method": method, "url.path": path}
        if incoming is not None:
            trace_id, parent_id, sampled = incoming
            flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
            remote = SpanContext(int(trace_id, 16), int(parent_id, 16), is_remote=True, trace_flags=flags)
            context, forced = trace.set_span_in_context(NonRecordingSpan(remote)), None
        else:
            trace_id, context = secrets.token_hex(16), None
            forced = int(trace_id, 16)
        with _forced_ids(trace_id=forced):
            span = tracer().start_span(
                f"{method} {path}", context=context, kind=SpanKind.SERVER, attributes=attributes
            )
        span_id = span.get_span_context().span_id or secrets.randbits(64) or 1
        if incoming is None:
            scope["headers"] = [
                *scope["headers"],
                (b"traceparent", f"00-{trace_id}-{span_id:016x}-01".encode()),
            ]
        status = {"code": 500}
        started = time.perf_counter()

        async def send_with_trace_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                names = {name.lower() for name, _ in message.get("headers", [])}
                if b"x-trace-id" not in names:
                    message = {
                        **message,
                        "headers": [*message.get("headers", []), (b"x-trace-id", trace_id.encode())],
                    }
            await send(message)

        with trace.use_span(span, end_on_exit=True):
            try:
                await self.app(scope, receive, send_with_trace_id)
            finally:
                span.set_attribute("http.response.status_code", status["code"])
                if status["code"] >= 500:
                    span.set_status(trace.StatusCode.ERROR)
                self._log(scope, method, path, status["code"], trace_id, time.perf_counter() - started)

    def _log(self, scope: Scope, method: str, path: str, status: int, trace_id: str, seconds: float) -> None:
        if path.startswith(_QUIET_PATHS) or (method in ("GET", "HEAD") and status < 400):
            return
        extra = {
            "method": method,
            "path": path,
            "status": status,
            "trace_id": trace_id,
            "ms": round(seconds * 1e3, 1),
        }
        principal = scope.get("state", {}).get("principal")
        if self.log_keys and principal is not None and principal.key_id:
            extra["key_id"] = principal.key_id
        log.info("request", extra=extra)


# -- the worker side -------------------------------------------------------------------------------------


def record_queue_wait(jobs: Iterable[Any]) -> None:
    """A `genserve.queue_wait` span per claimed job: from submit to claim."""
    for job in jobs:
        context = _job_context(job.id, job.trace_id)
        if context is None or job.started_at is None:
            continue
        span = tracer().start_span(
            "genserve.queue_wait", context=context, start_time=_ns(job.created_at),
            attributes={"genserve.job_id": job.id, "genserve.queue": job.queue},
        )  # fmt: skip
        span.end(end_time=_ns(job.started_at))


@contextmanager
def batch_spans(jobs: list[Any]) -> Iterator[None]:
    """A `genserve.batch` span in each job's trace while the batch runs (jobs of one batch may come
    from different requests, so each trace gets its own copy, with the batch's size).

    The spans are parents by reference (`_batch`), never the thread's current span: a batch opens
    them on the worker thread and its finisher thread closes them.
    """
    spans = {}
    for job in jobs:
        context = _job_context(job.id, job.trace_id)
        if context is None:
            continue
        attributes = {
            "genserve.job_id": job.id,
            "genserve.batch_jobs": len(jobs),
            "genserve.attempt": job.attempt,
        }
        spans[job.id] = _batch[job.id] = tracer().start_span(
            "genserve.batch", context=context, attributes=attributes
        )
    try:
        yield
    except BaseException as error:
        for span in spans.values():
            span.record_exception(error)
            span.set_status(trace.StatusCode.ERROR)
        raise
    finally:
        for job_id, span in spans.items():
            _batch.pop(job_id, None)
            span.end()


@contextmanager
def job_span(job_id: str, name: str, **attributes: Any) -> Iterator[None]:
    """A child of the job's batch span (or of its job span), e.g. genserve.encode, genserve.store."""
    context = _job_context(job_id, None)
    if context is None:
        yield
        return
    span = tracer().start_span(name, context=context, attributes={"genserve.job_id": job_id, **attributes})
    with trace.use_span(span, end_on_exit=True):
        yield


@contextmanager
def steps_span(job_ids: list[str]) -> Iterator[None]:
    """`genserve.steps` around the denoising loop of a batch; `step_event` marks each step."""
    with ExitStack() as stack:
        for job_id in job_ids:
            stack.enter_context(job_span(job_id, "genserve.steps"))
            _steps[job_id] = trace.get_current_span()
            stack.callback(_steps.pop, job_id, None)
        yield


def step_event(step: int, total: int, rows: int) -> None:
    for span in _steps.values():
        span.add_event("step", {"step": step, "steps": total, "rows": rows})

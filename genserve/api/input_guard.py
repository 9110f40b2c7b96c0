"""Hostile input stops at the door, before any route runs.

One ASGI layer in front of every route checks what no schema can see, or what every schema would
have to repeat:
- the body's size (413 over `max_body_bytes`, before it is read whole);
- JSON bodies: NaN/Infinity literals, integers beyond 64 bits, nesting deeper than `MAX_JSON_DEPTH`,
  and text that `text_problem` rejects (NUL, control characters, lone surrogates), in keys and values;
- the same text rules for the path, query parameters and the identifier headers, and the
  `Last-Event-ID` header's number.

Each problem answers 422 (413 for size) in FastAPI's own error shape, naming the field by its
location, so clients parse one format. The routes and their pydantic schemas then validate the rest.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qsl

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from genserve.schemas.text import text_problem

MAX_JSON_DEPTH = 32
MAX_JSON_INT = 2**63 - 1  # what a database integer column holds; no field needs more
# Identifier headers: printable ASCII only, like the request ids and client ids they become.
ID_HEADERS = ("idempotency-key", "x-client-id", "x-request-id")
MAX_ID_HEADER_CHARS = 200
BODY_METHODS = {"POST", "PUT", "PATCH"}
# Larger JSON bodies are checked off the event loop, so SSE streams and other requests go on meanwhile.
THREAD_ABOVE_BYTES = 256 * 1024


class InputProblem(Exception):
    def __init__(self, loc: list[str | int], message: str, status: int = 422) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message
        self.status = status


class _NonFinite:
    """What a NaN/Infinity literal parses to, so the walk can name the field that held it."""

    def __init__(self, literal: str) -> None:
        self.literal = literal


def _parse_float(text: str) -> float | _NonFinite:
    value = float(text)
    return value if math.isfinite(value) else _NonFinite(text)  # 1e999 overflows to inf


def check_json(body: bytes) -> None:
    """Raise InputProblem for the first hostile thing in a JSON body; malformed JSON is left to FastAPI."""
    try:
        document = json.loads(body, parse_constant=_NonFinite, parse_float=_parse_float)
    except RecursionError:
        raise InputProblem(["body"], f"JSON is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError:  # not JSON, or not UTF-8: FastAPI answers its own 422 (json_invalid)
        return
    for loc, problem in _problems(document, ["body"]):
        raise InputProblem(loc, problem)


def _problems(value: Any, loc: list[str | int]) -> Iterator[tuple[list[str | int], str]]:
    if len(loc) > MAX_JSON_DEPTH + 1:
        yield loc, f"JSON is nested deeper than {MAX_JSON_DEPTH} levels"
        return
    if isinstance(value, _NonFinite):
        yield loc, f"{value.literal[:40]} is not a finite number"
    elif isinstance(value, bool):
        return
    elif isinstance(value, int) and abs(value) > MAX_JSON_INT:
        yield loc, f"integer out of range: the limit is ±{MAX_JSON_INT}"
    elif isinstance(value, str):
        problem = text_problem(value)
        if problem:
            yield loc, problem
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _problems(item, [*loc, index])
    elif isinstance(value, dict):
        for key, item in value.items():
            problem = text_problem(key)
            if problem:
                yield [*loc, key], "field name " + problem
            yield from _problems(item, [*loc, key])


def check_request_line(scope: Scope) -> None:
    """The path, the query parameters and the headers that become stored identifiers."""
    problem = text_problem(scope.get("path", ""))
    if problem:
        raise InputProblem(["path"], problem)
    query = scope.get("query_string", b"").decode("latin-1")
    for name, value in parse_qsl(query, keep_blank_values=True):
        problem = text_problem(name) or text_problem(value)
        if problem:
            raise InputProblem(["query", name], problem)
    headers = {key.decode("latin-1").lower(): value for key, value in scope.get("headers", [])}
    for name in ID_HEADERS:
        raw = headers.get(name)
        if raw is None:
            continue
        if len(raw) > MAX_ID_HEADER_CHARS:
            raise InputProblem(["header", name], f"at most {MAX_ID_HEADER_CHARS} characters")
        if not all(0x20 <= byte < 0x7F for byte in raw):
            raise InputProblem(["header", name], "printable ASCII characters only")
    last_event_id = headers.get("last-event-id")
    if last_event_id is not None and last_event_id.strip():
        value = last_event_id.strip()
        if not value.isdigit() or len(value) > 18:
            raise InputProblem(
                ["header", "last-event-id"], "an event id: a non-negative integer (up to 18 digits)"
            )


def fastapi_shape(path: str, problem: InputProblem) -> tuple[int, dict]:
    """FastAPI's validation-error shape, which every route but the OpenAI ones answers in."""
    kind = "body_too_large" if problem.status == 413 else "hostile_input"
    return problem.status, {"detail": [{"loc": problem.loc, "msg": problem.message, "type": kind}]}


ErrorShape = Callable[[str, InputProblem], tuple[int, dict]]


class InputGuard:
    """ASGI middleware applying the checks above; streams (SSE) and bodiless requests pass untouched.

    `shape` turns a problem into (status, JSON body) for the route it was sent to.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, shape: ErrorShape = fastapi_shape) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.shape = shape

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            check_request_line(scope)
            if scope["method"] not in BODY_METHODS:
                await self.app(scope, receive, send)
                return
            body = await self._read_body(scope, receive)
            if _is_json(scope) and len(body) > THREAD_ABOVE_BYTES:
                await run_in_threadpool(check_json, body)  # a picture in base64 takes ~0.1 s per 7 MB
            elif _is_json(scope):
                check_json(body)
        except InputProblem as problem:
            status, payload = self.shape(scope.get("path", ""), problem)
            await _reject(send, status, payload)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise InputProblem(["body"], self._too_large(), status=413)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:  # chunked uploads have no Content-Length to check first
                raise InputProblem(["body"], self._too_large(), status=413)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def _too_large(self) -> str:
        return f"request body is larger than the limit of {self.max_body_bytes} bytes (max_body_bytes)"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _is_json(scope: Scope) -> bool:
    content_type = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
    return content_type == "application/json" or content_type.endswith("+json")


def _replay(body: bytes, receive: Receive) -> Receive:
    """Hand the buffered body to the app once, then pass through (a disconnect, for streams)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _reject(send: Send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})

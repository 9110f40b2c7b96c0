"""The FastAPI application: wires the store, image store, model catalog and worker supervisor."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from genserve import __version__
from genserve.api.deps import ModelCatalog, Services
from genserve.api.input_guard import InputGuard, InputProblem, fastapi_shape
from genserve.api.routes import (
    a1111,
    a1111_controlnet,
    a1111_extras,
    admin,
    batches,
    comfy,
    comfy_ws,
    controls,
    estimate,
    experiments,
    health,
    images,
    jobs,
    models,
    openai,
    openai_videos,
    uploads,
    upscale,
    videos,
    web,
)
from genserve.artifacts.s3 import make_image_store
from genserve.auth.deps import get_principal, install_auth
from genserve.auth.keys import KeyStore
from genserve.config import Settings
from genserve.distributed.api import attach_distributed
from genserve.schemas import LimitError
from genserve.store.jobs import IdempotencyConflict, JobStore
from genserve.tracing import TracingMiddleware
from genserve.worker.supervisor import Supervisor


def create_app(settings: Settings, *, supervise_workers: bool = True) -> FastAPI:
    store = JobStore.from_url(settings.resolved_store_url)
    services = Services(
        settings=settings,
        store=store,
        images=make_image_store(settings),  # a directory, or S3 (docs/scaling.md)
        catalog=ModelCatalog(settings),
    )
    # Multi-node mode (a broker): `genserve worker` processes run the jobs; this replica runs the reaper.
    reaper = attach_distributed(settings, store)
    if supervise_workers and settings.workers > 0 and reaper is None:
        services.supervisor = Supervisor(settings, store, settings.workers)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if services.supervisor:
            services.supervisor.start()
        if reaper:
            reaper.start()
        await comfy.start(app)  # resumes workflows a stopped server left unfinished
        yield
        await comfy.stop(app)
        if reaper:
            reaper.stop()
        if services.supervisor:
            services.supervisor.stop()

    app = FastAPI(
        title="genserve",
        version=__version__,
        description="Image generation for Stable Diffusion-family models: durable jobs, SSE progress.",
        lifespan=lifespan,
    )
    app.state.services = services
    # Inside auth (a request without a key is refused before its body is read), outside every route.
    app.add_middleware(InputGuard, max_body_bytes=settings.limits.max_body_bytes, shape=_guard_error_shape)
    install_auth(app, settings, KeyStore(store.engine))  # keys, rate limits, CORS
    app.add_middleware(TracingMiddleware, log_keys=settings.log_keys)
    for module in (health, web, comfy_ws):  # the websocket checks the key itself
        app.include_router(module.router)
    # Everything else needs an API key when auth is on; the key is the caller's identity.
    modules = (
        jobs,
        videos,
        batches,
        experiments,
        models,
        controls,
        images,
        uploads,
        estimate,
        openai,
        openai_videos,
        a1111,
        a1111_controlnet,
        admin,
        comfy,
    )
    for module in modules:
        app.include_router(module.router, dependencies=[Depends(get_principal)])
    # ComfyUI serves its API under /api as well (its own front end uses that prefix).
    app.include_router(
        comfy.router, prefix="/api", include_in_schema=False, dependencies=[Depends(get_principal)]
    )
    app.include_router(comfy_ws.router, prefix="/api")
    for module in (upscale, a1111_extras):  # upscaling and face restoration (engine/upscale/)
        app.include_router(module.router, dependencies=[Depends(get_principal)])

    @app.exception_handler(LimitError)
    async def limit_error(request: Request, error: LimitError) -> JSONResponse:
        # Same shape as FastAPI's own validation errors, so clients parse one format.
        detail = [{"loc": ["body", error.field], "msg": error.message, "type": "limit_exceeded"}]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": safe_errors(error.errors())}, status_code=422)

    @app.exception_handler(ValidationError)
    async def inner_validation_error(request: Request, error: ValidationError) -> JSONResponse:
        # A schema built inside a route (form fields, compatibility mappings): still the caller's input.
        errors = [{**item, "loc": ["body", *item["loc"]]} for item in error.errors()]
        return JSONResponse({"detail": safe_errors(errors)}, status_code=422)

    @app.exception_handler(IdempotencyConflict)
    async def idempotency_conflict(request: Request, error: IdempotencyConflict) -> JSONResponse:
        message = "this request_id was already used with different parameters"
        return JSONResponse({"detail": message, "job_id": error.job_id}, status_code=409)

    openai.install_error_shape(app)  # OpenAI's error shape on /v1/images/generations only
    return app


def safe_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Validation errors without what cannot or should not be echoed back: a non-finite number
    (JSON cannot hold it), a 10 MB prompt (only its first characters), exception objects in `ctx`."""
    cleaned = []
    for item in errors:
        item = dict(item)
        value = item.get("input")
        if isinstance(value, float) and not math.isfinite(value):
            item["input"] = str(value)
        elif isinstance(value, str) and len(value) > 100:
            item["input"] = value[:100] + "…"
        elif isinstance(value, (dict, list)) or isinstance(value, bytes):
            item.pop("input")
        if "ctx" in item:
            item["ctx"] = {key: str(val) for key, val in item["ctx"].items()}
        cleaned.append(item)
    return cleaned


def _guard_error_shape(path: str, problem: InputProblem) -> tuple[int, dict]:
    """The input guard's rejections in the shape of the route they were sent to."""
    if path in openai.OPENAI_PATHS:
        names = [
            str(part)
            for part in problem.loc
            if part not in ("body", "header", "query") and not isinstance(part, int)
        ]
        error = {
            "message": problem.message,
            "type": "invalid_request_error",
            "param": names[-1] if names else None,
            "code": "invalid_value",
        }
        return (413 if problem.status == 413 else 400), {"error": error}
    return fastapi_shape(path, problem)

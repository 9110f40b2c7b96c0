"""The FastAPI application: wires the store, image store, model catalog and worker supervisor."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from genserve import __version__
from genserve.api.deps import ModelCatalog, Services
from genserve.api.routes import estimate, health, images, jobs, models, web
from genserve.artifacts.images import ImageStore
from genserve.config import Settings
from genserve.schemas import LimitError
from genserve.store.jobs import IdempotencyConflict, JobStore
from genserve.worker.supervisor import Supervisor


def create_app(settings: Settings, *, supervise_workers: bool = True) -> FastAPI:
    store = JobStore.from_url(settings.resolved_store_url)
    services = Services(
        settings=settings,
        store=store,
        images=ImageStore(settings.images_dir),
        catalog=ModelCatalog(settings.models_dir),
    )
    if supervise_workers and settings.workers > 0:
        services.supervisor = Supervisor(settings, store, settings.workers)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if services.supervisor:
            services.supervisor.start()
        yield
        if services.supervisor:
            services.supervisor.stop()

    app = FastAPI(
        title="genserve",
        version=__version__,
        description="Image generation for Stable Diffusion-family models: durable jobs, SSE progress.",
        lifespan=lifespan,
    )
    app.state.services = services
    for module in (jobs, models, images, health, estimate, web):
        app.include_router(module.router)

    @app.exception_handler(LimitError)
    async def limit_error(request: Request, error: LimitError) -> JSONResponse:
        # Same shape as FastAPI's own validation errors, so clients parse one format.
        detail = [{"loc": ["body", error.field], "msg": error.message, "type": "limit_exceeded"}]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(IdempotencyConflict)
    async def idempotency_conflict(request: Request, error: IdempotencyConflict) -> JSONResponse:
        message = "this request_id was already used with different parameters"
        return JSONResponse({"detail": message, "job_id": error.job_id}, status_code=409)

    return app

"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from genserve.api.deps import ServicesDep
from genserve.metrics import render_metrics

router = APIRouter(tags=["health"])

READY_WORKER_MAX_AGE_SECONDS = 10.0


@router.get("/healthz", operation_id="healthz")
def healthz(services: ServicesDep) -> dict:
    """The API process answers. Also shows the supervised worker processes."""
    workers = services.supervisor.status() if services.supervisor else []
    return {"status": "ok", "workers": workers}


@router.get("/readyz", operation_id="readyz")
def readyz(services: ServicesDep) -> JSONResponse:
    """Ready once a live worker has the default model loaded and warmed up."""
    default = services.settings.default_model
    workers = services.store.live_workers(max_age_seconds=READY_WORKER_MAX_AGE_SECONDS)
    ready = [w.id for w in workers if w.state == "ready" and default in w.models_loaded]
    body = {"ready": bool(ready), "default_model": default, "ready_workers": ready}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", operation_id="metrics", response_class=Response)
def metrics(services: ServicesDep) -> Response:
    return Response(render_metrics(services.store), media_type="text/plain; version=0.0.4; charset=utf-8")

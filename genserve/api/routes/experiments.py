"""A/B experiments on the server: submit variants × seeds, follow their progress, read the report."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field

from genserve.api.deps import ServicesDep
from genserve.auth.deps import Principal, PrincipalDep, admit_batch
from genserve.batch.spec import SpecError
from genserve.experiments import service
from genserve.experiments.spec import ExperimentSpec, experiment_from_data, parse_spec_text
from genserve.store.experiments import ExperimentRecord, ExperimentStore

router = APIRouter(tags=["experiments"])
# The report fetches nothing and runs nothing: its pictures are data URLs and its style is inline.
REPORT_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

ClientId = Annotated[str | None, Header(alias="X-Client-Id", max_length=200)]


class ExperimentPublic(BaseModel):
    id: str
    name: str
    created_at: datetime
    variants: list[str]
    seeds: list[int]
    counts: dict[str, int]
    done: bool
    report_url: str
    results_url: str


def _owned(services: ServicesDep, principal: Principal, experiment_id: str) -> ExperimentRecord:
    """The experiment, when this caller may see it: with auth on, only the key that submitted it does."""
    record = ExperimentStore(services.store.engine).get(experiment_id)
    if record is None or (principal.authenticated and record.client_id != principal.key_id):
        raise HTTPException(404, f"experiment {experiment_id} not found")
    return record


def _public(services: ServicesDep, record: ExperimentRecord) -> ExperimentPublic:
    spec = ExperimentSpec.model_validate(record.spec)
    counts = service.progress(services.store, record.id)
    return ExperimentPublic(
        id=record.id,
        name=record.name,
        created_at=record.created_at,
        variants=[variant.name for variant in spec.variants],
        seeds=spec.seed_list,
        counts=counts,
        done=service.is_done(counts),
        report_url=f"/v1/experiments/{record.id}/report",
        results_url=f"/v1/experiments/{record.id}/results",
    )


def _spec_errors(errors: list[str]) -> JSONResponse:
    detail = [{"loc": ["body", line.split(":", 1)[0]], "msg": line, "type": "spec_error"} for line in errors]
    return JSONResponse({"detail": detail}, status_code=422)


@router.post(
    "/v1/experiments", status_code=202, response_model=ExperimentPublic, operation_id="create_experiment"
)
def create_experiment(
    spec: ExperimentSpec, services: ServicesDep, principal: PrincipalDep, client_id: ClientId = None
) -> ExperimentPublic | JSONResponse:
    """Render every variant × seed on the long queue (as batch items: images already made are not
    made again) and measure them; the report is at `report_url`."""
    models = services.catalog.models()
    try:
        prepared = service.prepare(
            spec, Path.cwd(), models, services.settings, services.inputs, local_files=False
        )
    except SpecError as error:
        return _spec_errors(error.errors)
    admit_batch(principal, prepared.plan.items, services)  # the key's model, size and quota limits
    client = principal.client_id(client_id)
    experiment_id = service.submit(prepared, services.store, models, client, principal.key_id)
    return _public(services, _owned(services, principal, experiment_id))


class ExperimentText(BaseModel):
    spec: str = Field(
        max_length=1_000_000, description="The spec as YAML or JSON text (as `genserve ab` reads)."
    )


@router.post(
    "/v1/experiments/text",
    status_code=202,
    response_model=ExperimentPublic,
    operation_id="create_experiment_from_text",
)
def create_experiment_from_text(
    body: ExperimentText, services: ServicesDep, principal: PrincipalDep, client_id: ClientId = None
) -> ExperimentPublic | JSONResponse:
    """The same as POST /v1/experiments, with the spec as YAML or JSON text (what the web UI sends)."""
    try:
        spec = experiment_from_data(parse_spec_text(body.spec))
    except SpecError as error:
        return _spec_errors(error.errors)
    return create_experiment(spec, services, principal, client_id)


@router.get("/v1/experiments", response_model=list[ExperimentPublic], operation_id="list_experiments")
def list_experiments(services: ServicesDep, principal: PrincipalDep) -> list[ExperimentPublic]:
    """The newest 50 experiments (with auth on, this key's)."""
    client = principal.key_id if principal.authenticated else None
    return [_public(services, record) for record in ExperimentStore(services.store.engine).list(client)]


@router.get("/v1/experiments/{experiment_id}", response_model=ExperimentPublic, operation_id="get_experiment")
def get_experiment(experiment_id: str, services: ServicesDep, principal: PrincipalDep) -> ExperimentPublic:
    return _public(services, _owned(services, principal, experiment_id))


@router.delete(
    "/v1/experiments/{experiment_id}", response_model=ExperimentPublic, operation_id="cancel_experiment"
)
def cancel_experiment(experiment_id: str, services: ServicesDep, principal: PrincipalDep) -> ExperimentPublic:
    """Cancel every unfinished image (queued at once, running at the next step)."""
    record = _owned(services, principal, experiment_id)
    for job_id in set(ExperimentStore(services.store.engine).cells(experiment_id).values()):
        services.store.request_cancel(job_id)
    return _public(services, record)


@router.get(
    "/v1/experiments/{experiment_id}/report", response_class=HTMLResponse, operation_id="experiment_report"
)
def experiment_report(experiment_id: str, services: ServicesDep, principal: PrincipalDep) -> HTMLResponse:
    """The report as one self-contained HTML page (pictures embedded); partial until every image is done."""
    record = _owned(services, principal, experiment_id)
    html, _ = service.report(record, services.store, services.images, services.inputs, services.settings)
    return HTMLResponse(html, headers={"Content-Security-Policy": REPORT_POLICY})


@router.get("/v1/experiments/{experiment_id}/results", operation_id="experiment_results")
def experiment_results(experiment_id: str, services: ServicesDep, principal: PrincipalDep) -> dict:
    """The report's numbers as JSON: per-image metrics, per-variant means, time and cost, the tests."""
    record = _owned(services, principal, experiment_id)
    _, data = service.report(record, services.store, services.images, services.inputs, services.settings)
    return data

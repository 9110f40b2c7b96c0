"""An experiment from spec to report, shared by `genserve ab` and /v1/experiments: its items go
through the batch machinery (`batch.runner.submit_items`: long queue, de-duplicated by item key),
its cells are recorded in the store, and its report is built from the jobs when asked for."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from genserve.artifacts.images import ImageStore, write_atomically
from genserve.artifacts.inputs import InputStore, MissingPicture
from genserve.batch.runner import submit_items
from genserve.config import Settings
from genserve.engine.models.registry import ModelInfo
from genserve.experiments.analysis import ExperimentResults, analyse
from genserve.experiments.report import render_html
from genserve.experiments.spec import (
    ExperimentPlan,
    ExperimentSpec,
    carrier_batch_spec,
    plan,
    store_reference,
)
from genserve.schemas import JobState
from genserve.store.experiments import ExperimentRecord, ExperimentStore
from genserve.store.jobs import JobStore

FINISHED = ("succeeded", "failed", "canceled")


@dataclass(frozen=True)
class Prepared:
    spec: ExperimentSpec  # its reference image stored and named by hash
    plan: ExperimentPlan


def prepare(
    spec: ExperimentSpec,
    base_dir: Path,
    models: dict[str, ModelInfo],
    settings: Settings,
    inputs: InputStore,
    local_files: bool,
) -> Prepared:
    """Check everything before anything runs (raises SpecError naming the field)."""
    spec = store_reference(spec, base_dir, inputs, settings.limits, local_files)
    return Prepared(spec, plan(spec, models, settings))


def submit(
    prepared: Prepared,
    store: JobStore,
    models: dict[str, ModelInfo],
    client_id: str | None = None,
    key_id: str | None = None,
) -> str:
    """Queue the experiment's items and record it; returns the experiment id."""
    spec, planned = prepared.spec, prepared.plan
    job_ids = submit_items(store, planned.items, carrier_batch_spec(spec), models, client_id, key_id)
    cells = {cell: (key, job_ids[key]) for cell, key in planned.cells.items()}
    return ExperimentStore(store.engine).create(spec.name, spec.model_dump(mode="json"), cells, client_id)


def progress(store: JobStore, experiment_id: str) -> dict[str, int]:
    """The experiment's images per state (an image shared by two variants counts for both)."""
    cells = ExperimentStore(store.engine).cells(experiment_id)
    jobs = store.get_many(list(dict.fromkeys(cells.values())))
    states = [jobs[job_id].state.value if job_id in jobs else "unknown" for job_id in cells.values()]
    return {"total": len(cells), **{state.value: states.count(state.value) for state in JobState}}


def is_done(counts: dict[str, int]) -> bool:
    return sum(counts.get(state, 0) for state in FINISHED) == counts["total"]


def results(
    record: ExperimentRecord, store: JobStore, images: ImageStore, inputs: InputStore, models_dir: Path
) -> ExperimentResults:
    spec = ExperimentSpec.model_validate(record.spec)
    cells = ExperimentStore(store.engine).cells(record.id)
    jobs = store.get_many(list(dict.fromkeys(cells.values())))
    reference = None
    if spec.reference_image:
        try:
            reference = inputs.get(spec.reference_image)
        except MissingPicture:
            reference = None
    return analyse(
        spec,
        {cell: jobs.get(job_id) for cell, job_id in cells.items()},
        _reader(images),
        reference,
        models_dir,
    )


def _reader(images: ImageStore):  # noqa: ANN202 - Callable[[str], bytes | None]
    def read(image_id: str) -> bytes | None:
        try:
            return images.path(image_id).read_bytes()
        except (OSError, LookupError):
            return None

    return read


def report(
    record: ExperimentRecord, store: JobStore, images: ImageStore, inputs: InputStore, settings: Settings
) -> tuple[str, dict]:
    """The report's HTML and its results as JSON. A finished experiment's are kept in
    `<data_dir>/experiments/` and served from there; an unfinished one's are built each time."""
    folder = settings.data_dir / "experiments"
    html_path, json_path = folder / f"{record.id}.html", folder / f"{record.id}.json"
    if html_path.is_file() and json_path.is_file():
        return html_path.read_text(), json.loads(json_path.read_text())
    found = results(record, store, images, inputs, settings.models_dir)
    html, data = render_html(found, record.created_at), finite(found.to_json())
    if found.done:
        write_atomically(json_path, json.dumps(data).encode())
        write_atomically(html_path, html.encode())
    return html, data


def finite(value: object) -> object:
    """JSON without NaN or infinities (which JSON has no words for): they become "inf", "-inf", "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [finite(item) for item in value]
    return value

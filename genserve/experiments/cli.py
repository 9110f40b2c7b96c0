"""`genserve ab SPEC`: run an A/B experiment here (a local worker, as `genserve batch run` does) or on a
server (`--server`), and write its HTML report."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from genserve.batch.spec import SpecError
from genserve.config import Settings
from genserve.experiments.spec import ExperimentSpec, load_experiment

console = Console(stderr=True)
POLL_SECONDS = 0.5


def _fail(where: Path, errors: list[str]) -> typer.Exit:
    console.print(f"[red]{where}: {len(errors)} problem(s)[/red]")
    for line in errors:
        console.print(f"  [red]{line}[/red]")
    return typer.Exit(2)


def ab(
    spec_path: Annotated[Path, typer.Argument(help="Experiment spec, YAML or JSON (docs/experiments.md).")],
    report: Annotated[
        Path | None, typer.Option("--report", "-o", help="Report file (default: <output dir>/report.html).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Image folder (default: the spec's output.dir).")] = None,
    server: Annotated[str | None, typer.Option(help="Run on this genserve server instead of here.")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="GENSERVE_API_KEY", help="For --server.")] = None,
    validate_only: Annotated[
        bool, typer.Option("--validate", help="Check the spec; render nothing.")
    ] = False,
    estimate_only: Annotated[
        bool, typer.Option("--estimate", help="Time and cost from this machine's cost model; render nothing.")
    ] = False,
) -> None:
    """Render variants × seeds, measure them, test each variant against A, write the HTML report."""
    try:
        spec, base_dir = load_experiment(spec_path)
    except SpecError as error:
        raise _fail(spec_path, error.errors) from None
    out_dir = out or base_dir / spec.output.dir
    target = report or out_dir / "report.html"
    if server and not estimate_only:
        html = _run_remote(spec, base_dir, server.rstrip("/"), api_key, validate_only)
    else:
        mode = "estimate" if estimate_only else "validate" if validate_only else "run"
        html = _run_local(spec, spec_path, base_dir, out_dir, mode)
    if html is None:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(html)
    console.print(f"report: {target}")


def print_summary(results: dict) -> None:
    """Each variant against A on each tested metric, as the report's table has it."""
    from genserve.experiments.analysis import METRICS

    table = Table("metric", "variant", "A", "variant mean", "p", "seeds needed")
    for comparison in results["comparisons"]:
        test = comparison["test"]
        table.add_row(
            METRICS[comparison["metric"]][0], comparison["variant"], f"{comparison['baseline_mean']:.4g}",
            f"{comparison['variant_mean']:.4g}", f"{test['p_value']:.3g}", str(test["seeds_needed"] or "-"),
        )  # fmt: skip
    Console().print(table)
    for note in results["notes"]:
        console.print(f"[dim]{note}[/dim]")


def _run_local(spec: ExperimentSpec, spec_path: Path, base_dir: Path, out_dir: Path, mode: str) -> str | None:
    """Check the spec (mode "validate"), print the cost model's estimate ("estimate") or run it here."""
    from genserve.artifacts.images import ImageStore
    from genserve.artifacts.s3 import make_input_store
    from genserve.batch.cli import print_estimate, run_local
    from genserve.engine.models.registry import registered_models
    from genserve.experiments import service
    from genserve.experiments.spec import carrier_batch_spec
    from genserve.store.experiments import ExperimentStore
    from genserve.store.jobs import JobStore

    settings = Settings()
    models, inputs = registered_models(settings), make_input_store(settings)
    try:
        prepared = service.prepare(spec, base_dir, models, settings, inputs, local_files=True)
    except SpecError as error:
        raise _fail(spec_path, error.errors) from None
    images = len(prepared.spec.variants) * len(prepared.spec.seed_list)
    console.print(f"{len(spec.variants)} variants × {len(spec.seed_list)} seeds: {images} images, "
                  f"{len(prepared.plan.items)} unique")  # fmt: skip
    if mode == "estimate":  # the batch CLI's table: per batch key, from calibrated or default step times
        print_estimate(prepared.plan.items, models, settings, spec.gpu_price_per_hour)
    if mode != "run":
        return None
    store = JobStore.from_url(settings.resolved_store_url)
    experiment_id = service.submit(prepared, store, models)
    console.print(f"experiment {experiment_id}")
    # The batch CLI's loop: a local worker, rich progress, Ctrl-C stops after the batch on the GPU.
    summary = run_local(carrier_batch_spec(prepared.spec), prepared.plan.items, models, settings, out_dir)
    record = ExperimentStore(store.engine).get(experiment_id)
    assert record is not None
    html, results = service.report(record, store, ImageStore(settings.images_dir), inputs, settings)
    print_summary(results)
    if summary["stopped"]:
        console.print("[yellow]stopped: the report shows what finished; run again to complete it[/yellow]")
    return html


def _run_remote(
    spec: ExperimentSpec, base_dir: Path, server: str, api_key: str | None, validate_only: bool
) -> str | None:
    body = spec.model_dump(mode="json")
    reference = spec.reference_image
    if reference and (base_dir / reference).is_file():  # a file next to the spec travels as base64
        body["reference_image"] = base64.b64encode((base_dir / reference).read_bytes()).decode("ascii")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if validate_only:
        console.print(
            "[yellow]--validate checks the spec here; the server checks it again on submit[/yellow]"
        )
        return None
    with httpx.Client(base_url=server, headers=headers, timeout=60) as client:
        response = client.post("/v1/experiments", json=body)
        if response.status_code == 422:
            raise _fail(Path(server), [entry["msg"] for entry in response.json()["detail"]])
        response.raise_for_status()
        experiment = response.json()
        console.print(f"experiment {experiment['id']} on {server}")
        with Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("failed {task.fields[failed]}"), TimeRemainingColumn(), console=console,
        ) as progress:  # fmt: skip
            task = progress.add_task(spec.name, total=experiment["counts"]["total"], failed=0)
            while True:
                counts = experiment["counts"]
                finished = counts.get("succeeded", 0) + counts.get("failed", 0) + counts.get("canceled", 0)
                progress.update(task, completed=finished, failed=counts.get("failed", 0))
                if experiment["done"]:
                    break
                time.sleep(POLL_SECONDS)
                experiment = client.get(f"/v1/experiments/{experiment['id']}").raise_for_status().json()
        print_summary(client.get(experiment["results_url"]).raise_for_status().json())
        return client.get(experiment["report_url"]).raise_for_status().text

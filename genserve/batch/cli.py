"""`genserve batch validate|run SPEC`: render a batch on this machine with a local worker.

Items are jobs in the configured job store (idempotent by item key), so a re-run after Ctrl-C, a
crash or a kill resumes: finished items are skipped, interrupted ones run again, failed ones retry.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from genserve.artifacts.s3 import make_input_store
from genserve.batch.expand import RenderItem, VideoItem, expand, expand_video, store_spec_pictures
from genserve.batch.runner import (
    cost_group,
    manifest_rows,
    progress_counts,
    submit_items,
    submit_video_items,
    video_manifest_rows,
    write_manifest,
)
from genserve.batch.spec import BatchSpec, SpecError, load_spec
from genserve.config import Settings
from genserve.engine.models.registry import ModelInfo, registered_models

batch_app = typer.Typer(help="Render N prompts × variants, resumable, with a manifest.", no_args_is_help=True)
console = Console(stderr=True)
# How often the progress bar counts the items' states while batches run back to back.
PROGRESS_SECONDS = 0.5

SpecPath = Annotated[Path, typer.Argument(help="Batch spec, YAML or JSON.")]


def _load(
    spec_path: Path, settings: Settings
) -> tuple[BatchSpec, Path, list[RenderItem] | list[VideoItem], dict[str, ModelInfo]]:
    models = registered_models(settings)
    pictures = make_input_store(settings)
    try:
        spec, base_dir = load_spec(spec_path)
        spec = store_spec_pictures(spec, base_dir, pictures, settings.limits, local_files=True)
        if spec.kind == "video":
            items = expand_video(spec, base_dir, models, settings)
        else:
            items = expand(spec, base_dir, models, settings, pictures)
    except SpecError as error:
        console.print(f"[red]{spec_path}: {len(error.errors)} problem(s)[/red]")
        for line in error.errors:
            console.print(f"  [red]{line}[/red]")
        raise typer.Exit(2) from None
    return spec, base_dir, items, models


@batch_app.command()
def validate(spec_path: SpecPath) -> None:
    """Check a spec against the server's limits and count its items."""
    _, _, items, _ = _load(spec_path, Settings())
    console.print(f"[green]ok[/green]: {len(items)} unique item(s)")


def print_estimate(
    items: list[RenderItem], models: dict[str, ModelInfo], settings: Settings, price: float | None
) -> None:
    """The cost model's time for the whole batch, per batch key, before anything runs."""
    from genserve.scheduler.cost import estimate, steps_run
    from genserve.store.calibration import CalibrationStore

    calibration = CalibrationStore.from_url(settings.resolved_store_url)
    groups: dict[tuple, list[RenderItem]] = {}
    for item in items:
        groups.setdefault(cost_group(item.params), []).append(item)
    table = Table("model", "size", "steps", "images", "batch", "s/image", "images/hour", "hours", "cost")
    total_hours, total_cost = 0.0, 0.0
    for group in groups.values():
        params = group[0].params
        batch = min(len(group), settings.default_max_batch_images)
        timing = calibration.lookup(
            device=calibration.default_device(params.model),
            model=params.model,
            family=models[params.model].family,
            width=params.width,
            height=params.height,
            batch=batch,
        )
        strength = params.strength if params.init_image is not None else None  # img2img runs fewer steps
        result = estimate(
            timing,
            steps=steps_run(params.steps, strength),
            batch=batch,
            gpu_price_per_hour=price,
            images=len(group),
            encodes=strength is not None,
        )
        total_hours += result.gpu_hours or 0.0
        total_cost += result.total_cost or 0.0
        table.add_row(
            params.model, f"{params.width}x{params.height}", str(params.steps), str(len(group)), str(batch),
            f"{result.seconds_per_image:.3f}", f"{result.images_per_hour:,.0f}", f"{result.gpu_hours:.3f}",
            f"{result.total_cost:.2f}" if result.total_cost is not None else "-",
        )  # fmt: skip
        console.print(f"basis ({params.model}): {result.basis}")
    Console().print(table)
    cost = f", cost {total_cost:.2f}" if price is not None else ""
    console.print(f"total: {len(items)} images, {total_hours:.3f} GPU-hours{cost}")


def print_video_estimate(
    items: list[VideoItem], models: dict[str, ModelInfo], settings: Settings, price: float | None
) -> None:
    """The video cost model's GPU-seconds for every clip, per model, size and length."""
    from genserve.api.video_submission import estimated_video_seconds
    from genserve.engine.video.plan import output_seconds
    from genserve.store.video_calibration import VideoCalibrationStore

    calibration = VideoCalibrationStore.from_url(settings.resolved_store_url)

    groups: dict[tuple, list[VideoItem]] = {}
    for item in items:
        p = item.params
        groups.setdefault((p.model, p.width, p.height, p.num_frames, p.steps, p.post.interpolate), []).append(
            item
        )
    table = Table("model", "size", "frames", "steps", "clips", "GPU-s/clip", "video s/clip", "hours", "cost")
    total_seconds, total_video = 0.0, 0.0
    for group in groups.values():
        p = group[0].params
        speed = calibration.speed(p.model, settings.video_speed_scale)
        seconds = estimated_video_seconds(p, models[p.model].family, settings, speed)
        video = output_seconds(p)
        total_seconds += seconds * len(group)
        total_video += video * len(group)
        cost = f"{price * seconds * len(group) / 3600:.2f}" if price is not None else "-"
        table.add_row(
            p.model, f"{p.width}x{p.height}", str(p.num_frames), str(p.steps), str(len(group)),
            f"{seconds:.3f}", f"{video:.3f}", f"{seconds * len(group) / 3600:.3f}", cost,
        )  # fmt: skip
    Console().print(table)
    hours = total_seconds / 3600
    cost = (
        f", cost {price * hours:.2f} ({price * hours / total_video:.5f} per video-second)"
        if price is not None
        else ""
    )
    console.print(f"total: {len(items)} clips, {total_video:.1f} s of video, {hours:.3f} GPU-hours{cost}")


@batch_app.command()
def run(
    spec_path: SpecPath,
    estimate_only: Annotated[
        bool, typer.Option("--estimate", help="Print time and cost; render nothing.")
    ] = False,
    gpu_price: Annotated[float | None, typer.Option(help="GPU-hour price for --estimate.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: the spec's output.dir).")] = None,
) -> None:
    """Render a spec here. Ctrl-C stops after the batch on the GPU; run again to resume."""
    settings = Settings()
    spec, base_dir, items, models = _load(spec_path, settings)
    if estimate_only:
        if spec.kind == "video":
            print_video_estimate(items, models, settings, gpu_price)
        else:
            print_estimate(items, models, settings, gpu_price)
        return
    out_dir = out or (base_dir / spec.output.dir)
    summary = run_local(spec, items, models, settings, out_dir)
    raise typer.Exit(0 if summary["failed"] == 0 and summary["stopped"] is False else 1)


def run_local(
    spec: BatchSpec,
    items: list[RenderItem] | list[VideoItem],
    models: dict[str, ModelInfo],
    settings: Settings,
    out_dir: Path,
) -> dict:
    from genserve.artifacts.images import ImageStore
    from genserve.engine.engine import engine_from_settings
    from genserve.store.jobs import JobStore
    from genserve.worker.loop import Worker, new_worker_id
    from genserve.worker.supervisor import recover_dead_local_workers

    store = JobStore.from_url(settings.resolved_store_url)
    recovered = recover_dead_local_workers(store)  # an earlier run that was killed mid-batch
    if recovered:
        console.print(f"resuming: {len(recovered)} interrupted item(s) queued again")
    if spec.kind == "video":
        inputs = make_input_store(settings)
        job_ids = submit_video_items(store, items, spec, models, settings, inputs)
    else:
        job_ids = submit_items(store, items, spec, models)
    engine = engine_from_settings(models, settings, warmup=False)
    images = ImageStore(settings.images_dir)
    worker = Worker(settings, store, engine, images, new_worker_id())

    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt  # a second Ctrl-C: stop now; the next run resumes the items
        stop.set()
        console.print("\n[yellow]stopping after the batch on the GPU (Ctrl-C again to stop now)[/yellow]")

    previous = signal.signal(signal.SIGINT, request_stop)
    ids = list(job_ids.values())
    unit = "clips" if spec.kind == "video" else "img"
    started, done_at_start = time.monotonic(), None
    try:
        worker.announce()
        with (
            worker.finisher() as finisher,
            worker.prefetcher() as prefetcher,
            Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(f"{{task.fields[rate]}} {unit}/s · failed {{task.fields[failed]}}"),
                TimeRemainingColumn(),
                console=console,
            ) as progress,
        ):
            task = progress.add_task(spec.name, total=len(items), rate="-", failed=0)
            counted_at, queue_ran_dry = float("-inf"), False
            while True:
                # Counting the items' states takes time on a large batch: do it at most every
                # PROGRESS_SECONDS while batches run back to back, and at once when the queue ran dry.
                if queue_ran_dry or time.monotonic() - counted_at >= PROGRESS_SECONDS:
                    counts = progress_counts(store, ids, len(items))
                    counted_at = time.monotonic()
                    finished = counts["succeeded"] + counts["failed"] + counts["canceled"]
                    done_at_start = counts["succeeded"] if done_at_start is None else done_at_start
                    rate = (counts["succeeded"] - done_at_start) / max(1e-9, counted_at - started)
                    progress.update(task, completed=finished, rate=f"{rate:.2f}", failed=counts["failed"])
                    if finished == len(items):
                        break
                    worker.announce()
                    if queue_ran_dry:
                        time.sleep(settings.poll_seconds)  # retries waiting for their backoff
                if stop.is_set():
                    break
                queue_ran_dry = not worker.run_next(finisher, prefetcher)
                if queue_ran_dry:
                    finisher.wait()  # the last batch's items count as finished before the next look
    finally:
        signal.signal(signal.SIGINT, previous)
        store.remove_worker(worker.worker_id)
    jobs = store.get_many(ids)
    if spec.kind == "video":
        from genserve.artifacts.s3 import make_video_store

        rows = video_manifest_rows(spec, items, job_ids, jobs, make_video_store(settings), out_dir)
    else:
        rows = manifest_rows(spec, items, job_ids, jobs, images, out_dir)
    files = write_manifest(rows, out_dir)
    counts = progress_counts(store, ids, len(items))
    summary = {**counts, "stopped": stop.is_set(), "manifest": str(files.jsonl)}
    console.print(
        f"{counts['succeeded']}/{len(items)} done, {counts['failed']} failed"
        + (" — stopped; run again to resume" if stop.is_set() else "")
        + f"; manifest: {files.jsonl} and {files.csv.name}"
    )
    return summary

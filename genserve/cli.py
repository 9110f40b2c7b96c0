"""The `genserve` command: serve, generate, models.

`generate` runs the engine in this process (no server needed), or with --server it is a client of a
running server's API. Both show a rich progress bar.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from genserve.auth.cli import keys_app
from genserve.batch.cli import batch_app
from genserve.config import Settings, is_loopback
from genserve.distributed.worker_cli import worker as distributed_worker
from genserve.schemas import SAMPLER_NAMES, GenerationParams, LimitError

app = typer.Typer(help="genserve: a self-hosted image generation server.", no_args_is_help=True)
app.add_typer(batch_app, name="batch")
app.add_typer(keys_app, name="keys")
app.command(name="worker")(distributed_worker)  # multi-node: docs/scaling.md
console = Console(stderr=True)


def _settings(**overrides: object) -> Settings:
    return Settings(**{key: value for key, value in overrides.items() if value is not None})


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 7860).")] = None,
    models_dir: Annotated[Path | None, typer.Option(help="Models directory.")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Data directory (store, images).")] = None,
    store: Annotated[str | None, typer.Option("--store", help="Job store URL (SQLite default).")] = None,
    broker: Annotated[
        str | None, typer.Option("--broker", help="redis://... : stateless API replica for genserve workers.")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes to supervise (0: API only).")] = None,
    default_model: Annotated[str | None, typer.Option(help="Default model name.")] = None,
    auth: Annotated[
        str | None, typer.Option(help="API keys: auto (required off loopback), on or off.")
    ] = None,
    allow_open: Annotated[
        bool | None, typer.Option("--allow-open", help="Serve without API keys on a public address.")
    ] = None,
) -> None:
    """Start the HTTP server and its supervised engine workers."""
    if auth not in (None, "auto", "on", "off"):
        raise typer.BadParameter(f"--auth must be auto, on or off, not '{auth}'")
    settings = _settings(
        host=host,
        port=port,
        models_dir=models_dir,
        data_dir=data_dir,
        store_url=store,
        broker_url=broker,
        workers=workers,
        default_model=default_model,
        auth=auth,
        allow_open_public=allow_open,
    )
    if not settings.auth_enabled and not is_loopback(settings.host) and not settings.allow_open_public:
        console.print(
            f"[red]refusing to serve without API keys on {settings.host}: anyone who can reach it could "
            "use it. Use --auth on (create keys with `genserve keys create`), or --allow-open.[/red]"
        )
        raise typer.Exit(2)
    if settings.auth_enabled:
        console.print("API keys required (Bearer gs_...); create one with: genserve keys create NAME")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    # Workers are separate processes: metrics they observe reach /metrics through these files.
    metrics_dir = settings.data_dir / "prometheus"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir.resolve())

    from genserve.logs import configure_logging

    configure_logging()

    from genserve.tracing import configure_tracing

    configure_tracing(settings, "genserve-api")

    import uvicorn

    from genserve.api.app import create_app

    console.print(f"genserve listening on http://{settings.host}:{settings.port}  (API docs at /docs)")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=None)


def _output_paths(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("step {task.completed:.0f}/{task.total:.0f}"),
        TimeRemainingColumn(),
        console=console,
    )


def _generate_local(params: GenerationParams, output: Path) -> list[Path]:
    from genserve.api.submission import resolve_params
    from genserve.artifacts.png import encode_png
    from genserve.engine.engine import Engine, EngineError, engine_optimizations
    from genserve.engine.models.registry import registered_models

    settings = Settings()
    models = registered_models(settings)
    try:
        params = resolve_params(params, models, settings)
    except LimitError as error:
        console.print(f"[red]{error.field}: {error.message}[/red]")
        raise typer.Exit(2) from None
    # One image: a compile would cost more than it saves, so this path runs eager.
    levers = settings.optimizations.model_copy(update={"compile": "off"})
    engine = Engine(
        models,
        device=settings.device,
        dtype=settings.dtype,
        threads=settings.torch_threads,
        optimizations=engine_optimizations(settings.model_copy(update={"optimizations": levers})),
    )
    with _progress() as progress:
        task = progress.add_task(f"{params.model} seed {params.seed}", total=params.steps)
        try:
            images = engine.generate(
                params, on_step=lambda step, steps: progress.update(task, completed=step)
            )
        except EngineError as error:
            console.print(f"[red]generation failed: {error}[/red]")
            raise typer.Exit(1) from None
    paths = _output_paths(output, len(images))
    for index, (image, path) in enumerate(zip(images, paths, strict=True)):
        path.write_bytes(encode_png(image, params, seed=params.seed + index, index=index))
    return paths


def _generate_remote(params: GenerationParams, output: Path, server: str) -> list[Path]:
    import httpx

    base = server.rstrip("/")
    with httpx.Client(base_url=base, timeout=httpx.Timeout(30.0, read=None)) as client:
        with client.stream(
            "POST", "/v1/generate_stream", json=params.model_dump(exclude_unset=True, exclude_none=True)
        ) as response:
            if response.status_code == 422:
                response.read()
                for item in response.json().get("detail", []):
                    console.print(f"[red]{item.get('loc', ['', '?'])[-1]}: {item.get('msg')}[/red]")
                raise typer.Exit(2)
            response.raise_for_status()
            final = _follow_events(response.iter_lines(), params.steps)
        if final["type"] != "succeeded":
            console.print(f"[red]job {final['type']}: {final['data'].get('error', '')}[/red]")
            raise typer.Exit(1)
        urls = [image["url"] for image in final["data"]["images"]]
        paths = _output_paths(output, len(urls))
        for url, path in zip(urls, paths, strict=True):
            path.write_bytes(client.get(url).raise_for_status().content)
    return paths


def _follow_events(lines: object, steps: int) -> dict:
    """Drive a progress bar from an SSE stream; return the terminal event."""
    event_type, final = None, None
    with _progress() as progress:
        task = progress.add_task("queued", total=steps)
        for line in lines:
            if line.startswith("event:"):
                event_type = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                data = json.loads(line.split(":", 1)[1])
                if event_type == "queued":
                    progress.update(task, description=f"queued (position {data.get('queue_position')})")
                elif event_type == "started":
                    progress.update(task, description="running")
                elif event_type == "progress":
                    progress.update(task, completed=data["step"], total=data["steps"])
                elif event_type in ("succeeded", "failed", "canceled"):
                    final = {"type": event_type, "data": data}
    if final is None:
        console.print("[red]the event stream ended before the job finished[/red]")
        raise typer.Exit(1)
    return final


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Output PNG (several images: -0, -1, ...).")
    ] = Path("out.png"),
    negative_prompt: Annotated[str, typer.Option(help="What to steer away from.")] = "",
    model: Annotated[str | None, typer.Option(help="Model name (default model if omitted).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (random if omitted).")] = None,
    steps: Annotated[
        int | None, typer.Option(help="Denoising steps (the model's default if omitted).")
    ] = None,
    cfg_scale: Annotated[
        float | None, typer.Option(help="Classifier-free guidance scale (the model's default if omitted).")
    ] = None,
    width: Annotated[int | None, typer.Option(help="Width in pixels (model native if omitted).")] = None,
    height: Annotated[int | None, typer.Option(help="Height in pixels (model native if omitted).")] = None,
    sampler: Annotated[
        str | None, typer.Option(help=f"One of: {', '.join(SAMPLER_NAMES)} (the model's default if omitted).")
    ] = None,
    num_images: Annotated[int, typer.Option(help="Number of images (seeds seed, seed+1, ...).")] = 1,
    server: Annotated[str | None, typer.Option(help="Run on a genserve server at this URL instead.")] = None,
) -> None:
    """Generate images locally, or on a server with --server."""
    from pydantic import ValidationError

    try:
        # Steps and sampler only when given, so the model's own defaults fill them (resolve_params).
        chosen = {"steps": steps, "sampler": sampler}
        params = GenerationParams(
            prompt=prompt,
            negative_prompt=negative_prompt,
            model=model,
            seed=seed,
            cfg_scale=cfg_scale,
            width=width,
            height=height,
            num_images=num_images,
            **{name: value for name, value in chosen.items() if value is not None},
        )
    except ValidationError as error:
        for item in error.errors():
            console.print(f"[red]{'.'.join(map(str, item['loc']))}: {item['msg']}[/red]")
        raise typer.Exit(2) from None
    paths = _generate_remote(params, output, server) if server else _generate_local(params, output)
    for path in paths:
        console.print(f"wrote {path}")


@app.command()
def models(
    server: Annotated[str | None, typer.Option(help="List a running server's models instead.")] = None,
) -> None:
    """List the models genserve can serve."""
    if server:
        import httpx

        rows = httpx.get(server.rstrip("/") + "/v1/models", timeout=30).raise_for_status().json()["data"]
    else:
        from genserve.engine.models.registry import registered_models

        settings = Settings()
        rows = [
            {
                "name": m.name,
                "family": m.family,
                "format": m.format,
                "native_width": m.native_width,
                "native_height": m.native_height,
                "dtype": m.dtype,
                "loaded": False,
            }
            for m in registered_models(settings).values()
        ]
    table = Table("name", "family", "format", "native size", "dtype", "loaded")
    for row in rows:
        size = f"{row['native_width']}x{row['native_height']}"
        table.add_row(row["name"], row["family"], row["format"], size, row["dtype"], str(row["loaded"]))
    Console().print(table)


def _parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    try:
        size = int(width), int(height)
    except ValueError:
        raise typer.BadParameter(f"'{text}' is not WIDTHxHEIGHT, e.g. 512x512") from None
    if min(size) < 8 or size[0] % 8 or size[1] % 8:
        raise typer.BadParameter(f"'{text}': width and height must be multiples of 8")
    return size


def _display_url(url: str) -> str:
    import sqlalchemy as sa

    return sa.make_url(url).render_as_string(hide_password=True)


@app.command()
def calibrate(
    model: Annotated[str | None, typer.Option(help="Model to measure (default model if omitted).")] = None,
    size: Annotated[
        list[str] | None, typer.Option("--size", help="WIDTHxHEIGHT; repeat for several (default: native).")
    ] = None,
    batch: Annotated[
        list[int] | None, typer.Option("--batch", help="Batch size; repeat (default 1, 2, 4).")
    ] = None,
    steps: Annotated[tuple[int, int], typer.Option(help="The two step counts S1 S2 to time.")] = (5, 20),
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs per step count (median).")] = 3,
    device: Annotated[
        str | None, typer.Option(help="auto | cpu | cuda | cuda:N (default: settings).")
    ] = None,
    models_dir: Annotated[Path | None, typer.Option(help="Models directory.")] = None,
    store: Annotated[
        str | None, typer.Option("--store", help="Store URL (default: the configured store).")
    ] = None,
) -> None:
    """Measure the cost model's O and t_step on this machine and store them for `plan` and the server."""
    from genserve.engine.engine import Engine, EngineError, engine_optimizations
    from genserve.engine.models.registry import registered_models
    from genserve.scheduler.calibrate import calibrate as run_calibration
    from genserve.scheduler.calibrate import runs_per_point
    from genserve.store.calibration import CalibrationStore

    settings = _settings(models_dir=models_dir, store_url=store, device=device)
    models = registered_models(settings)
    name = model or settings.default_model
    if name not in models:
        console.print(f"[red]model '{name}' is not in {settings.models_dir}[/red]")
        raise typer.Exit(2)
    info = models[name]
    sizes = [_parse_size(text) for text in size] if size else [(info.native_width, info.native_height)]
    batches = batch or [1, 2, 4]
    engine = Engine(
        models,
        device=settings.device,
        dtype=settings.dtype,
        threads=settings.torch_threads,
        optimizations=engine_optimizations(settings),  # calibrate what serving runs
    )
    calibration = CalibrationStore.from_url(settings.resolved_store_url)
    with _progress() as progress:
        task = progress.add_task(f"loading {name}", total=len(sizes) * len(batches) * runs_per_point(repeats))
        try:
            engine.load(name)
            timings = run_calibration(
                engine,
                name,
                sizes,
                batches,
                steps_pair=steps,
                repeats=repeats,
                on_run=lambda what: progress.update(task, advance=1, description=what),
            )
        except (EngineError, ValueError, RuntimeError) as error:
            console.print(f"[red]calibration failed: {error}[/red]")
            raise typer.Exit(1) from None
    table = Table("device", "model", "size", "batch", "O (s)", "t_step (s)", "s/image at 30 steps")
    for timing in timings:
        calibration.save(timing)
        per_image = (timing.overhead_s + 30 * timing.step_s) / timing.batch
        table.add_row(
            timing.device,
            timing.model,
            f"{timing.width}x{timing.height}",
            str(timing.batch),
            f"{timing.overhead_s:.4f}",
            f"{timing.step_s:.5f}",
            f"{per_image:.4f}",
        )
    Console().print(table)
    console.print(f"stored {len(timings)} timings in {_display_url(settings.resolved_store_url)}")


def _read_timings(url: str) -> list:  # list[StepTiming]; the store module is imported lazily
    """Stored timings; none (and no file created) when the SQLite store does not exist yet."""
    import sqlalchemy as sa

    from genserve.store.calibration import CalibrationStore

    sa_url = sa.make_url(url)
    if sa_url.get_backend_name() == "sqlite" and not Path(sa_url.database or "").is_file():
        return []
    return CalibrationStore.from_url(url).all()


@app.command()
def plan(
    model: Annotated[
        str | None, typer.Option(help="Model name, or a family (sd15, sdxl, sd3) for one not installed.")
    ] = None,
    width: Annotated[int | None, typer.Option(help="Width in pixels (model native if omitted).")] = None,
    height: Annotated[int | None, typer.Option(help="Height in pixels (model native if omitted).")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Denoising steps.")] = 20,
    batch: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 1,
    gpu_price: Annotated[float | None, typer.Option(min=0, help="Price of one GPU-hour.")] = None,
    gpus: Annotated[int, typer.Option(min=1, help="GPUs one batch occupies.")] = 1,
    images: Annotated[int | None, typer.Option(min=1, help="Images to plan for.")] = None,
    device: Annotated[
        str | None,
        typer.Option(help="Device as calibrated (default: the calibrated one, else H100 reference)."),
    ] = None,
    family: Annotated[str | None, typer.Option(help="Family of a model that is not installed.")] = None,
    models_dir: Annotated[Path | None, typer.Option(help="Models directory.")] = None,
    store: Annotated[
        str | None, typer.Option("--store", help="Store URL (default: the configured store).")
    ] = None,
) -> None:
    """Time per image, images/hour, cost per 1,000 images and GPU-hours, from the cost model."""
    from genserve.engine.models.registry import DEFAULT_NATIVE_SIZE, registered_models
    from genserve.scheduler.cost import default_device, estimate, lookup

    settings = _settings(models_dir=models_dir, store_url=store)
    name = model or settings.default_model
    info = registered_models(settings).get(name)
    if info is not None:
        family = family or info.family
        native = (info.native_width, info.native_height)
    elif family or name in DEFAULT_NATIVE_SIZE:
        family = family or name
        native = (DEFAULT_NATIVE_SIZE.get(family, 1024),) * 2
    else:
        console.print(
            f"[red]model '{name}' is not in {settings.models_dir}; pass --family (sd15, sdxl, sd3)[/red]"
        )
        raise typer.Exit(2)
    width, height = width or native[0], height or native[1]
    timings = _read_timings(settings.resolved_store_url)
    device = device or default_device(timings, name)
    timing = lookup(
        timings, device=device, model=name, family=family, width=width, height=height, batch=batch
    )
    result = estimate(
        timing, steps=steps, batch=batch, gpu_price_per_hour=gpu_price, gpus=gpus, images=images
    )

    table = Table(
        "figure",
        "value",
        title=f"{name} ({family}) {width}x{height}, {steps} steps, batch {batch}, on {device}",
    )
    table.add_row("time per batch (T = O + S × t_step)", f"{result.seconds_per_batch:.3f} s")
    table.add_row("  O, per-batch overhead", f"{result.overhead_s:.4f} s")
    table.add_row("  t_step, per step of the batch", f"{result.step_s:.5f} s")
    table.add_row("time per image", f"{result.seconds_per_image:.3f} s")
    table.add_row("images/hour", f"{result.images_per_hour:,.0f}")
    if result.cost_per_1000 is not None:
        table.add_row(
            f"cost per 1,000 images (at {gpu_price:g}/GPU-hour × {gpus})", f"{result.cost_per_1000:,.3f}"
        )
    if result.gpu_hours is not None:
        table.add_row(f"GPU-hours for {images:,} images", f"{result.gpu_hours:,.3f}")
    if result.total_cost is not None:
        table.add_row(f"total cost for {images:,} images", f"{result.total_cost:,.2f}")
    out = Console()
    out.print(table)
    out.print(f"basis: {result.basis}", soft_wrap=True)


@app.command()
def bench(
    models: Annotated[str, typer.Option(help="Comma-separated: sd15, sdxl, sd3.")] = "sd15,sdxl,sd3",
    batch: Annotated[str, typer.Option(help="Comma-separated batch sizes (images).")] = "1,4",
    steps: Annotated[int | None, typer.Option(min=1, help="Steps (default: 30; 28 for sd3).")] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs of each path (median).")] = 3,
    tiny: Annotated[bool, typer.Option(help="Tiny random-weight models: the CPU smoke test.")] = False,
    size: Annotated[str | None, typer.Option(help="WIDTHxHEIGHT (default: each model's native).")] = None,
    cfg_scale: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 7.0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
    dtype: Annotated[
        str, typer.Option(help="auto (fp16; bf16 for sd3; fp32 on CPU) | float16 | ...")
    ] = "auto",
    opt: Annotated[
        list[str] | None,
        typer.Option("--opt", help="An engine optimization KEY=VALUE (repeat), e.g. compile=off."),
    ] = None,
    compile_cache: Annotated[Path | None, typer.Option(help="Compile cache directory.")] = None,
    fresh_cache: Annotated[bool, typer.Option(help="Empty the compile cache first (cold start).")] = False,
    restart: Annotated[
        bool, typer.Option(help="Also time a restarted process to ready, with the caches written.")
    ] = False,
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads.")] = None,
    tag: Annotated[str | None, typer.Option(help="Results file name suffix (default: the models).")] = None,
    out: Annotated[Path, typer.Option(help="Results directory.")] = Path("benchmarks/results"),
) -> None:
    """Plain diffusers against genserve's engine on random-weight real architectures; writes a table."""
    from genserve.bench.report import table_rows, write_report
    from genserve.bench.run import BenchConfig, BenchError, run_bench

    if threads:
        import torch

        torch.set_num_threads(threads)
    options = {}
    for pair in opt or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise typer.BadParameter(f"--opt '{pair}' is not KEY=VALUE")
        options[key.strip()] = value.strip()
    config = BenchConfig(
        models=[m.strip() for m in models.split(",") if m.strip()],
        batches=[int(b) for b in batch.split(",") if b.strip()],
        steps=steps,
        repeats=repeats,
        tiny=tiny,
        cfg_scale=cfg_scale,
        size=_parse_size(size) if size else None,
        device=device,
        dtype=dtype,
        options=options,
        compile_cache_dir=compile_cache,
        fresh_cache=fresh_cache,
        restart=restart,
        tag=tag,
    )
    try:
        report = run_bench(config, command=config.command_line(threads), echo=console.print)
    except (BenchError, ValueError) as error:
        console.print(f"[red]bench: {error}[/red]")
        raise typer.Exit(2) from None
    header, *rows = table_rows(report)
    table = Table(*header, title=f"genserve bench: {report.device}, {report.date}")
    for row in rows:
        table.add_row(*row)
    Console(width=max(200, Console().width)).print(table)
    for path in write_report(report, out):
        console.print(f"wrote {path}")
    if any(case.accuracy_passed is False for case in report.cases):
        console.print("[red]accuracy check failed (relative L2 above the limit)[/red]")
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())

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

from genserve.config import Settings
from genserve.schemas import SAMPLER_NAMES, GenerationParams, LimitError

app = typer.Typer(help="genserve: a self-hosted image generation server.", no_args_is_help=True)
console = Console(stderr=True)


def _settings(**overrides: object) -> Settings:
    return Settings(**{key: value for key, value in overrides.items() if value is not None})


def ensure_default_model(settings: Settings) -> None:
    """Write the tiny random-weight SD1.5 default model on first start (see README)."""
    path = settings.models_dir / settings.default_model
    if path.exists() or not settings.bootstrap_default_model:
        return
    from genserve.engine.fixtures import write_tiny_pipeline

    console.print(f"[yellow]Writing the tiny default model to {path} (random weights)[/yellow]")
    write_tiny_pipeline("sd15", path)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 7860).")] = None,
    models_dir: Annotated[Path | None, typer.Option(help="Models directory.")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Data directory (store, images).")] = None,
    store: Annotated[str | None, typer.Option("--store", help="Job store URL (SQLite default).")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes to supervise (0: API only).")] = None,
    default_model: Annotated[str | None, typer.Option(help="Default model name.")] = None,
) -> None:
    """Start the HTTP server and its supervised engine workers."""
    settings = _settings(
        host=host,
        port=port,
        models_dir=models_dir,
        data_dir=data_dir,
        store_url=store,
        workers=workers,
        default_model=default_model,
    )
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    # Workers are separate processes: metrics they observe reach /metrics through these files.
    metrics_dir = settings.data_dir / "prometheus"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir.resolve())

    from genserve.logs import configure_logging

    configure_logging()
    ensure_default_model(settings)

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
    from genserve.engine.engine import Engine, EngineError
    from genserve.engine.registry import scan_models

    settings = Settings()
    ensure_default_model(settings)
    models = scan_models(settings.models_dir)
    try:
        params = resolve_params(params, models, settings)
    except LimitError as error:
        console.print(f"[red]{error.field}: {error.message}[/red]")
        raise typer.Exit(2) from None
    engine = Engine(models, device=settings.device, dtype=settings.dtype, threads=settings.torch_threads)
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
            "POST", "/v1/generate_stream", json=params.model_dump(exclude_none=True)
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
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 20,
    cfg_scale: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 7.0,
    width: Annotated[int | None, typer.Option(help="Width in pixels (model native if omitted).")] = None,
    height: Annotated[int | None, typer.Option(help="Height in pixels (model native if omitted).")] = None,
    sampler: Annotated[str, typer.Option(help=f"One of: {', '.join(SAMPLER_NAMES)}.")] = "euler",
    num_images: Annotated[int, typer.Option(help="Number of images (seeds seed, seed+1, ...).")] = 1,
    server: Annotated[str | None, typer.Option(help="Run on a genserve server at this URL instead.")] = None,
) -> None:
    """Generate images locally, or on a server with --server."""
    from pydantic import ValidationError

    try:
        params = GenerationParams(
            prompt=prompt,
            negative_prompt=negative_prompt,
            model=model,
            seed=seed,
            steps=steps,
            cfg_scale=cfg_scale,
            width=width,
            height=height,
            sampler=sampler,
            num_images=num_images,
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
        from genserve.engine.registry import scan_models

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
            for m in scan_models(settings.models_dir).values()
        ]
    table = Table("name", "family", "format", "native size", "dtype", "loaded")
    for row in rows:
        size = f"{row['native_width']}x{row['native_height']}"
        table.add_row(row["name"], row["family"], row["format"], size, row["dtype"], str(row["loaded"]))
    Console().print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())

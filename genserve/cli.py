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
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from genserve.auth.cli import keys_app
from genserve.batch.cli import batch_app
from genserve.config import Settings, is_loopback
from genserve.distributed.worker_cli import worker as distributed_worker
from genserve.engine.models.upscalers import DEFAULT_UPSCALER
from genserve.experiments.cli import ab
from genserve.schemas import SAMPLER_NAMES, GenerationParams, LimitError

if TYPE_CHECKING:  # torch, numpy and PIL load only for the commands that run a model
    import numpy as np
    import PIL.Image

    from genserve.engine.video.pipelines import VideoRequest
    from genserve.scheduler.video_cost import VideoSpeed
    from genserve.schemas.video import VideoParams, VideoSegment

app = typer.Typer(help="genserve: a self-hosted image generation server.", no_args_is_help=True)
app.add_typer(batch_app, name="batch")
app.add_typer(keys_app, name="keys")
app.command(name="worker")(distributed_worker)  # multi-node: docs/scaling.md
app.command(name="ab")(ab)  # A/B prompt experiments: docs/experiments.md
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
    from genserve.engine.models.upscalers import scan_upscalers

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
        upscalers=scan_upscalers(settings.models_dir, builtin=settings.builtin_models),
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
    upscale: Annotated[
        float | None, typer.Option(help="Upscale the images ×N after decode with --upscaler (tiled).")
    ] = None,
    upscaler: Annotated[
        str | None, typer.Option(help="Upscaler model for --upscale (default: genserve-shapes-2x).")
    ] = None,
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
            upscale=None if upscale is None else {"model": upscaler or DEFAULT_UPSCALER, "scale": upscale},
            **{name: value for name, value in chosen.items() if value is not None},
        )
    except ValidationError as error:
        for item in error.errors():
            console.print(f"[red]{'.'.join(map(str, item['loc']))}: {item['msg']}[/red]")
        raise typer.Exit(2) from None
    paths = _generate_remote(params, output, server) if server else _generate_local(params, output)
    for path in paths:
        console.print(f"wrote {path}")


# -- video ---------------------------------------------------------------------------------------

VIDEO_SUFFIXES = {".mp4": "mp4", ".webm": "webm", ".gif": "gif", ".webp": "webp"}


def _video_container(output: Path) -> str:
    container = VIDEO_SUFFIXES.get(output.suffix.lower())
    if container is None:
        raise typer.BadParameter(
            f"-o {output}: the suffix picks the container; use one of {', '.join(VIDEO_SUFFIXES)}"
        )
    return container


def _parse_keyframe(text: str) -> tuple[Path, int]:
    """PATH@INDEX (INDEX: the frame the picture is placed at; 0 when left out)."""
    path, sep, index = text.rpartition("@")
    if not sep:
        return Path(text), 0
    try:
        return Path(path), int(index)
    except ValueError:
        raise typer.BadParameter(f"--keyframe '{text}' is not PATH@INDEX, e.g. first.png@0") from None


def _print_validation(error: Exception) -> None:
    for item in error.errors():  # type: ignore[attr-defined]
        console.print(f"[red]{'.'.join(map(str, item['loc'])) or 'request'}: {item['msg']}[/red]")


def _video_params(**fields: object) -> VideoParams:
    from pydantic import ValidationError

    from genserve.schemas.video import VideoParams

    try:
        return VideoParams.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as error:
        _print_validation(error)
        raise typer.Exit(2) from None


def _video_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeRemainingColumn(),
        console=console,
    )


def _video_local(params: VideoParams, output: Path) -> dict:
    """Make the clip in this process: the worker's phases, with segments run one after another."""
    from genserve.api.video_submission import resolve_video
    from genserve.engine.models.loading import resolve_device, resolve_dtype
    from genserve.engine.models.registry import registered_models
    from genserve.engine.video.deliver import finish_clip, stitch_segments
    from genserve.engine.video.pipelines import VideoEngine

    settings = Settings()
    models = registered_models(settings)
    try:
        resolved, segments = resolve_video(params, models, settings)
    except LimitError as error:
        console.print(f"[red]{error.field}: {error.message}[/red]")
        raise typer.Exit(2) from None
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    device = resolve_device(settings.device)
    engine = VideoEngine(device=device, dtype=resolve_dtype(settings.dtype, device))
    info = models[resolved.model]
    base = models.get(info.base_model) if info.base_model else None
    pictures = _read_keyframes(resolved)
    with _video_progress() as progress:
        task = progress.add_task("denoise", total=resolved.steps, detail="")

        def make(request: VideoRequest, where: str) -> np.ndarray:
            def on_step(step: int, steps: int) -> None:
                detail = f"{where}step {step}/{steps}"
                progress.update(task, description="denoise", completed=step, total=steps, detail=detail)

            return engine.generate(info, request, on_step=on_step, base=base)

        try:
            if segments:
                clips: list = []
                for segment in segments:
                    where = f"segment {segment.index + 1} of {segment.count} · "
                    request = _segment_request(segment, pictures, clips[-1] if clips else None)
                    clips.append(make(request, where))
                progress.update(task, description="stitch", detail="")
                frames, seams = stitch_segments(clips, resolved, segments)
            else:
                frames, seams = make(_video_request(resolved, pictures), ""), []

            def stage(name: str, data: dict) -> None:
                progress.update(task, description=name, completed=0, total=1, detail="")

            encoded, report = finish_clip(
                frames, seams, resolved, device=device, on_stage=stage, prefer_nvenc=settings.video_nvenc
            )
            progress.update(task, completed=1, total=1)
        except (ValueError, RuntimeError, OSError) as error:
            console.print(f"[red]video failed: {type(error).__name__}: {error}[/red]")
            raise typer.Exit(1) from None
    output.write_bytes(encoded.data)
    return report


def _read_keyframes(params: VideoParams) -> dict[str, PIL.Image.Image]:
    """Each keyframe's picture (named by its file here), read once before anything runs."""
    import PIL.Image

    pictures = {}
    for position, key in enumerate(params.keyframes):
        try:
            pictures[key.image] = PIL.Image.open(key.image).convert("RGB")
        except OSError as error:
            console.print(f"[red]keyframes[{position}]: cannot read {key.image} ({error})[/red]")
            raise typer.Exit(2) from None
    return pictures


def _video_request(
    params: VideoParams,
    pictures: dict[str, PIL.Image.Image],
    video: np.ndarray | None = None,
    keyframes: list | None = None,
) -> VideoRequest:
    """The engine's request: keyframe pictures at the clip's size."""
    import PIL.Image

    from genserve.engine.video.pipelines import VideoRequest

    size = (params.width, params.height)
    if keyframes is None:
        keyframes = []
        for key in params.keyframes:
            picture = pictures[key.image]
            if picture.size != size:
                picture = picture.resize(size, PIL.Image.LANCZOS)
            keyframes.append((key.frame_index, picture))
    control = None
    if params.sparsectrl is not None:  # checked by resolve_video
        from genserve.engine.models.controls import scan_controls

        settings = Settings()
        control = scan_controls(settings.models_dir, builtin=settings.builtin_models)[params.sparsectrl.model]
    return VideoRequest(params=params, keyframes=keyframes, video=video, preview_every=0, sparsectrl=control)


def _segment_request(segment: VideoSegment, pictures: dict, before: np.ndarray | None) -> VideoRequest:
    """A segment's request; a continuing one starts from the segment before it (worker/video.py)."""
    import PIL.Image

    params = segment.params
    if not segment.continues:
        return _video_request(params, pictures)
    if params.mode == "i2v":  # image-to-video: start from the last frame
        return _video_request(params, pictures, keyframes=[(0, PIL.Image.fromarray(before[-1]))])
    return _video_request(params, pictures, video=before[-segment.overlap :])  # a clip condition


def _video_remote(params: VideoParams, output: Path, server: str) -> dict:
    """Submit to a server's /v1/video/jobs, follow the job's events with a bar, download the file."""
    import base64

    import httpx

    body = params.model_dump(exclude_none=True, exclude_defaults=True)
    body["mode"] = params.mode
    body["output"] = params.output.model_dump(exclude_none=True)
    keyframes = []
    for position, key in enumerate(params.keyframes):
        try:
            data = Path(key.image).read_bytes()
        except OSError as error:
            console.print(f"[red]keyframes[{position}]: cannot read {key.image} ({error.strerror})[/red]")
            raise typer.Exit(2) from None
        keyframes.append({"image": base64.b64encode(data).decode(), "frame_index": key.frame_index})
    if keyframes:
        body["keyframes"] = keyframes
    with httpx.Client(base_url=server.rstrip("/"), timeout=httpx.Timeout(30.0, read=None)) as client:
        response = client.post("/v1/video/jobs", json=body)
        if response.status_code == 422:
            for item in response.json().get("detail", []):
                loc = ".".join(str(part) for part in item.get("loc", [])[1:]) or "request"
                console.print(f"[red]{loc}: {item.get('msg')}[/red]")
            raise typer.Exit(2)
        response.raise_for_status()
        job = response.json()
        with client.stream("GET", job["events_url"]) as events:
            final = _follow_video_events(events.iter_lines(), job["params"]["steps"])
        if final["type"] != "succeeded":
            console.print(f"[red]video {final['type']}: {final['data'].get('error', '')}[/red]")
            raise typer.Exit(1)
        job = client.get(f"/v1/video/jobs/{job['id']}").raise_for_status().json()
        output.write_bytes(client.get(job["outputs"]["video"]["url"]).raise_for_status().content)
    return job.get("report") or {}


def _follow_video_events(lines: object, steps: int) -> dict:
    """Drive a bar from a video job's SSE stream (stage, segment k of K, step i of S)."""
    event_type, final = None, None
    with _video_progress() as progress:
        task = progress.add_task("queued", total=steps, detail="")
        for line in lines:
            if line.startswith("event:"):
                event_type = line.split(":", 1)[1].strip()
                continue
            if not line.startswith("data:"):
                continue
            data = json.loads(line.split(":", 1)[1])
            if event_type == "stage":
                where = f"segment {data['segment'] + 1} of {data['segments']}" if "segment" in data else ""
                progress.update(task, description=data["stage"], detail=where)
            elif event_type == "progress":
                where = f"segment {data['segment'] + 1} of {data['segments']} · " if "segment" in data else ""
                progress.update(
                    task,
                    description=data.get("stage", "denoise"),
                    completed=data["step"],
                    total=data["steps"],
                    detail=f"{where}step {data['step']}/{data['steps']}",
                )
            elif event_type == "segment_ready":
                console.print(f"segment {data['segment'] + 1} of {data['segments']} ready: {data['url']}")
            elif event_type in ("succeeded", "failed", "canceled"):
                final = {"type": event_type, "data": data}
                break
    if final is None:
        console.print("[red]the event stream ended before the video finished[/red]")
        raise typer.Exit(1)
    return final


@app.command()
def video(
    prompt: Annotated[str, typer.Argument(help="What happens in the clip.")] = "",
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Output file; its suffix picks the container.")
    ] = Path("clip.mp4"),
    negative_prompt: Annotated[str, typer.Option(help="What to steer away from.")] = "",
    model: Annotated[str | None, typer.Option(help="Video model (the default one if omitted).")] = None,
    mode: Annotated[str, typer.Option(help="t2v, i2v, flf2v, keyframes or v2v.")] = "t2v",
    keyframe: Annotated[
        list[str] | None,
        typer.Option("--keyframe", help="PATH@INDEX: a picture at a frame (repeat; i2v 1, flf2v 2)."),
    ] = None,
    frames: Annotated[int | None, typer.Option(help="Frames generated (before interpolation).")] = None,
    seconds: Annotated[float | None, typer.Option(help="Instead of --frames: seconds at --fps.")] = None,
    fps: Annotated[
        int | None, typer.Option(help="Frames per second (the model's default if omitted).")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps (the model's default).")] = None,
    guidance: Annotated[float | None, typer.Option(help="Guidance scale (the model's default).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (random if omitted).")] = None,
    width: Annotated[int | None, typer.Option(help="Width in pixels (model native if omitted).")] = None,
    height: Annotated[int | None, typer.Option(help="Height in pixels (model native if omitted).")] = None,
    interpolate: Annotated[int, typer.Option(help="RIFE frame interpolation: 1, 2 or 4.")] = 1,
    deflicker: Annotated[bool, typer.Option(help="Even out brightness from frame to frame.")] = False,
    denoise: Annotated[bool, typer.Option(help="Temporal denoise.")] = False,
    codec: Annotated[str | None, typer.Option(help="mp4: h264|av1; webm: vp9|av1.")] = None,
    crf: Annotated[int | None, typer.Option(help="Quality (lower is better).")] = None,
    long_segment_frames: Annotated[int | None, typer.Option(help="A long clip: frames per segment.")] = None,
    overlap: Annotated[int, typer.Option(help="Long clip: frames neighbouring segments share.")] = 0,
    strategy: Annotated[
        str, typer.Option(help="Long clip: keyframe_parallel, extend or free_noise.")
    ] = "keyframe_parallel",
    sparsectrl: Annotated[
        str | None,
        typer.Option(
            help="AnimateDiff keyframes: a SparseCtrl model in models/controlnet/ (--mode keyframes)."
        ),
    ] = None,
    server: Annotated[str | None, typer.Option(help="Run on a genserve server at this URL instead.")] = None,
) -> None:
    """Make a video clip locally, or on a server with --server."""
    keyframes = [_parse_keyframe(text) for text in keyframe or []]
    params = _video_params(
        prompt=prompt,
        negative_prompt=negative_prompt,
        model=model,
        mode=mode,
        keyframes=[{"image": str(path), "frame_index": index} for path, index in keyframes],
        num_frames=frames,
        seconds=seconds,
        fps=fps,
        steps=steps,
        guidance=guidance,
        seed=seed,
        width=width,
        height=height,
        post={"interpolate": interpolate, "deflicker": deflicker, "denoise": denoise},
        output={"container": _video_container(output), "codec": codec, "crf": crf},
        long={"segment_frames": long_segment_frames, "overlap": overlap, "strategy": strategy}
        if long_segment_frames is not None
        else None,
        sparsectrl={"model": sparsectrl} if sparsectrl else None,
    )
    report = _video_remote(params, output, server) if server else _video_local(params, output)
    console.print(f"wrote {output}")
    console.print(f"{report.get('frames')} frames at {report.get('fps')} fps ({report.get('seconds')} s)")
    for name, value in (report.get("metrics") or {}).items():
        console.print(f"  {name}: {value}")


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
    upscaler: Annotated[
        str | None, typer.Option(help="Measure this upscaler's seconds per output megapixel instead.")
    ] = None,
    video: Annotated[
        str | None, typer.Option("--video", help="Measure this video model's speed scale instead.")
    ] = None,
    frames: Annotated[int | None, typer.Option(min=1, help="--video: frames (model default).")] = None,
    width: Annotated[int | None, typer.Option(min=8, help="--video: width (model default).")] = None,
    height: Annotated[int | None, typer.Option(min=8, help="--video: height (model default).")] = None,
    video_steps: Annotated[int, typer.Option(min=3, help="--video: denoising steps to time.")] = 4,
) -> None:
    """Measure the cost model's O and t_step on this machine and store them for `plan` and the server;
    with --video, a video model's speed relative to the published figures."""
    from genserve.engine.engine import Engine, EngineError, engine_optimizations
    from genserve.engine.models.registry import registered_models
    from genserve.scheduler.calibrate import calibrate as run_calibration
    from genserve.scheduler.calibrate import runs_per_point
    from genserve.store.calibration import CalibrationStore

    settings = _settings(models_dir=models_dir, store_url=store, device=device)
    if upscaler is not None:
        _calibrate_upscaler(settings, upscaler, repeats)
        return
    if video is not None:
        _calibrate_video(settings, video, frames=frames, width=width, height=height, steps=video_steps)
        return
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


def _calibrate_upscaler(settings: Settings, name: str, repeats: int) -> None:
    """`genserve calibrate --upscaler NAME`: seconds per output megapixel, stored for `plan --upscale`."""
    from genserve.engine.models.loading import resolve_device, resolve_dtype
    from genserve.engine.models.upscalers import scan_upscalers
    from genserve.engine.upscale.stage import PostStage
    from genserve.scheduler.calibrate import calibrate_upscaler
    from genserve.store.calibration import CalibrationStore

    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    device = resolve_device(settings.device)
    post = PostStage(scan_upscalers(settings.models_dir, builtin=settings.builtin_models), device=device,
                     dtype=resolve_dtype(settings.dtype, device))  # fmt: skip
    try:
        timing = calibrate_upscaler(post, name, repeats=repeats)
    except Exception as error:  # unknown name, spandrel missing, a file it cannot load
        console.print(f"[red]calibration failed: {error}[/red]")
        raise typer.Exit(1) from None
    CalibrationStore.from_url(settings.resolved_store_url).save(timing)
    console.print(f"{name} on {timing.device}: {timing.step_s:.4f} s per output megapixel "
                  f"(stored in {_display_url(settings.resolved_store_url)})")  # fmt: skip


def _calibrate_video(settings: Settings, name: str, **size: int | None) -> None:
    """`genserve calibrate --video NAME`: time its denoising steps here, store measured / predicted."""
    from genserve.api.video_submission import resolve_video
    from genserve.engine.engine import EngineError
    from genserve.engine.models.registry import registered_models
    from genserve.scheduler.video_calibrate import calibrate_video_model, calibration_request
    from genserve.store.video_calibration import VideoCalibrationStore

    models = registered_models(settings)
    with _progress() as progress:
        task = progress.add_task(f"loading {name}", total=2)
        try:
            if name not in models:
                raise ValueError(f"'{name}' is not a video model in {settings.models_dir}")
            info = models[name]
            # Checked as a request would be: frame rules, sizes, the model's defaults.
            resolved, _ = resolve_video(calibration_request(info, **size), models, settings)
            base = models.get(info.base_model) if info.base_model else None
            result = calibrate_video_model(
                settings, info, resolved, base=base,
                on_run=lambda what: progress.update(task, advance=1, description=what),
            )  # fmt: skip
        except LimitError as error:
            console.print(f"[red]{error.field}: {error.message}[/red]")
            raise typer.Exit(2) from None
        except (EngineError, ValueError, RuntimeError, OSError) as error:
            console.print(f"[red]calibration failed: {error}[/red]")
            raise typer.Exit(1) from None
    timing = result.timing
    VideoCalibrationStore.from_url(settings.resolved_store_url).save(timing)
    table = Table(
        "device", "model", "frames", "size", "steps", "measured s/step", "published s/step", "scale"
    )
    table.add_row(
        timing.device,
        timing.model,
        str(result.frames),
        f"{result.width}x{result.height}",
        str(result.steps),
        f"{result.measured_step_s:.5f}",
        f"{result.predicted_step_s:.5f}",
        f"{timing.scale:.4g}",
    )
    Console().print(table)
    console.print(f"stored the scale in {_display_url(settings.resolved_store_url)}")


def _store_exists(url: str) -> bool:
    """False for a SQLite store whose file is not there yet: planning reads it, and must not create it."""
    import sqlalchemy as sa

    sa_url = sa.make_url(url)
    return sa_url.get_backend_name() != "sqlite" or Path(sa_url.database or "").is_file()


def _read_timings(url: str) -> list:  # list[StepTiming]; the store module is imported lazily
    """Stored timings; none (and no file created) when the SQLite store does not exist yet."""
    from genserve.store.calibration import CalibrationStore

    return CalibrationStore.from_url(url).all() if _store_exists(url) else []


@app.command()
def plan(
    model: Annotated[
        str | None, typer.Option(help="Model name, or a family (sd15, sdxl, sd3) for one not installed.")
    ] = None,
    width: Annotated[int | None, typer.Option(help="Width in pixels (model native if omitted).")] = None,
    height: Annotated[int | None, typer.Option(help="Height in pixels (model native if omitted).")] = None,
    steps: Annotated[
        int | None, typer.Option(min=1, help="Denoising steps (20; a video model's default with --video).")
    ] = None,
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
    video: Annotated[
        bool, typer.Option("--video", help="Plan a video clip: GPU-seconds and cost per video-second.")
    ] = False,
    frames: Annotated[int | None, typer.Option(min=1, help="--video: frames generated.")] = None,
    seconds: Annotated[
        float | None, typer.Option(help="--video: instead of --frames, seconds at --fps.")
    ] = None,
    fps: Annotated[int | None, typer.Option(min=1, help="--video: frames per second.")] = None,
    mode: Annotated[str, typer.Option(help="--video: t2v, i2v, flf2v, keyframes or v2v.")] = "t2v",
    keyframes: Annotated[
        int | None,
        typer.Option(min=1, help="--video: keyframes (evenly spaced; the mode's least if omitted)."),
    ] = None,
    interpolate: Annotated[int, typer.Option(help="--video: RIFE interpolation 1, 2 or 4.")] = 1,
    long_segment_frames: Annotated[int | None, typer.Option(help="--video: frames per segment.")] = None,
    overlap: Annotated[int, typer.Option(help="--video: frames neighbouring segments share.")] = 0,
    strategy: Annotated[
        str, typer.Option(help="--video: keyframe_parallel, extend or free_noise.")
    ] = "keyframe_parallel",
    clips: Annotated[int | None, typer.Option(min=1, help="--video: clips to plan for.")] = None,
    upscale: Annotated[
        float | None, typer.Option(help="Add an upscale ×N after decode (calibrate --upscaler measures it).")
    ] = None,
    upscaler: Annotated[str | None, typer.Option(help="The upscaler for --upscale.")] = None,
) -> None:
    """Time per image, images/hour, cost per 1,000 images and GPU-hours, from the cost model; with
    --video, GPU-seconds, seconds of video, and cost per clip and per video-second."""
    from genserve.engine.models.registry import DEFAULT_NATIVE_SIZE, registered_models
    from genserve.scheduler.cost import default_device, estimate, lookup

    settings = _settings(models_dir=models_dir, store_url=store)
    if video:
        fields = dict(
            model=model, family=family, width=width, height=height, frames=frames, seconds=seconds,
            fps=fps, mode=mode, keyframes=keyframes, interpolate=interpolate, gpu_price=gpu_price,
            clips=clips, long=None if long_segment_frames is None else {
                "segment_frames": long_segment_frames, "overlap": overlap, "strategy": strategy},
            steps=steps, device=device,
        )  # fmt: skip
        _plan_video(settings, **fields)
        return
    steps = steps or 20
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
    if upscale is not None:
        from genserve.engine.models.upscalers import DEFAULT_UPSCALER
        from genserve.scheduler.cost import upscale_rate, upscale_seconds

        chosen = upscaler or DEFAULT_UPSCALER
        rate, source = upscale_rate(timings, chosen, device)
        out_pixels = round(width * upscale) * round(height * upscale)
        extra = upscale_seconds(out_pixels, device=device, s_per_megapixel=rate)
        table.add_row(f"  + upscale ×{upscale:g} with {chosen} ({rate:.4f} s/MP, {source})", f"{extra:.3f} s")
        table.add_row("time per image with the upscale", f"{result.seconds_per_image + extra:.3f} s")
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


def _plan_video(
    settings: Settings,
    *,
    model: str | None,
    family: str | None,
    width: int | None,
    height: int | None,
    frames: int | None,
    seconds: float | None,
    fps: int | None,
    mode: str,
    keyframes: int | None,
    interpolate: int,
    long: dict | None,
    steps: int | None,
    gpu_price: float | None,
    clips: int | None,
    device: str | None = None,
) -> None:
    """The video cost model (engine/video/plan.py) for one request, as POST /v1/video/estimate has it."""
    from genserve.api.video_submission import estimated_video_seconds, resolve_video
    from genserve.engine.models.registry import ModelInfo, registered_models
    from genserve.engine.video.families import VIDEO_FAMILIES, VIDEO_PIPELINES, keyframes_needed
    from genserve.engine.video.plan import output_frames, output_seconds

    models = registered_models(settings)
    name = model or settings.default_video_model
    if name not in models:
        family = family or (name if name in VIDEO_FAMILIES else None)
        if family not in VIDEO_FAMILIES:
            console.print(
                f"[red]video model '{name}' is not in {settings.models_dir}; pass --family "
                f"({', '.join(VIDEO_FAMILIES)})[/red]"
            )
            raise typer.Exit(2)
        spec = VIDEO_FAMILIES[family]
        modes = tuple(dict.fromkeys(m for f, ms in VIDEO_PIPELINES.values() if f == family for m in ms))
        models = {name: ModelInfo(
            name=name, path=Path("."), family=family, format="diffusers", native_width=spec.default_width,
            native_height=spec.default_height, dtype="unknown", kind="video", video_modes=modes)}  # fmt: skip
    info = models[name]
    spec = VIDEO_FAMILIES.get(info.family)
    guess = (
        frames
        or (round(seconds * (fps or info.default_fps or spec.default_fps)) if seconds and spec else None)
        or info.default_frames
        or (spec.default_frames if spec else 1)
    )
    least, _ = keyframes_needed(mode) if mode in ("t2v", "i2v", "flf2v", "keyframes", "v2v") else (0, 0)
    count = keyframes or least
    indexes = [round(i * (guess - 1) / (count - 1)) for i in range(count)] if count > 1 else [0] * count
    placeholder = "sha256:" + "0" * 64  # planning stores nothing
    params = _video_params(
        model=name, mode=mode, prompt="plan", width=width, height=height, num_frames=frames,
        seconds=seconds, fps=fps, steps=steps, long=long, post={"interpolate": interpolate},
        keyframes=[{"image": placeholder, "frame_index": index} for index in indexes],
        video=placeholder if mode == "v2v" else None,
    )  # fmt: skip
    try:
        resolved, segments = resolve_video(params, models, settings)
    except LimitError as error:
        console.print(f"[red]{error.field}: {error.message}[/red]")
        raise typer.Exit(2) from None
    speed = _video_speed(settings, name, device)
    gpu_seconds = estimated_video_seconds(resolved, info.family, settings, speed)
    video_seconds = output_seconds(resolved)
    title = (
        f"{name} ({info.family}) {resolved.mode} {resolved.width}x{resolved.height}, "
        f"{resolved.num_frames} frames at {resolved.fps} fps, {resolved.steps} steps"
    )
    table = Table("figure", "value", title=title)
    table.add_row("segments", str(max(1, len(segments))))
    table.add_row("frames delivered", f"{output_frames(resolved)} (interpolate ×{interpolate})")
    table.add_row("seconds of video", f"{video_seconds:.3f} s")
    table.add_row("GPU-seconds per clip", f"{gpu_seconds:.3f} s")
    table.add_row("GPU-seconds per video-second", f"{gpu_seconds / video_seconds:.3f}")
    if gpu_price is not None:
        cost = gpu_price * gpu_seconds / 3600
        table.add_row(f"cost per clip (at {gpu_price:g}/GPU-hour)", f"{cost:,.4f}")
        table.add_row("cost per video-second", f"{cost / video_seconds:,.5f}")
        if clips:
            table.add_row(f"total cost for {clips:,} clips", f"{cost * clips:,.2f}")
    if clips:
        table.add_row(f"GPU-hours for {clips:,} clips", f"{gpu_seconds * clips / 3600:,.3f}")
    out = Console()
    out.print(table)
    out.print(f"basis: {speed.basis}", soft_wrap=True)


def _video_speed(settings: Settings, model: str, device: str | None) -> VideoSpeed:
    """The stored video calibration of (device, model) (none, and no file made, without a store)."""
    from genserve.scheduler.video_cost import VideoSpeed
    from genserve.store.video_calibration import VideoCalibrationStore

    url = settings.resolved_store_url
    if not _store_exists(url):
        return VideoSpeed.published(settings.video_speed_scale)
    return VideoCalibrationStore.from_url(url).speed(model, settings.video_speed_scale, device)


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

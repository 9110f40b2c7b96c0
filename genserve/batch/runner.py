"""Running a batch: submit its items as jobs (idempotent by item key), follow them, write outputs
and the manifest. The same functions serve `genserve batch run` (local worker) and /v1/batches.
Video items are video jobs (as POST /v1/video/jobs makes them), keyed and de-duplicated the same way."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import PIL.Image

from genserve.api.submission import estimated_seconds
from genserve.api.video_submission import VideoJobCreate, submit_video
from genserve.artifacts.images import ImageStore
from genserve.artifacts.inputs import InputStore
from genserve.artifacts.videos import VideoStore
from genserve.batch.expand import RenderItem, VideoItem
from genserve.batch.spec import BatchSpec
from genserve.config import Settings
from genserve.engine.models.registry import ModelInfo
from genserve.schemas import GenerationParams, JobState
from genserve.schemas.generation import batch_key
from genserve.store.jobs import JobRecord, JobStore

MANIFEST_FIELDS = [
    "index", "key", "state", "prompt", "negative_prompt", "model", "width", "height", "steps",
    "cfg_scale", "sampler", "seed", "init_image", "strength", "file", "sha256", "job_id", "attempts", "error",
    "created_at", "started_at", "finished_at", "seconds",
]  # fmt: skip


VIDEO_MANIFEST_FIELDS = [
    "index", "key", "state", "prompt", "negative_prompt", "model", "mode", "width", "height", "num_frames",
    "fps", "steps", "guidance", "seed", "segments", "container", "init_image", "file", "sha256", "job_id",
    "attempts", "error", "created_at", "started_at", "finished_at", "seconds",
]  # fmt: skip


def request_id_for(item: RenderItem | VideoItem, key_id: str | None = None) -> str:
    """The item's idempotency key, scoped to an API key the way the jobs API scopes request ids."""
    return f"item:{item.key}" if key_id is None else f"{key_id}:item:{item.key}"


def submit_items(
    store: JobStore,
    items: list[RenderItem],
    spec: BatchSpec,
    models: dict[str, ModelInfo],
    client_id: str | None = None,
    key_id: str | None = None,
) -> dict[str, str]:
    """Queue every item on the long queue; returns item key → job id.

    An item already known (this spec run before, or another spec sharing it) keeps its job: done items
    are not rendered again, and failed or canceled ones get `retries` more attempts. With an API key
    (`key_id`), items are known per key: one key never receives another key's images.
    """
    estimates: dict[tuple, float] = {}
    job_ids = {}
    for item in items:
        group = cost_group(item.params)
        if group not in estimates:
            estimates[group] = estimated_seconds(item.params, models[item.params.model].family, store)
        job, created = store.submit(
            item.params.model_dump(),
            request_id=request_id_for(item, key_id),
            client_id=client_id,
            request_hash=item.key,
            priority=spec.priority,
            max_attempts=spec.retries,
            queue="long",
            estimated_seconds=estimates[group],
            retry_on_error=True,
        )
        if not created and job.state in (JobState.failed, JobState.canceled):
            store.reopen(job.id, spec.retries)
        job_ids[item.key] = job.id
    return job_ids


def video_job_body(item: VideoItem, spec: BatchSpec, request_id: str) -> VideoJobCreate:
    """The POST /v1/video/jobs body of a video item: its resolved request, so it resolves the same."""
    return VideoJobCreate.model_validate(
        {**item.params.model_dump(), "request_id": request_id, "priority": spec.priority}
    )


def submit_video_items(
    store: JobStore,
    items: list[VideoItem],
    spec: BatchSpec,
    models: dict[str, ModelInfo],
    settings: Settings,
    inputs: InputStore,
    client_id: str | None = None,
) -> dict[str, str]:
    """Queue every video item as a video job (segments and all); returns item key → job id. As with
    pictures, an item already known keeps its job, and a failed or canceled one-pass clip is reopened."""
    job_ids = {}
    for item in items:
        body = video_job_body(item, spec, request_id_for(item))
        job, created = submit_video(body, models, settings, store, inputs, client_id)
        if not created and not item.segments and job.state in (JobState.failed, JobState.canceled):
            store.reopen(job.id, spec.retries)
        job_ids[item.key] = job.id
    return job_ids


def cost_group(params: GenerationParams) -> tuple:
    """Items that cost the same: one batch key, and (img2img) the same strength, so the same steps."""
    return (*batch_key(params), params.strength if params.init_image is not None else None)


def progress_counts(store: JobStore, job_ids: list[str], total: int) -> dict[str, int]:
    """The batch's total and its items per state."""
    return {"total": total, **store.counts_for(job_ids)}


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "item"


def output_name(spec: BatchSpec, item: RenderItem) -> str:
    p = item.params
    ext = "jpg" if spec.output.format == "jpeg" else spec.output.format
    fields = dict(
        index=item.index, key=item.key, seed=p.seed, model=p.model, width=p.width, height=p.height,
        steps=p.steps, cfg_scale=p.cfg_scale, sampler=p.sampler, slug=slug(p.prompt), ext=ext,
    )  # fmt: skip
    return spec.output.pattern.format(**fields)


def video_output_name(spec: BatchSpec, item: VideoItem) -> str:
    p = item.params
    fields = dict(
        index=item.index, key=item.key, seed=p.seed, model=p.model, width=p.width, height=p.height,
        steps=p.steps, cfg_scale=p.guidance, sampler="", frames=p.num_frames, fps=p.fps, mode=p.mode,
        slug=slug(p.prompt), ext=p.output.container,
    )  # fmt: skip
    return spec.output.pattern.format(**fields)


def write_file(source: Path, target: Path) -> str:
    """Copy a finished file to the output folder (atomically); returns its sha256."""
    data = source.read_bytes()
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_bytes(data)
    temporary.replace(target)
    return hashlib.sha256(data).hexdigest()


def write_output(png_path: Path, target: Path, fmt: str) -> str:
    """Write the item's image in the spec's format (atomically); returns its sha256."""
    if fmt == "png":
        data = png_path.read_bytes()  # the PNG as generated, with its parameters chunks
    else:
        buffer = io.BytesIO()
        PIL.Image.open(png_path).convert("RGB").save(buffer, format=fmt.upper(), quality=92)
        data = buffer.getvalue()
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_bytes(data)
    temporary.replace(target)
    return hashlib.sha256(data).hexdigest()


def _job_columns(job: JobRecord | None) -> dict:
    """A manifest row's output and job columns, the same for picture and video items (the output
    columns are filled in once the file is written)."""
    started, finished = (job.started_at, job.finished_at) if job else (None, None)
    return {
        "file": None, "sha256": None, "job_id": job.id if job else None, "attempts": job.attempt if job else 0,
        "error": job.error if job and job.state != JobState.succeeded else None,
        "created_at": job.created_at.isoformat() if job else None,
        "started_at": started.isoformat() if started else None,
        "finished_at": finished.isoformat() if finished else None,
        "seconds": round((finished - started).total_seconds(), 3) if started and finished else None,
    }  # fmt: skip


def manifest_rows(
    spec: BatchSpec,
    items: list[RenderItem],
    job_ids: dict[str, str],
    jobs: dict[str, JobRecord],
    images: ImageStore,
    out_dir: Path | None,
) -> list[dict]:
    """One row per item; writes output files for finished items when `out_dir` is given."""
    rows = []
    for item in items:
        job = jobs.get(job_ids.get(item.key, ""))
        p = item.params
        row = {
            "index": item.index, "key": item.key, "state": job.state.value if job else "unknown",
            "prompt": p.prompt, "negative_prompt": p.negative_prompt, "model": p.model, "width": p.width,
            "height": p.height, "steps": p.steps, "cfg_scale": p.cfg_scale, "sampler": p.sampler, "seed": p.seed,
            "init_image": p.init_image, "strength": p.strength if p.init_image else None,
            **_job_columns(job),
        }  # fmt: skip
        if job and job.state == JobState.succeeded and job.image_ids:
            source = images.path(job.image_ids[0])
            if out_dir is not None:
                name = output_name(spec, item)
                row["sha256"] = write_output(source, out_dir / name, spec.output.format)
                row["file"] = name
            else:
                row["file"] = f"/v1/images/{job.image_ids[0]}"
                row["sha256"] = hashlib.sha256(source.read_bytes()).hexdigest()
        rows.append(row)
    return rows


def video_manifest_rows(
    spec: BatchSpec,
    items: list[VideoItem],
    job_ids: dict[str, str],
    jobs: dict[str, JobRecord],
    videos: VideoStore,
    out_dir: Path | None,
) -> list[dict]:
    """One row per video item; writes the clips of finished items when `out_dir` is given."""
    rows = []
    for item in items:
        job = jobs.get(job_ids.get(item.key, ""))
        p = item.params
        row = {
            "index": item.index, "key": item.key, "state": job.state.value if job else "unknown",
            "prompt": p.prompt, "negative_prompt": p.negative_prompt, "model": p.model, "mode": p.mode,
            "width": p.width, "height": p.height, "num_frames": p.num_frames, "fps": p.fps, "steps": p.steps,
            "guidance": p.guidance, "seed": p.seed, "segments": item.segments, "container": p.output.container,
            "init_image": p.keyframes[0].image if p.keyframes else None,
            **_job_columns(job),
        }  # fmt: skip
        name = f"{job.id}.{p.output.container}" if job else ""
        if job and job.state == JobState.succeeded and videos.exists(name):
            source = videos.path(name)
            if out_dir is not None:
                row["file"] = video_output_name(spec, item)
                row["sha256"] = write_file(source, out_dir / row["file"])
            else:
                row["file"] = f"/v1/video/files/{name}"
                row["sha256"] = hashlib.sha256(source.read_bytes()).hexdigest()
        rows.append(row)
    return rows


def manifest_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def manifest_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    video = bool(rows) and "num_frames" in rows[0]
    writer = csv.DictWriter(buffer, fieldnames=VIDEO_MANIFEST_FIELDS if video else MANIFEST_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


@dataclass
class ManifestFiles:
    jsonl: Path
    csv: Path


def write_manifest(rows: list[dict], out_dir: Path) -> ManifestFiles:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = ManifestFiles(out_dir / "manifest.jsonl", out_dir / "manifest.csv")
    files.jsonl.write_text(manifest_jsonl(rows))
    files.csv.write_text(manifest_csv(rows))
    return files

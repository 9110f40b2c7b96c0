"""The driver: runs a planned workflow by submitting its stages as ordinary genserve jobs.

It lives in the API process (an asyncio task per prompt) and never blocks a worker: a stage is
submitted once the stages it reads from have finished, and the driver polls the store for the
results. Every stage's job carries a request id derived from the stage's key, so submitting a
stage whose job already succeeded returns that job (the store's idempotency): that is the node
cache, durable across restarts. A prompt still running when the server stops is driven again on
start; its finished stages are found in the cache.

Messages are ComfyUI's websocket messages (`execution_start`, `execution_cached`, `executing`,
`progress`, `executed`, `execution_success`, `execution_error`, `execution_interrupted`), given to
`emit`; binary previews to `emit_binary`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import PIL.Image

from genserve.artifacts.images import ImageStore
from genserve.artifacts.inputs import InputStore
from genserve.artifacts.videos import VideoStore
from genserve.schemas.jobs import JobState
from genserve.store.jobs import IdempotencyConflict, JobRecord, JobStore
from genserve.workflows.plan import STAGE_REF, Output, Plan, Stage

log = logging.getLogger(__name__)

CACHE_PREFIX = "wf:"  # request ids of stage jobs: "wf:<stage key>[.<retry>]"
MAX_RETRIES = 5  # a failed or canceled cached job is retried under "<key>.1", "<key>.2", ...
PREVIEW_IMAGE = 1  # ComfyUI's binary event type for a preview; then the format: 1 JPEG, 2 PNG
_FORMATS = {"image/jpeg": 1, "image/png": 2}
_RESAMPLE = {
    "nearest-exact": PIL.Image.Resampling.NEAREST,
    "bilinear": PIL.Image.Resampling.BILINEAR,
    "area": PIL.Image.Resampling.BOX,
    "bicubic": PIL.Image.Resampling.BICUBIC,
    "lanczos": PIL.Image.Resampling.LANCZOS,
}
_UNSAFE = re.compile(r"[^A-Za-z0-9._ -]+")


class StageFailed(Exception):
    def __init__(self, node: str, message: str, interrupted: bool = False) -> None:
        super().__init__(message)
        self.node, self.message, self.interrupted = node, message, interrupted


class Submitter(Protocol):
    """Submits stage jobs as the prompt's caller (limits, quotas, identity). Raises LimitError."""

    def image(self, params: dict[str, Any], request_id: str) -> tuple[JobRecord, bool]: ...
    def upscale(self, image: str, model: str, scale: float, request_id: str) -> tuple[JobRecord, bool]: ...
    def video(self, params: dict[str, Any], request_id: str) -> tuple[JobRecord, bool]: ...


Emit = Callable[[str | None, str, dict[str, Any]], None]
EmitBinary = Callable[[str | None, bytes], None]


def preview_frame(data_url: str) -> bytes | None:
    """A preview event's data URL as ComfyUI's binary frame: event type, image format, bytes."""
    head, _, payload = data_url.partition(",")
    media = head.removeprefix("data:").split(";")[0]
    if media not in _FORMATS or not payload:
        return None
    return struct.pack(">II", PREVIEW_IMAGE, _FORMATS[media]) + base64.b64decode(payload)


def output_filename(prefix: str, image_id: str, extension: str = "png") -> tuple[str, str]:
    """(subfolder, filename) of an output picture or clip: ComfyUI's prefix with the image id (a
    video job's id for a clip), which `GET /view` reads back (neither holds an underscore)."""
    folder, _, stem = prefix.replace("\\", "/").rpartition("/")
    stem = _UNSAFE.sub("_", stem).strip() or "ComfyUI"
    folder = "/".join(
        part for part in (_UNSAFE.sub("_", p) for p in folder.split("/")) if part not in ("", ".", "..")
    )
    return folder, f"{stem}_{image_id}.{extension}"


def image_id_from_filename(filename: str) -> str | None:
    stem = filename.removesuffix(".png")
    return stem.rpartition("_")[2] or None


APNG_PREFIX = "wfa"  # a SaveAnimatedPNG's APNG in the image store: "wfa<video job id>"


def apng_from_webp(webp: bytes) -> bytes:
    """An animated WebP as an APNG with the same frames and durations (Pillow)."""
    with PIL.Image.open(io.BytesIO(webp)) as clip:
        frames, durations = [], []
        for index in range(clip.n_frames):
            clip.seek(index)
            frames.append(clip.convert("RGB"))
            durations.append(clip.info.get("duration", 100))
    buffer = io.BytesIO()
    frames[0].save(buffer, format="PNG", save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return buffer.getvalue()


@dataclass
class Run:
    prompt_id: str
    client_id: str | None
    plan: Plan
    previews: bool = False
    done: dict[str, list[str]] = field(default_factory=dict)  # stage key -> image ids
    jobs: dict[str, list[str]] = field(default_factory=dict)  # stage key -> job ids
    seen: dict[str, int] = field(default_factory=dict)  # job id -> last event seq read
    started: set[str] = field(default_factory=set)  # stages whose job has begun running
    hits: set[str] = field(default_factory=set)  # stages whose jobs had succeeded before this run
    outputs: dict[str, Any] = field(default_factory=dict)
    messages: list[Any] = field(default_factory=list)

    @property
    def running(self) -> bool:
        """Past the queue: some stage has started or was found in the cache."""
        return bool(self.started or self.done)


class Driver:
    """Runs prompts; one instance per API process."""

    def __init__(
        self,
        store: JobStore,
        images: ImageStore,
        inputs: InputStore,
        emit: Emit,
        emit_binary: EmitBinary,
        poll_seconds: float = 0.05,
        videos: VideoStore | None = None,
    ) -> None:
        self.store, self.images, self.inputs, self.videos = store, images, inputs, videos
        self.emit, self.emit_binary = emit, emit_binary
        self.poll_seconds = poll_seconds
        self.runs: dict[str, Run] = {}

    async def drive(self, run: Run, submitter: Submitter) -> str:
        """Run the prompt to its end; returns its state (success or error). Never raises for a
        stage's failure: the prompt's messages and error say what happened. The caller stores the
        result, then sends `done` (as ComfyUI, whose clients read /history on it)."""
        self.runs[run.prompt_id] = run
        try:
            self._message(run, "execution_start", {})
            while not self._finished(run):
                await asyncio.to_thread(self._advance, run, submitter)
                self._emit_outputs(run)
                if not self._finished(run):
                    await asyncio.sleep(self.poll_seconds)
            self._message(run, "execution_success", {})
            return "success"
        except StageFailed as failure:
            kind = "execution_interrupted" if failure.interrupted else "execution_error"
            node = run.plan.graph.nodes.get(failure.node)
            data = {
                "node_id": failure.node,
                "node_type": node.class_type if node else "",
                "executed": sorted(run.outputs),
                "exception_message": failure.message,
                "exception_type": "Interrupted" if failure.interrupted else "ExecutionError",
                "traceback": [],
                "current_inputs": {},
                "current_outputs": {},
            }
            self._message(run, kind, data)
            return "error"
        finally:
            self.runs.pop(run.prompt_id, None)

    def _finished(self, run: Run) -> bool:
        return all(self._ready(run, output) for output in run.plan.outputs)

    @staticmethod
    def _ready(run: Run, output: Output) -> bool:
        return output.images.stage is None or output.images.stage in run.done

    def done(self, run: Run) -> None:
        """The prompt's last message: `executing` with node null."""
        self._emit(run, "executing", {"node": None})

    def _emit(self, run: Run, kind: str, data: dict[str, Any]) -> None:
        self.emit(run.client_id, kind, {**data, "prompt_id": run.prompt_id})

    def _message(self, run: Run, kind: str, data: dict[str, Any]) -> None:
        """A message that also goes into the prompt's history (status.messages)."""
        payload = {**data, "prompt_id": run.prompt_id, "timestamp": int(time.time() * 1000)}
        run.messages.append([kind, payload])
        self.emit(run.client_id, kind, payload)

    # -- one step of the loop (in a thread: it reads and writes the store) -----------------------

    def _advance(self, run: Run, submitter: Submitter) -> None:
        for stage in run.plan.stages.values():
            if stage.key in run.done:
                continue
            if stage.key not in run.jobs:
                if all(dep in run.done for dep in stage.deps):
                    self._start(run, stage, submitter)
                continue
            self._follow(run, stage)

    def _start(self, run: Run, stage: Stage, submitter: Submitter) -> None:
        if stage.kind == "scale":
            ids, cached = self._scale(run, stage)
            self._finish(run, stage, ids, cached)
            return
        try:
            if stage.kind == "image":
                params = _substitute(stage.params, lambda ref: self._as_input(run, ref))
                jobs = [self._submit(lambda rid: submitter.image(params, rid), stage.key, stage.main_node)]
            elif stage.kind == "video":
                jobs = [
                    self._submit(lambda rid: submitter.video(stage.params, rid), stage.key, stage.main_node)
                ]
            else:
                jobs = [
                    self._submit(
                        lambda rid, ref=ref: submitter.upscale(
                            self._as_input(run, ref), stage.params["model"], stage.params["scale"], rid
                        ),
                        f"{stage.key[:60]}u{index}",
                        stage.main_node,
                    )
                    for index, ref in enumerate(stage.params["source"])
                ]
        except ValueError as error:  # LimitError: a limit the plan could not see (a picture's size)
            raise StageFailed(stage.main_node, str(getattr(error, "message", error))) from None
        run.jobs[stage.key] = [job.id for job, _ in jobs]
        if all(hit for _, hit in jobs):
            run.hits.add(stage.key)
        self._follow(run, stage)

    def _submit(
        self, submit: Callable[[str], tuple[JobRecord, bool]], key: str, node: str
    ) -> tuple[JobRecord, bool]:
        """(the stage's job, whether it had succeeded already): the cached job unless it failed or
        was canceled, then a new one under the next request id."""
        for retry in range(MAX_RETRIES + 1):
            request_id = CACHE_PREFIX + key[:64] + (f".{retry}" if retry else "")
            try:
                job, created = submit(request_id)
            except IdempotencyConflict:  # the same stage from another picture (a re-made input)
                continue
            if job.state not in (JobState.failed, JobState.canceled):
                return job, not created and job.state == JobState.succeeded
        raise StageFailed(
            node, f"its job failed or conflicted {MAX_RETRIES + 1} times (request id wf:{key[:12]}…)"
        )

    def _follow(self, run: Run, stage: Stage) -> None:
        records = self.store.get_many(run.jobs[stage.key])
        jobs = [records[job_id] for job_id in run.jobs[stage.key]]
        for job in jobs:
            if job.state in (JobState.failed, JobState.canceled):
                interrupted = job.state == JobState.canceled
                reason = "interrupted" if interrupted else f"job {job.id} failed: {job.error}"
                raise StageFailed(stage.main_node, reason, interrupted)
        if stage.key not in run.hits:
            for job in jobs:
                if job.state != JobState.queued:
                    self._forward_events(run, stage, job)
        if all(job.state == JobState.succeeded for job in jobs):
            # A video stage's result is its job: the clip is "<job id>.<container>" in the video store.
            images = (
                [job.id for job in jobs] if stage.kind == "video" else [i for j in jobs for i in j.image_ids]
            )
            self._finish(run, stage, images, stage.key in run.hits)

    def _forward_events(self, run: Run, stage: Stage, job: JobRecord) -> None:
        if stage.key not in run.started:
            run.started.add(stage.key)
            self._emit(run, "executing", {"node": stage.main_node, "display_node": stage.main_node})
        for event in self.store.events.read_after(job.id, run.seen.get(job.id, 0)):
            run.seen[job.id] = event.seq
            if event.type == "progress":
                data = {"value": event.data["step"], "max": event.data["steps"], "node": stage.main_node}
                self._emit(run, "progress", data)
            elif event.type == "preview" and run.previews:
                for image in event.data.get("images", [])[:1]:
                    frame = preview_frame(image)
                    if frame is not None:
                        self.emit_binary(run.client_id, frame)

    def _finish(self, run: Run, stage: Stage, image_ids: list[str], cached: bool) -> None:
        run.done[stage.key] = image_ids
        if cached:
            self._message(run, "execution_cached", {"nodes": list(stage.nodes)})
            return
        for node in stage.nodes:  # the stage's other nodes (VAEDecode), or a resize that ran here
            if node != stage.main_node or stage.key not in run.started:
                self._emit(run, "executing", {"node": node, "display_node": node})

    # -- pictures ----------------------------------------------------------------------------------

    def _image_id(self, run: Run, ref: str) -> str:
        key, _, index = ref.removeprefix(STAGE_REF).rpartition(":")
        return run.done[key][int(index)]

    def _as_input(self, run: Run, ref: str) -> str:
        """A stage's picture as a stored input picture (`sha256:<hex>`), as jobs take them."""
        if not ref.startswith(STAGE_REF):
            return ref
        return self.inputs.put(self.images.path(self._image_id(run, ref)).read_bytes())

    def _read(self, run: Run, ref: str) -> bytes:
        if ref.startswith(STAGE_REF):
            return self.images.path(self._image_id(run, ref)).read_bytes()
        return self.inputs.get(ref)

    def _scale(self, run: Run, stage: Stage) -> tuple[list[str], bool]:
        """ImageScale in the driver (Pillow): cheap, and stored under ids derived from the key."""
        ids = [f"wfs{stage.key[:40]}-{index}" for index in range(stage.count)]
        if all(self.images.exists(image_id) for image_id in ids):
            return ids, True
        params = stage.params
        for image_id, ref in zip(ids, params["source"], strict=True):
            with PIL.Image.open(io.BytesIO(self._read(run, ref))) as picture:
                picture = picture.convert("RGB")
                if params["crop"] == "center":
                    picture = _crop_to_aspect(picture, params["width"] / params["height"])
                scaled = picture.resize((params["width"], params["height"]), _RESAMPLE[params["method"]])
            buffer = io.BytesIO()
            scaled.save(buffer, format="PNG")
            self.images.save(image_id, buffer.getvalue())
        return ids, False

    def _output_ids(self, run: Run, output: Output) -> list[str]:
        if output.images.stage is not None:
            return run.done[output.images.stage]
        ids = []
        for ref in output.images.refs:  # a loaded picture saved as it is
            image_id = "wfi" + ref.removeprefix("sha256:")[:40]
            if not self.images.exists(image_id):
                self.images.save(image_id, self.inputs.get(ref))
            ids.append(image_id)
        return ids

    def _emit_outputs(self, run: Run) -> None:
        for output in run.plan.outputs:
            if output.node in run.outputs or not self._ready(run, output):
                continue
            images = []
            for image_id in self._output_ids(run, output):
                name, extension = image_id, output.extension
                if output.video and extension == "png":
                    name = self._apng(image_id)
                subfolder, filename = output_filename(output.prefix, name, extension)
                images.append({"filename": filename, "subfolder": subfolder, "type": output.kind})
            # ComfyUI's animated outputs (SaveAnimatedWEBP/PNG, SaveWEBM, SaveVideo) list their
            # files under `images` with `animated: [true]`.
            result: dict[str, Any] = (
                {"images": images, "animated": [True]} if output.video else {"images": images}
            )
            run.outputs[output.node] = result
            self._emit(run, "executing", {"node": output.node, "display_node": output.node})
            self._emit(
                run,
                "executed",
                {"node": output.node, "display_node": output.node, "output": result},
            )

    def _apng(self, job_id: str) -> str:
        """SaveAnimatedPNG's file: the video job's WebP as an APNG in the image store."""
        image_id = APNG_PREFIX + job_id
        if not self.images.exists(image_id):
            assert self.videos is not None, "a Driver that runs video outputs needs the video store"
            self.images.save(image_id, apng_from_webp(self.videos.read(f"{job_id}.webp")))
        return image_id


def _crop_to_aspect(picture: PIL.Image.Image, aspect: float) -> PIL.Image.Image:
    width, height = picture.size
    if width / height > aspect:
        new = round(height * aspect)
        left = (width - new) // 2
        return picture.crop((left, 0, left + new, height))
    new = round(width / aspect)
    top = (height - new) // 2
    return picture.crop((0, top, width, top + new))


def _substitute(params: dict[str, Any], resolve: Callable[[str], str]) -> dict[str, Any]:
    """`params` with every stage picture ("stage:<key>:<i>") replaced by a stored picture id."""

    def walk(value: Any) -> Any:
        if isinstance(value, str) and value.startswith(STAGE_REF):
            return resolve(value)
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return walk(params)

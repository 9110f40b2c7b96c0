"""ComfyUI's HTTP API, the subset scripts use, over genserve's workflow runner (genserve/workflows/).

`POST /prompt` validates the whole graph (400 with ComfyUI's `error` and `node_errors` keyed by
node id), plans it into genserve jobs and starts a driver in this process; `GET /history`,
`/view`, `/queue`, `POST /upload/image`, `/interrupt`, `GET /object_info`. The websocket is in
comfy_ws.py. `POST /v1/workflows/validate` answers genserve's own 422 shape.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Annotated, Any

import PIL.Image
from fastapi import APIRouter, Body, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from genserve.api.deps import Services, ServicesDep
from genserve.api.forms import FORM_SLACK_BYTES, form_file, read_form, too_large
from genserve.api.input_guard import InputProblem, check_json
from genserve.api.routes.comfy_ws import Hub, hub_of
from genserve.api.routes.upscale import submit_upscale_as
from genserve.api.routes.videos import submit_video_as, video_store
from genserve.api.submission import resolve_params
from genserve.api.upscale_submission import registered_upscalers
from genserve.api.video_submission import VideoJobCreate, resolve_video
from genserve.artifacts.inputs import (
    MissingPicture,
    PictureError,
    inspect_picture,
    media_type_of,
    open_picture,
)
from genserve.auth.deps import ANONYMOUS, Principal, PrincipalDep, submit_as
from genserve.auth.keys import KeyStore
from genserve.engine.models.controls import registered_controls
from genserve.engine.models.loras import registered_loras
from genserve.schemas import GenerationParams, JobCreate, LimitError
from genserve.schemas.upscale import UpscaleJobCreate
from genserve.schemas.video import VideoParams
from genserve.workflows.graph import NodeError, WorkflowError, parse_graph
from genserve.workflows.nodes import NODES, node_info, object_info
from genserve.workflows.plan import Plan, plan_graph
from genserve.workflows.records import ACTIVE, PromptRecord, WorkflowRecords
from genserve.workflows.runner import APNG_PREFIX, Driver, Run, image_id_from_filename

log = logging.getLogger(__name__)
router = APIRouter(tags=["comfyui"])

# genserve's field -> the KSampler input a limit error is reported on.
_FIELD_INPUTS = {
    "steps": "steps",
    "cfg_scale": "cfg",
    "sampler": "sampler_name",
    "model": "model",
    "loras": "model",
    "width": "latent_image",
    "height": "latent_image",
    "hires": "latent_image",
    "refiner": "model",
    "num_images": "latent_image",
    "prompt": "positive",
    "negative_prompt": "negative",
    "controlnets": "positive",
    "seed": "seed",
    # a video job's fields
    "guidance": "cfg",
    "num_frames": "latent_image",
    "seconds": "latent_image",
    "mode": "latent_image",
}
_VIDEO_EXTENSIONS = {"webp", "webm", "mp4"}
_DUMMY_PICTURE = "sha256:" + "0" * 64
_PREVIEW_METHODS = ("auto", "latent2rgb", "taesd")


# -- the service: records, driver, hub ------------------------------------------------------------


class ComfyService:
    """Per app: the prompt records, the driver and its tasks, the websocket hub."""

    def __init__(self, services: Services, hub: Hub) -> None:
        self.services = services
        self.records = WorkflowRecords(services.store.engine)
        self.hub = hub
        self.driver = Driver(
            services.store,
            services.images,
            services.inputs,
            hub.send,
            hub.send_binary,
            poll_seconds=services.settings.poll_seconds,
            videos=video_store(services),
        )
        self.tasks: dict[str, asyncio.Task] = {}
        hub.queue_remaining = lambda: len(self.tasks)

    def launch(self, record: PromptRecord, plan: Plan, principal: Principal) -> None:
        previews = str(record.extra.get("preview_method", "none")) in _PREVIEW_METHODS
        run = Run(record.id, record.client_id, plan, previews=previews)
        task = asyncio.create_task(self._drive(run, record, principal))
        self.tasks[record.id] = task
        self.hub.broadcast_status()

    async def _drive(self, run: Run, record: PromptRecord, principal: Principal) -> None:
        submitter = _Submitter(self.services, principal, record.client_id)
        try:
            await run_in_threadpool(self.records.update, record.id, state="running")
            state = await self.driver.drive(run, submitter)
            await run_in_threadpool(
                self.records.update, record.id, state=state, outputs=run.outputs, messages=run.messages
            )
            self.driver.done(run)  # after the history has it: clients read /history on this message
        except Exception:  # a bug must not leave the prompt running forever
            log.exception("workflow %s stopped", record.id)
            await run_in_threadpool(self.records.update, record.id, state="error", messages=run.messages)
            self.driver.done(run)
        finally:
            self.tasks.pop(record.id, None)
            self.hub.broadcast_status()

    def resume(self) -> None:
        """Drive again the prompts a stopped server left unfinished; their done stages are cached."""
        for record in self.records.list(states=ACTIVE):
            if record.id in self.tasks:
                continue
            principal = _principal_of(self.services, record.owner)
            if principal is None:
                self.records.update(record.id, state="error", error={"message": "its API key was revoked"})
                continue
            try:
                plan = plan_prompt(record.prompt, self.services, record.owner)
            except WorkflowError as error:
                self.records.update(record.id, state="error", error=error_body(error)["error"])
                continue
            self.launch(record, plan, principal)

    def interrupt(self, prompt_ids: list[str]) -> None:
        for prompt_id in prompt_ids:
            run = self.driver.runs.get(prompt_id)
            for job_ids in list(run.jobs.values()) if run else []:
                for job_id in job_ids:
                    self.services.store.request_cancel(job_id)


def comfy_service(request: Request) -> ComfyService:
    state = request.app.state
    if not hasattr(state, "comfy"):  # an app run without its lifespan (start() makes it otherwise)
        state.comfy = ComfyService(state.services, hub_of(request.app))
    return state.comfy


async def start(app: Any) -> None:
    """At server start: create the service and resume unfinished prompts."""
    app.state.comfy = ComfyService(app.state.services, hub_of(app))
    hub_of(app).loop = asyncio.get_running_loop()
    app.state.comfy.resume()


async def stop(app: Any) -> None:
    """At shutdown: stop the drivers; their prompts stay unfinished and resume at the next start."""
    service: ComfyService | None = getattr(app.state, "comfy", None)
    tasks = list(service.tasks.values()) if service else []
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _principal_of(services: Services, owner: str | None) -> Principal | None:
    """The caller a stored prompt was queued by (None: its key is gone or revoked)."""
    if owner is None:
        return ANONYMOUS
    key = KeyStore(services.store.engine).get(owner)
    if key is None or not key.active:
        return None
    return Principal(key_id=key.id, role=key.role, name=key.name, limits=key.limits)


@dataclass
class _Submitter:
    services: Services
    principal: Principal
    client_id: str | None

    def image(self, params: dict[str, Any], request_id: str) -> tuple[Any, bool]:
        body = JobCreate.model_validate({**params, "request_id": request_id})
        return submit_as(self.principal, body, self.services, self.client_id)

    def upscale(self, image: str, model: str, scale: float, request_id: str) -> tuple[Any, bool]:
        body = UpscaleJobCreate(image=image, upscale={"model": model, "scale": scale}, request_id=request_id)
        return submit_upscale_as(self.principal, body, self.services, self.client_id, None)

    def video(self, params: dict[str, Any], request_id: str) -> tuple[Any, bool]:
        body = VideoJobCreate.model_validate({**params, "request_id": request_id})
        return submit_video_as(self.principal, body, self.services, self.client_id, None)


# -- planning against this server's models and pictures -------------------------------------------


@dataclass
class _Resources:
    services: Services
    records: WorkflowRecords
    owner: str | None

    def models(self) -> set[str]:
        return set(self.services.catalog.models())

    def video_models(self) -> dict[str, str | None]:
        """AnimateDiff models run their model's sampler (pipelines.py); Wan, LTX and the others
        their family's own scheduler, which genserve does not let a request choose."""
        return {
            name: (info.default_sampler or "dpmpp_2m") if info.family.startswith("animatediff") else None
            for name, info in self.services.catalog.models().items()
            if info.kind == "video"
        }

    def loras(self) -> set[str]:
        return set(registered_loras(self.services.settings))

    def controlnets(self) -> set[str]:
        controls = registered_controls(self.services.settings)
        return {name for name, info in controls.items() if info.kind != "ipadapter"}

    def upscalers(self) -> dict[str, float]:
        found = registered_upscalers(self.services.settings)
        return {name: float(info.scale or 2) for name, info in found.items() if info.kind == "upscaler"}

    def picture(self, name: str) -> tuple[str, tuple[int, int]] | None:
        name = name.removesuffix(" [input]")
        if name.endswith((" [output]", " [temp]")):  # an earlier prompt's output, as ComfyUI allows
            return self._output(name.rpartition(" [")[0])
        if name.startswith("sha256:"):
            try:
                return name, self.services.inputs.size(name)
            except (MissingPicture, ValueError):
                return None
        return self.records.file(self.owner, name)

    def _output(self, filename: str) -> tuple[str, tuple[int, int]] | None:
        image_id = image_id_from_filename(filename.rpartition("/")[2]) or ""
        try:
            path = self.services.images.path(image_id)
        except ValueError:
            return None
        if not path.is_file() or not _may_see(self.services, self.owner, image_id):
            return None
        ref = self.services.inputs.put(path.read_bytes())
        return ref, self.services.inputs.size(ref)

    def mask(self, ref: str) -> str | None:
        """ComfyUI's LoadImage mask is 1 - alpha: transparent pixels are repainted (white here)."""
        picture = open_picture(self.services.inputs.get(ref))
        if "A" not in picture.getbands():
            return None
        mask = PIL.Image.eval(picture.getchannel("A"), lambda alpha: 255 - alpha)
        if mask.getextrema()[1] < 128:
            return None
        buffer = io.BytesIO()
        mask.save(buffer, format="PNG")
        return self.services.inputs.put(buffer.getvalue())


def plan_prompt(prompt: Any, services: Services, owner: str | None) -> Plan:
    """Parse, plan and check every job the graph makes against genserve's limits (before anything
    runs). Raises WorkflowError naming the node and input."""
    records = WorkflowRecords(services.store.engine)
    plan = plan_graph(parse_graph(prompt), _Resources(services, records, owner))
    checks = {"image": _check, "video": _check_video}
    errors = [
        error
        for stage in plan.stages.values()
        if stage.kind in checks
        for error in checks[stage.kind](plan, stage.params, stage.main_node, services)
    ]
    if errors:
        raise WorkflowError(errors)
    return plan


def _check(plan: Plan, params: dict[str, Any], node_id: str, services: Services) -> list[NodeError]:
    """resolve_params on the job's parameters, its pictures left out (they exist only once the
    stages before it have run): models, samplers, steps, sizes, LoRAs and control models."""
    dry = {k: v for k, v in params.items() if k not in ("init_image", "mask", "inpaint", "strength")}
    if "controlnets" in dry:
        dry["controlnets"] = [{**unit, "image": _DUMMY_PICTURE} for unit in dry["controlnets"]]
    class_type = plan.graph.nodes[node_id].class_type
    try:
        resolve_params(GenerationParams.model_validate(dry), services.catalog.models(), services.settings)
    except LimitError as error:
        field = error.field.split("[")[0].split(".")[0]
        return [
            NodeError(
                node_id, class_type, _FIELD_INPUTS.get(field, field), "value_not_in_list", error.message
            )
        ]
    except ValidationError as error:
        first = error.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        return [
            NodeError(
                node_id, class_type, _FIELD_INPUTS.get(field, field), "invalid_input_type", first["msg"]
            )
        ]
    return []


def _check_video(plan: Plan, params: dict[str, Any], node_id: str, services: Services) -> list[NodeError]:
    """The video job's request as POST /v1/video/jobs checks it (the family's frame rule, sizes,
    limits), its 422 message reported on the KSampler's input."""
    try:
        resolve_video(VideoParams.model_validate(params), services.catalog.models(), services.settings)
    except LimitError as error:
        return [_node_error(plan, node_id, error.field, "value_not_in_list", error.message)]
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        return [_node_error(plan, node_id, field, "invalid_input_type", f"{field}: {first['msg']}")]
    return []


def _node_error(plan: Plan, node_id: str, field: str, kind: str, message: str) -> NodeError:
    field = field.split("[")[0].split(".")[0]
    class_type = plan.graph.nodes[node_id].class_type
    return NodeError(node_id, class_type, _FIELD_INPUTS.get(field, field), kind, message)


def error_body(error: WorkflowError) -> dict[str, Any]:
    """ComfyUI's validation error: `error` and `node_errors` keyed by node id."""
    node_errors: dict[str, Any] = {}
    for item in error.errors:
        if not item.node_id:
            continue
        entry = node_errors.setdefault(
            item.node_id, {"errors": [], "dependent_outputs": [], "class_type": item.class_type}
        )
        entry["errors"].append(
            {
                "type": item.type,
                "message": item.message,
                "details": f"{item.input}: {item.message}" if item.input else item.message,
                "extra_info": {"input_name": item.input} if item.input else {},
            }
        )
    messages = {"prompt_outputs_failed_validation": "Prompt outputs failed validation"}
    return {
        "error": {
            "type": error.kind,
            "message": messages.get(error.kind, str(error)),
            "details": str(error),
            "extra_info": {},
        },
        "node_errors": node_errors,
    }


# -- routes ---------------------------------------------------------------------------------------


@router.post("/prompt", operation_id="comfy_queue_prompt")
async def queue_prompt(request: Request, services: ServicesDep, principal: PrincipalDep) -> JSONResponse:
    """Queue a workflow (API format) as genserve jobs: {prompt, client_id, extra_data, prompt_id}."""
    body = await _json_body(request)
    service = comfy_service(request)
    client_id = body.get("client_id")
    prompt_id = body.get("prompt_id") or str(uuid.uuid4())
    if not isinstance(client_id, (str, type(None))) or not isinstance(prompt_id, str) or len(prompt_id) > 64:
        raise LimitError(
            "client_id", "client_id and prompt_id must be strings (prompt_id: at most 64 characters)"
        )
    try:
        plan = await run_in_threadpool(plan_prompt, body.get("prompt"), services, principal.key_id)
    except WorkflowError as error:
        return JSONResponse(error_body(error), status_code=400)
    extra = body.get("extra_data") if isinstance(body.get("extra_data"), dict) else {}
    if await run_in_threadpool(service.records.get, prompt_id) is not None:
        raise LimitError("prompt_id", f"prompt_id {prompt_id} is already used")
    record = await run_in_threadpool(
        service.records.add, prompt_id, body["prompt"], client_id, principal.key_id, extra
    )
    service.launch(record, plan, principal)
    return JSONResponse({"prompt_id": record.id, "number": record.number, "node_errors": {}})


@router.get("/prompt", operation_id="comfy_prompt_status")
def prompt_status(request: Request) -> dict[str, Any]:
    """ComfyUI's queue size: {"exec_info": {"queue_remaining": n}}."""
    return {"exec_info": {"queue_remaining": len(comfy_service(request).tasks)}}


@router.post("/v1/workflows/validate", operation_id="validate_workflow")
async def validate_workflow(
    services: ServicesDep, principal: PrincipalDep, body: Annotated[dict[str, Any], Body()]
) -> dict[str, Any]:
    """Check a workflow (`{"prompt": {...}}`) without running it: 422 naming each node and input;
    else the genserve jobs it becomes."""
    try:
        plan = await run_in_threadpool(plan_prompt, body.get("prompt"), services, principal.key_id)
    except WorkflowError as error:
        detail = [
            {
                "loc": ["body", "prompt", item.node_id, *([item.input] if item.input else [])],
                "msg": item.describe(),
                "type": item.type,
                "node_id": item.node_id,
                "class_type": item.class_type,
            }
            for item in error.errors
        ]
        return JSONResponse({"detail": detail}, status_code=422)  # type: ignore[return-value]
    return {
        "stages": [
            {
                "kind": s.kind,
                "nodes": s.nodes,
                "node": s.main_node,
                "params": s.params,
                "depends_on": list(s.deps),
                "key": s.key,
            }
            for s in plan.stages.values()
        ],
        "outputs": [output.node for output in plan.outputs],
    }


async def _json_body(request: Request, required: bool = True) -> dict[str, Any]:
    """The JSON object sent, whatever the Content-Type (ComfyUI clients often send none)."""
    raw = await request.body()
    if not raw.strip() and not required:
        return {}
    try:  # what the input guard checks in JSON bodies: these clients often send no Content-Type
        check_json(raw)
    except InputProblem as problem:
        raise LimitError(".".join(str(part) for part in problem.loc[1:]) or "body", problem.message) from None
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise LimitError("body", "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise LimitError("body", "the body must be a JSON object")
    return body


def _history_item(record: PromptRecord) -> dict[str, Any]:
    outputs_to_execute = [
        n
        for n, node in record.prompt.items()
        if NODES.get(node.get("class_type"), None) and NODES[node["class_type"]].output_node
    ]
    return {
        "prompt": [record.number, record.id, record.prompt, record.extra, outputs_to_execute],
        "outputs": record.outputs,
        "status": {
            "status_str": "success" if record.state == "success" else "error",
            "completed": record.state == "success",
            "messages": record.messages,
        },
        "meta": {node: {"node_id": node, "display_node": node} for node in record.outputs},
    }


def _owner(principal: Principal) -> str | None:
    return principal.key_id if principal.authenticated else None


@router.get("/history", operation_id="comfy_history")
def history(
    request: Request, principal: PrincipalDep, max_items: Annotated[int | None, Query(ge=1, le=10000)] = None
) -> dict[str, Any]:
    records = comfy_service(request).records.list(owner=_owner(principal), limit=max_items or 200)
    finished = [r for r in reversed(records) if r.state not in ACTIVE]
    return {record.id: _history_item(record) for record in finished}


@router.post("/history", operation_id="comfy_history_delete")
async def history_delete(request: Request, principal: PrincipalDep) -> dict[str, Any]:
    """{"delete": [prompt ids]} or {"clear": true}: forget finished prompts (their jobs and
    images stay, and so does the cache)."""
    body = await _json_body(request)
    records = comfy_service(request).records
    finished = [
        r.id
        for r in await run_in_threadpool(records.list, _owner(principal), None, 10000)
        if r.state not in ACTIVE
    ]
    chosen = finished if body.get("clear") else [p for p in body.get("delete") or [] if p in finished]
    await run_in_threadpool(records.delete, chosen, _owner(principal))
    return {"deleted": chosen}


@router.get("/history/{prompt_id}", operation_id="comfy_history_item")
def history_item(prompt_id: str, request: Request, principal: PrincipalDep) -> dict[str, Any]:
    """The finished prompt's outputs and messages; {} while it runs or when unknown (as ComfyUI)."""
    record = comfy_service(request).records.get(prompt_id)
    if (
        record is None
        or record.state in ACTIVE
        or (principal.authenticated and record.owner != principal.key_id)
    ):
        return {}
    return {record.id: _history_item(record)}


@router.get("/queue", operation_id="comfy_queue")
def queue(request: Request, principal: PrincipalDep) -> dict[str, Any]:
    """Unfinished prompts: running (a stage has started or was cached) and pending."""
    service = comfy_service(request)
    running, pending = [], []
    for record in service.records.list(owner=_owner(principal), states=ACTIVE):
        item = _history_item(record)["prompt"]
        run = service.driver.runs.get(record.id)
        (running if run is not None and run.running else pending).append(item)
    return {"queue_running": running, "queue_pending": pending}


@router.post("/queue", operation_id="comfy_queue_delete")
async def queue_delete(request: Request, principal: PrincipalDep) -> dict[str, Any]:
    """{"delete": [prompt ids]} or {"clear": true}: cancel those unfinished prompts."""
    body = await _json_body(request)
    service = comfy_service(request)
    active = [r.id for r in service.records.list(owner=_owner(principal), states=ACTIVE)]
    chosen = active if body.get("clear") else [p for p in body.get("delete") or [] if p in active]
    await run_in_threadpool(service.interrupt, chosen)
    return {"deleted": chosen}


@router.post("/interrupt", operation_id="comfy_interrupt")
async def interrupt(request: Request, principal: PrincipalDep) -> Response:
    """Stop the caller's running prompts (or the one named by `prompt_id`) at their next step."""
    body = await _json_body(request, required=False)
    service = comfy_service(request)
    running = [r.id for r in service.records.list(owner=_owner(principal), states=ACTIVE)]
    wanted = body.get("prompt_id")
    await run_in_threadpool(service.interrupt, [p for p in running if wanted in (None, p)])
    return Response(status_code=200)


@router.get("/object_info", operation_id="comfy_object_info")
def get_object_info(request: Request, principal: PrincipalDep) -> dict[str, Any]:
    return object_info(_choices(request, principal))


@router.get("/object_info/{node_class}", operation_id="comfy_object_info_node")
def get_node_info(node_class: str, request: Request, principal: PrincipalDep) -> dict[str, Any]:
    if node_class not in NODES:
        return {}
    return {node_class: node_info(node_class, NODES[node_class], _choices(request, principal))}


def _choices(request: Request, principal: Principal) -> dict[str, list[str]]:
    service = comfy_service(request)
    resources = _Resources(service.services, service.records, _owner(principal))
    return {
        "checkpoints": sorted(resources.models()),
        "loras": sorted(resources.loras()),
        "controlnets": sorted(resources.controlnets()),
        "upscalers": sorted(resources.upscalers()),
        "images": service.records.file_names(_owner(principal)),
    }


@router.get("/embeddings", operation_id="comfy_embeddings")
def embeddings() -> list[str]:
    return []


@router.get("/system_stats", operation_id="comfy_system_stats")
def system_stats(services: ServicesDep) -> dict[str, Any]:
    from genserve import __version__

    return {
        "system": {"os": "genserve", "comfyui_version": f"genserve {__version__}", "embedded_python": False},
        "devices": [],
    }


@router.post("/upload/image", operation_id="comfy_upload_image")
async def upload_image(request: Request, services: ServicesDep, principal: PrincipalDep) -> dict[str, str]:
    """Store a picture for LoadImage (multipart `image`; `subfolder`, `overwrite`). Its name is
    the file's name, made unique as ComfyUI does unless `overwrite`."""
    form, data = await _read_picture(request, services)
    return await _store_upload(request, services, principal, form, data)


@router.post("/upload/mask", operation_id="comfy_upload_mask")
async def upload_mask(request: Request, services: ServicesDep, principal: PrincipalDep) -> dict[str, str]:
    """ComfyUI's mask editor upload: the uploaded picture's alpha channel put on an uploaded
    original (`original_ref`: {filename, subfolder, type "input"}), stored under the upload's
    name. LoadImage's MASK of it is 1 - alpha: where to repaint."""
    form, data = await _read_picture(request, services)
    try:
        ref = json.loads(str(form.get("original_ref") or ""))
        name = f"{ref['subfolder']}/{ref['filename']}" if ref.get("subfolder") else ref["filename"]
    except (ValueError, KeyError, TypeError):
        raise LimitError("original_ref", "original_ref must be JSON with the original's filename") from None
    found = await run_in_threadpool(comfy_service(request).records.file, _owner(principal), str(name))
    if found is None:
        raise LimitError("original_ref", f"no uploaded picture '{name}'")
    original = open_picture(await run_in_threadpool(services.inputs.get, found[0])).convert("RGBA")
    alpha = open_picture(data).convert("RGBA").getchannel("A")
    if alpha.size != original.size:
        raise LimitError(
            "image",
            f"the mask is {alpha.size[0]}x{alpha.size[1]}; the original {original.size[0]}x{original.size[1]}",
        )
    original.putalpha(alpha)
    buffer = io.BytesIO()
    original.save(buffer, format="PNG")
    return await _store_upload(request, services, principal, form, buffer.getvalue())


async def _read_picture(request: Request, services: Services) -> tuple[Any, bytes]:
    """The multipart form and its `image`, checked as POST /v1/uploads checks pictures."""
    limits = services.settings.limits
    form = await read_form(request, limits.max_upload_bytes + FORM_SLACK_BYTES, "image")
    data = await form_file(form, "image", limits.max_upload_bytes)
    assert data is not None
    try:
        inspect_picture(data, limits.max_upload_bytes, limits.max_input_pixels)
    except PictureError as error:
        if error.too_large:
            raise too_large("image", error.message) from None
        raise LimitError("image", f"image: {error.message}") from None
    return form, data


async def _store_upload(
    request: Request, services: Services, principal: Principal, form: Any, data: bytes
) -> dict[str, str]:
    upload = form.get("image")
    filename = (getattr(upload, "filename", None) or "image.png").replace("\\", "/").rpartition("/")[2]
    subfolder = str(form.get("subfolder") or "").strip("/")
    if ".." in subfolder.split("/") or len(filename) > 200 or len(subfolder) > 150 or not filename.strip("."):
        raise LimitError("image", "the file name or subfolder is not allowed")
    overwrite = str(form.get("overwrite", "")).lower() in ("true", "1")
    ref = await run_in_threadpool(services.inputs.put, data)
    size = await run_in_threadpool(services.inputs.size, ref)
    full = f"{subfolder}/{filename}" if subfolder else filename
    records = comfy_service(request).records
    name = await run_in_threadpool(records.put_file, _owner(principal), full, ref, size, overwrite)
    return {"name": name.rpartition("/")[2], "subfolder": subfolder, "type": "input"}


@router.get("/view", operation_id="comfy_view", response_class=Response)
def view(
    request: Request,
    services: ServicesDep,
    principal: PrincipalDep,
    filename: Annotated[str, Query(max_length=400)],
    subfolder: Annotated[str, Query(max_length=200)] = "",
    type: Annotated[str, Query(max_length=20)] = "output",
) -> Response:
    """An output (`type` output or temp, by the name /history gave) or an uploaded picture (input)."""
    if type == "input":
        name = f"{subfolder}/{filename}" if subfolder else filename
        found = comfy_service(request).records.file(_owner(principal), name)
        if found is None:
            raise HTTPException(404, f"no uploaded picture '{name}'")
        data = services.inputs.get(found[0])
        return Response(data, media_type=media_type_of(data))
    stem, _, extension = filename.rpartition(".")
    if extension in _VIDEO_EXTENSIONS:
        return _view_video(services, principal, stem.rpartition("_")[2], extension, filename)
    image_id = image_id_from_filename(filename)
    try:
        path = services.images.path(image_id or "")
    except ValueError:
        raise HTTPException(404, f"no output '{filename}'") from None
    if not path.is_file() or not _may_see(services, _owner(principal), image_id or ""):
        raise HTTPException(404, f"no output '{filename}'")
    return Response(
        path.read_bytes(), media_type="image/png", headers={"Cache-Control": "private, max-age=31536000"}
    )


def _view_video(
    services: Services, principal: Principal, job_id: str, extension: str, filename: str
) -> Response:
    """A video job's clip (SaveAnimatedWEBP, SaveWEBM, SaveVideo), as GET /v1/video/files serves it."""
    job = services.store.get(job_id) if job_id.isalnum() else None
    if job is None or job.kind != "video" or not principal.owns(job):
        raise HTTPException(404, f"no output '{filename}'")
    path = video_store(services).path(f"{job_id}.{extension}")
    if not path.is_file():
        raise HTTPException(404, f"no output '{filename}'")
    media = {"webp": "image/webp", "webm": "video/webm", "mp4": "video/mp4"}[extension]
    return Response(
        path.read_bytes(), media_type=media, headers={"Cache-Control": "private, max-age=31536000"}
    )


def _may_see(services: Services, owner: str | None, image_id: str) -> bool:
    """With auth on (an owner), a job's image belongs to the job's key (as GET /v1/images); the
    driver's resized pictures (no job) are named by a content hash nobody can guess; an APNG
    belongs to its video job's key."""
    if owner is None or image_id.startswith(("wfs", "wfi")):
        return True
    if image_id.startswith(APNG_PREFIX):
        job = services.store.get(image_id.removeprefix(APNG_PREFIX))
        return job is not None and job.client_id == owner
    job = services.store.get(image_id.rpartition("-")[0])
    return job is not None and job.client_id == owner

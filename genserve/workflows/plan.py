"""A validated graph → genserve stages: image jobs, upscale jobs and pixel steps, keyed for the cache.

Nodes are evaluated symbolically in topological order. A sampling chain (KSampler with its model,
conditioning and latent) becomes one ordinary genserve image job (`GenerationParams`), which the
workers batch with everyone else's requests; KSampler → LatentUpscale → KSampler becomes the same
job's hires pass when it fits, else two jobs. ImageUpscaleWithModel is an upscale job (the engine's
PostStage); ImageScale runs in the driver (a Pillow resize). Each stage's key is a hash of what it
computes (its parameters and its inputs' keys), so a re-run finds its finished job (runner.py).

Pure and torch-free: what the server has (models, LoRAs, pictures) comes in through `Resources`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from typing import Any, Protocol

from genserve.workflows.graph import Graph, GraphNode, Link, NodeError, WorkflowError
from genserve.workflows.samplers import (
    SamplerMappingError,
    advanced_to_strength,
    comfy_sampler,
    denoise_to_strength,
    genserve_sampler,
)

STAGE_REF = "stage:"  # a picture made by another stage: "stage:<key>:<index>", replaced before submit
MAX_SEED = 2**32 - 1
_LATENT_UPSCALERS = {
    "nearest-exact": "latent_nearest",
    "bilinear": "latent_bilinear",
    "area": "latent_antialiased",
    "bicubic": "latent_bicubic",
    "bislerp": "latent_bilinear",
}
_LEFTOVER = "a latent with leftover noise goes to a KSamplerAdvanced with add_noise disable (a refiner)"
_CLIP_NODES = frozenset({"SaveAnimatedWEBP", "SaveAnimatedPNG", "SaveWEBM", "CreateVideo", "SaveVideo"})
_MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")


class Resources(Protocol):
    """What the server has, as the planner needs it."""

    def models(self) -> set[str]: ...
    def loras(self) -> set[str]: ...
    def controlnets(self) -> set[str]: ...
    def upscalers(self) -> dict[str, float]: ...  # name -> scale
    def picture(self, name: str) -> tuple[str, tuple[int, int]] | None: ...  # (ref, size)
    def mask(self, ref: str) -> str | None: ...  # LoadImage's MASK (1 - alpha) as a stored picture
    # Video models -> the genserve sampler each runs (None: its family's own scheduler).
    def video_models(self) -> dict[str, str | None]: ...


def model_name(file_name: str) -> str:
    """A checkpoint or LoRA file name as a genserve model name: folders and extensions dropped."""
    name = PurePosixPath(file_name.replace("\\", "/")).name
    for extension in _MODEL_EXTENSIONS:
        if name.lower().endswith(extension):
            return name[: -len(extension)]
    return name


@dataclass(frozen=True)
class ModelVal:
    model: str
    loras: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Images:
    """Pictures: `refs` (loaded pictures) or the output of `stage`; `count` of them."""

    stage: str | None
    refs: tuple[str, ...]
    count: int
    size: tuple[int, int] | None

    def ref(self, index: int) -> str:
        return self.refs[index] if self.stage is None else f"{STAGE_REF}{self.stage}:{index}"


@dataclass(frozen=True)
class MaskOf:
    """LoadImage's MASK output: made from its picture's alpha channel when a node uses it."""

    picture: str


@dataclass(frozen=True)
class ControlUse:
    model: str
    image: Images
    scale: float
    start: float
    end: float


@dataclass(frozen=True)
class Cond:
    text: str
    clip: ModelVal
    controls: tuple[ControlUse, ...] = ()


@dataclass(frozen=True)
class Empty:
    width: int
    height: int
    batch: int


@dataclass(frozen=True)
class EmptyVideo:
    """EmptyHunyuanLatentVideo / EmptyLTXVLatentVideo: a clip's size and frame count."""

    width: int
    height: int
    length: int


@dataclass(frozen=True)
class FromPicture:
    image: Images
    mask: str | None = None
    fill: str | None = None  # inpaint fill; None: img2img
    mask_blur: int = 0
    size: tuple[int, int] | None = None  # LatentUpscale's size
    vae: str | None = None  # the checkpoint whose VAE encoded it


@dataclass(frozen=True)
class Sampled:
    params: dict[str, Any]
    deps: tuple[str, ...]
    node: str
    first_pass: str | None = None  # the KSampler of the first pass, when this is a hires pass
    video: bool = False  # a video job's parameters (VideoParams), encoded by the save node


@dataclass(frozen=True)
class Clip:
    """A video model's decoded frames (VAEDecode), and CreateVideo's fps. The video job is made by
    the save node, which picks the container, codec and fps the worker encodes with."""

    sampled: Sampled
    nodes: tuple[str, ...]
    fps: float | None = None


@dataclass(frozen=True)
class Unfinished:
    """A KSamplerAdvanced that stops at `end` of `steps` and returns its leftover noise: the base
    half of a base + refiner pair (ComfyUI's SDXL template). `sampled` is the base as a whole run."""

    sampled: Sampled
    end: int
    steps: int


@dataclass(frozen=True)
class Resized:
    source: Empty | FromPicture | Sampled
    width: int
    height: int
    method: str


Latent = Empty | FromPicture | Sampled | Resized | Unfinished | EmptyVideo


@dataclass
class Stage:
    """One unit of work: an image job, an upscale job per picture, or a resize in the driver."""

    key: str
    kind: str  # image | upscale | scale | video
    params: dict[str, Any]
    deps: tuple[str, ...]
    count: int
    nodes: list[str] = field(default_factory=list)  # the graph nodes it computes
    main_node: str = ""  # the node progress is reported on


@dataclass(frozen=True)
class Output:
    node: str
    images: Images
    kind: str  # output | temp
    prefix: str
    extension: str = "png"  # a video job's file: webp, webm, mp4; "png" of a video: APNG
    video: bool = False


@dataclass
class Plan:
    graph: Graph
    stages: dict[str, Stage]  # in dependency order
    outputs: list[Output]


def stage_key(kind: str, params: dict[str, Any], deps: tuple[str, ...]) -> str:
    text = json.dumps([kind, params, sorted(deps)], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class _Fail(Exception):
    def __init__(self, input_name: str | None, kind: str, message: str) -> None:
        super().__init__(message)
        self.input, self.kind, self.message = input_name, kind, message


def plan_graph(graph: Graph, resources: Resources) -> Plan:
    """Evaluate the graph into stages. Raises WorkflowError naming the node and input of every
    problem found (the first per node: later nodes that depend on a failed one are skipped)."""
    planner = _Planner(graph, resources)
    return planner.run()


class _Planner:
    def __init__(self, graph: Graph, resources: Resources) -> None:
        self.graph = graph
        self.res = resources
        self.values: dict[str, tuple[Any, ...]] = {}
        self.stages: dict[str, Stage] = {}
        self.outputs: list[Output] = []

    def run(self) -> Plan:
        errors: list[NodeError] = []
        failed: set[str] = set()
        for node_id in self.graph.order:
            node = self.graph.nodes[node_id]
            if any(isinstance(v, Link) and v.node in failed for v in node.inputs.values()):
                failed.add(node_id)
                continue
            try:
                self.values[node_id] = getattr(self, f"_{node.class_type}")(node)
            except _Fail as fail:
                failed.add(node_id)
                errors.append(NodeError(node_id, node.class_type, fail.input, fail.kind, fail.message))
        if errors:
            raise WorkflowError(errors)
        return Plan(self.graph, self._needed(), self.outputs)

    def _needed(self) -> dict[str, Stage]:
        """The stages the outputs depend on, in order: as in ComfyUI, a branch that reaches no
        output node is validated but not run."""
        needed: set[str] = set()
        pending = [output.images.stage for output in self.outputs if output.images.stage]
        while pending:
            key = pending.pop()
            if key not in needed:
                needed.add(key)
                pending.extend(self.stages[key].deps)
        return {key: stage for key, stage in self.stages.items() if key in needed}

    # -- helpers ---------------------------------------------------------------------------------

    def _in(self, node: GraphNode, name: str) -> Any:
        value = node.inputs[name]
        if isinstance(value, Link):
            value = self.values[value.node][value.output]
        if isinstance(value, Clip) and node.class_type not in _CLIP_NODES:
            raise _Fail(
                name,
                "invalid_input_type",
                "a video's frames go to SaveAnimatedWEBP, SaveAnimatedPNG, SaveWEBM or CreateVideo",
            )
        if isinstance(value, EmptyVideo) and node.class_type not in ("KSampler",):
            raise _Fail(name, "invalid_input_type", "a video latent goes to a video model's KSampler")
        return value

    def _add_stage(
        self,
        kind: str,
        params: dict[str, Any],
        deps: tuple[str, ...],
        count: int,
        nodes: list[str],
        main: str | None = None,
    ) -> str:
        key = stage_key(kind, params, deps)
        stage = Stage(key, kind, params, deps, count, main_node=main or nodes[0])
        stage = self.stages.setdefault(key, stage)
        for node_id in nodes:
            if node_id not in stage.nodes:
                stage.nodes.append(node_id)
        return key

    def _decode(self, sampled: Sampled, node_ids: list[str]) -> Images:
        nodes = [n for n in (sampled.first_pass, sampled.node) if n] + node_ids
        count = sampled.params["num_images"]
        key = self._add_stage("image", sampled.params, sampled.deps, count, nodes, main=sampled.node)
        size = (sampled.params.get("width"), sampled.params.get("height"))
        hires = sampled.params.get("hires")
        if hires:
            size = (hires["width"], hires["height"])
        return Images(key, (), sampled.params["num_images"], size if None not in size else None)

    @staticmethod
    def _one(images: Images, name: str) -> Images:
        if images.count != 1:
            raise _Fail(name, "invalid_input_type", f"expects one picture; this batch has {images.count}")
        return images

    # -- loaders ---------------------------------------------------------------------------------

    def _CheckpointLoaderSimple(self, node: GraphNode) -> tuple[Any, ...]:
        name = model_name(node.inputs["ckpt_name"])
        if name not in self.res.models():
            raise _Fail("ckpt_name", "value_not_in_list", f"checkpoint '{name}' is not a genserve model")
        return ModelVal(name), ModelVal(name), name

    def _LoraLoader(self, node: GraphNode) -> tuple[Any, ...]:
        model, clip = self._in(node, "model"), self._in(node, "clip")
        name = model_name(node.inputs["lora_name"])
        if name not in self.res.loras():
            raise _Fail("lora_name", "value_not_in_list", f"LoRA '{name}' is not registered")
        weight, clip_weight = float(node.inputs["strength_model"]), float(node.inputs["strength_clip"])
        if weight != clip_weight:
            raise _Fail(
                "strength_clip",
                "value_not_in_list",
                "genserve applies a LoRA at one weight to the UNet and the text encoder: "
                "strength_clip must equal strength_model",
            )
        return (
            replace(model, loras=(*model.loras, (name, weight))),
            replace(clip, loras=(*clip.loras, (name, weight))),
        )

    def _ControlNetLoader(self, node: GraphNode) -> tuple[Any, ...]:
        name = model_name(node.inputs["control_net_name"])
        if name not in self.res.controlnets():
            raise _Fail("control_net_name", "value_not_in_list", f"control model '{name}' is not registered")
        return (name,)

    def _UpscaleModelLoader(self, node: GraphNode) -> tuple[Any, ...]:
        name = model_name(node.inputs["model_name"])
        scale = self.res.upscalers().get(name)
        if scale is None:
            raise _Fail("model_name", "value_not_in_list", f"upscale model '{name}' is not registered")
        return ((name, scale),)

    def _LoadImage(self, node: GraphNode) -> tuple[Any, ...]:
        found = self.res.picture(node.inputs["image"])
        if found is None:
            raise _Fail("image", "value_not_in_list", f"no uploaded picture '{node.inputs['image']}'")
        ref, size = found
        return Images(None, (ref,), 1, size), MaskOf(ref)

    # -- conditioning ----------------------------------------------------------------------------

    def _CLIPTextEncode(self, node: GraphNode) -> tuple[Any, ...]:
        return (Cond(node.inputs["text"], self._in(node, "clip")),)

    def _ControlNetApplyAdvanced(self, node: GraphNode) -> tuple[Any, ...]:
        image = self._one(self._in(node, "image"), "image")
        start, end = float(node.inputs["start_percent"]), float(node.inputs["end_percent"])
        if end < start:
            raise _Fail(
                "end_percent", "value_smaller_than_min", "end_percent must not be below start_percent"
            )
        use = ControlUse(self._in(node, "control_net"), image, float(node.inputs["strength"]), start, end)
        positive, negative = self._in(node, "positive"), self._in(node, "negative")
        return (
            replace(positive, controls=(*positive.controls, use)),
            replace(negative, controls=(*negative.controls, use)),
        )

    # -- latents ---------------------------------------------------------------------------------

    def _EmptyLatentImage(self, node: GraphNode) -> tuple[Any, ...]:
        width, height = node.inputs["width"] // 8 * 8, node.inputs["height"] // 8 * 8
        return (Empty(width, height, node.inputs["batch_size"]),)

    def _empty_video(self, node: GraphNode) -> tuple[Any, ...]:
        if node.inputs["batch_size"] != 1:
            raise _Fail("batch_size", "value_bigger_than_max", "genserve makes one clip per video KSampler")
        return (EmptyVideo(node.inputs["width"], node.inputs["height"], node.inputs["length"]),)

    _EmptyHunyuanLatentVideo = _empty_video
    _EmptyLTXVLatentVideo = _empty_video

    def _VAEEncode(self, node: GraphNode) -> tuple[Any, ...]:
        return (FromPicture(self._one(self._in(node, "pixels"), "pixels"), vae=self._in(node, "vae")),)

    def _mask(self, node: GraphNode) -> str:
        ref = self.res.mask(self._in(node, "mask").picture)
        if ref is None:
            raise _Fail(
                "mask", "invalid_input_type", "the mask is empty: its picture has no transparent pixels"
            )
        return ref

    def _VAEEncodeForInpaint(self, node: GraphNode) -> tuple[Any, ...]:
        image = self._one(self._in(node, "pixels"), "pixels")
        # The masked area is erased before encoding: genserve's latent_nothing starts it from zeros.
        grow = int(node.inputs["grow_mask_by"])
        return (FromPicture(image, self._mask(node), "latent_nothing", grow, vae=self._in(node, "vae")),)

    def _SetLatentNoiseMask(self, node: GraphNode) -> tuple[Any, ...]:
        samples = self._in(node, "samples")
        if isinstance(samples, Sampled):
            samples = FromPicture(self._one(self._decode(samples, [node.id]), "samples"))
        if not isinstance(samples, FromPicture):
            raise _Fail("samples", "invalid_input_type", "needs a latent made from a picture (VAEEncode)")
        return (replace(samples, mask=self._mask(node), fill="original"),)

    def _LatentUpscale(self, node: GraphNode) -> tuple[Any, ...]:
        width, height = node.inputs["width"], node.inputs["height"]
        if width < 8 or height < 8:
            raise _Fail("width", "value_smaller_than_min", "give both width and height (8 or more)")
        if node.inputs["crop"] != "disabled":
            raise _Fail("crop", "value_not_in_list", "genserve's latent upscale does not crop; use disabled")
        samples = self._in(node, "samples")
        if isinstance(samples, Unfinished):
            raise _Fail("samples", "invalid_input_type", _LEFTOVER)
        width, height = width // 8 * 8, height // 8 * 8
        if isinstance(samples, Empty):
            return (replace(samples, width=width, height=height),)
        if isinstance(samples, FromPicture):
            return (replace(samples, size=(width, height)),)
        if isinstance(samples, Resized):
            return (replace(samples, width=width, height=height),)
        return (Resized(samples, width, height, node.inputs["upscale_method"]),)

    # -- sampling --------------------------------------------------------------------------------

    def _KSampler(self, node: GraphNode) -> tuple[Any, ...]:
        denoise = float(node.inputs["denoise"])
        if denoise <= 0:
            raise _Fail("denoise", "value_smaller_than_min", "denoise 0 runs no step")
        videos = self.res.video_models()
        model, latent = self._in(node, "model"), self._in(node, "latent_image")
        if model.model in videos or isinstance(latent, EmptyVideo):
            return (self._sample_video(node, model, latent, videos, denoise),)
        return (self._sample(node, node.inputs["seed"], denoise=denoise),)

    def _sample_video(
        self, node: GraphNode, model: ModelVal, latent: Any, videos: dict[str, str | None], denoise: float
    ) -> Sampled:
        """A video model's KSampler: one genserve t2v job (its output format comes from the save node)."""
        if model.model not in videos:
            raise _Fail(
                "latent_image",
                "invalid_input_type",
                f"a video latent needs a video model; '{model.model}' makes pictures",
            )
        if not isinstance(latent, EmptyVideo):
            raise _Fail(
                "latent_image",
                "invalid_input_type",
                f"'{model.model}' is a video model: its latent comes from EmptyHunyuanLatentVideo or "
                "EmptyLTXVLatentVideo",
            )
        if model.loras:
            raise _Fail("model", "value_not_in_list", "genserve's video jobs take no LoRA")
        if denoise < 1:
            raise _Fail(
                "denoise", "value_bigger_than_max", "a video model samples the whole schedule (denoise 1)"
            )
        positive, negative = self._conditioning(node, model)
        sampler = self._sampler(node)
        runs = videos[model.model]
        if runs is not None and sampler != runs:
            raise _Fail(
                "sampler_name" if sampler.removesuffix("_karras") != runs else "scheduler",
                "value_not_in_list",
                f"video model '{model.model}' runs one sampler: {comfy_sampler(runs)}",
            )
        params = {
            "prompt": positive.text,
            "negative_prompt": negative.text,
            "model": model.model,
            "mode": "t2v",
            "seed": node.inputs["seed"] % (MAX_SEED + 1),
            "steps": node.inputs["steps"],
            "guidance": float(node.inputs["cfg"]),
            "num_frames": latent.length,
            "width": latent.width,
            "height": latent.height,
        }
        return Sampled(params, (), node.id, video=True)

    def _conditioning(self, node: GraphNode, model: ModelVal) -> tuple[Cond, Cond]:
        positive: Cond = self._in(node, "positive")
        negative: Cond = self._in(node, "negative")
        for name, cond in (("positive", positive), ("negative", negative)):
            if cond.clip.model != model.model:
                raise _Fail(
                    name,
                    "invalid_input_type",
                    f"encoded with '{cond.clip.model}''s CLIP, not '{model.model}''s",
                )
        if not positive.text.strip():
            raise _Fail("positive", "invalid_input_type", "genserve needs a non-empty positive prompt")
        return positive, negative

    @staticmethod
    def _sampler(node: GraphNode) -> str:
        try:
            return genserve_sampler(node.inputs["sampler_name"], node.inputs["scheduler"])
        except SamplerMappingError as error:
            raise _Fail(error.input, "value_not_in_list", str(error)) from None

    def _KSamplerAdvanced(self, node: GraphNode) -> tuple[Any, ...]:
        inputs = node.inputs
        steps, start, end = inputs["steps"], inputs["start_at_step"], inputs["end_at_step"]
        latent = self._in(node, "latent_image")
        if isinstance(latent, Unfinished):
            return (self._refine(node, latent),)
        if start >= steps:
            raise _Fail("start_at_step", "value_bigger_than_max", "start_at_step must be below steps")
        if inputs["add_noise"] != "enable":
            raise _Fail(
                "add_noise",
                "value_not_in_list",
                "add_noise disable continues a KSamplerAdvanced that returned its leftover noise",
            )
        if end < steps and inputs["return_with_leftover_noise"] == "enable" and start == 0:
            return (Unfinished(self._sample(node, inputs["noise_seed"]), end, steps),)
        if end < steps:
            raise _Fail(
                "end_at_step",
                "value_smaller_than_min",
                "genserve stops a schedule early only for a refiner: from step 0, with "
                "return_with_leftover_noise enable, into a KSamplerAdvanced with add_noise disable",
            )
        strength = advanced_to_strength(steps, start) if start else None
        return (self._sample(node, inputs["noise_seed"], strength=strength),)

    def _refine(self, node: GraphNode, base: Unfinished) -> Sampled:
        """The second half of a base + refiner pair: genserve's `refiner` option of the base's job
        (switch_at = end / steps), or the whole run when both halves use one model."""
        inputs = node.inputs
        for name, ok, wanted in (
            ("add_noise", inputs["add_noise"] == "disable", "disable: it continues the first sampler's noise"),
            ("start_at_step", inputs["start_at_step"] == base.end, f"{base.end}, where the first sampler stopped"),
            ("steps", inputs["steps"] == base.steps, f"{base.steps}, the first sampler's steps"),
            ("end_at_step", inputs["end_at_step"] >= base.steps, f"at least steps ({base.steps})"),
        ):  # fmt: skip
            if not ok:
                raise _Fail(name, "value_not_in_list", f"must be {wanted}")
        second = self._sample(node, inputs["noise_seed"], latent=Empty(8, 8, 1))
        first = base.sampled.params
        for name, key in (("positive", "prompt"), ("negative", "negative_prompt"), ("cfg", "cfg_scale"),
                          ("sampler_name", "sampler")):  # fmt: skip
            if second.params[key] != first[key]:
                raise _Fail(name, "value_not_in_list", f"genserve's refiner runs with the base's {key}")
        if second.params["model"] == first["model"] and second.params.get("loras") == first.get("loras"):
            return Sampled(first, base.sampled.deps, node.id, first_pass=base.sampled.node)
        if second.params.get("loras"):
            raise _Fail("model", "value_not_in_list", "genserve's refiner runs without LoRAs")
        refiner = {"model": second.params["model"], "switch_at": round(base.end / base.steps, 6)}
        return Sampled(
            {**first, "refiner": refiner}, base.sampled.deps, node.id, first_pass=base.sampled.node
        )

    def _sample(
        self,
        node: GraphNode,
        seed: int,
        denoise: float = 1.0,
        strength: float | None = None,
        latent: Latent | None = None,
    ) -> Sampled:
        model: ModelVal = self._in(node, "model")
        if model.model in self.res.video_models():
            raise _Fail(
                "model",
                "invalid_input_type",
                f"'{model.model}' is a video model: it samples in a KSampler with an "
                "EmptyHunyuanLatentVideo or EmptyLTXVLatentVideo latent",
            )
        positive, negative = self._conditioning(node, model)
        sampler = self._sampler(node)
        steps = node.inputs["steps"]
        params: dict[str, Any] = {
            "prompt": positive.text,
            "negative_prompt": negative.text,
            "model": model.model,
            "seed": seed % (MAX_SEED + 1),
            "steps": steps,
            "cfg_scale": float(node.inputs["cfg"]),
            "sampler": sampler,
            "num_images": 1,
        }
        if model.loras:
            params["loras"] = [{"name": name, "weight": weight} for name, weight in model.loras]
        deps: list[str] = []
        if positive.controls:
            params["controlnets"] = [
                {"model": c.model, "image": c.image.ref(0), "scale": c.scale, "start": c.start, "end": c.end}
                for c in positive.controls
            ]
            deps += [c.image.stage for c in positive.controls if c.image.stage]
        latent = latent or self._in(node, "latent_image")
        if isinstance(latent, Unfinished):
            raise _Fail("latent_image", "invalid_input_type", _LEFTOVER)
        if isinstance(latent, Resized) and isinstance(latent.source, Sampled):
            hires = self._as_hires(latent, params, steps, denoise, strength)
            if hires is not None:
                return Sampled(hires, latent.source.deps, node.id, first_pass=latent.source.node)
            decoded = self._one(self._decode(latent.source, [node.id]), "latent_image")
            latent = FromPicture(decoded, size=(latent.width, latent.height))
        if isinstance(latent, Sampled):
            latent = FromPicture(self._one(self._decode(latent, [node.id]), "latent_image"))
        if isinstance(latent, Empty):
            if denoise < 1 or strength is not None:
                raise _Fail(
                    "denoise" if strength is None else "start_at_step",
                    "value_bigger_than_max",
                    "a partial schedule needs a latent made from a picture (VAEEncode)",
                )
            params.update(width=latent.width, height=latent.height, num_images=latent.batch)
        else:
            assert isinstance(latent, FromPicture)
            if latent.vae not in (None, model.model):
                raise _Fail(
                    "latent_image",
                    "invalid_input_type",
                    f"encoded with '{latent.vae}''s VAE; genserve encodes with the sampling model's ('{model.model}')",
                )
            total, run = denoise_to_strength(steps, denoise) if strength is None else (steps, strength)
            params.update(steps=total, strength=run, init_image=latent.image.ref(0))
            if latent.image.stage:
                deps.append(latent.image.stage)
            size = latent.size or latent.image.size
            if size is not None:
                params.update(width=size[0] // 8 * 8, height=size[1] // 8 * 8)
            if latent.size is None:  # VAEEncode crops a picture to whole latents; LatentUpscale stretches
                params["resize_mode"] = "crop"
            if latent.mask is not None:
                params["mask"] = latent.mask
                params["inpaint"] = {"fill": latent.fill, "mask_blur": latent.mask_blur}
        return Sampled(params, tuple(deps), node.id)

    def _as_hires(
        self, latent: Resized, params: dict[str, Any], steps: int, denoise: float, strength: float | None
    ) -> dict[str, Any] | None:
        """The first pass's params with a hires pass, when this KSampler is one genserve can run
        as the same job's second pass: a txt2img first pass with the same model, prompts and CFG."""
        first = latent.source
        assert isinstance(first, Sampled)
        same = ("prompt", "negative_prompt", "model", "cfg_scale", "loras", "controlnets")
        if "init_image" in first.params or "hires" in first.params or strength is not None:
            return None
        if any(first.params.get(name) != params.get(name) for name in same):
            return None
        hires = {
            "width": latent.width,
            "height": latent.height,
            "upscaler": _LATENT_UPSCALERS[latent.method],
            "steps": steps,
            "strength": min(denoise, 1.0),
            "sampler": params["sampler"],
        }
        return {**first.params, "hires": hires}

    # -- images ----------------------------------------------------------------------------------

    def _VAEDecode(self, node: GraphNode) -> tuple[Any, ...]:
        samples, vae = self._in(node, "samples"), self._in(node, "vae")
        if isinstance(samples, Sampled):
            own = {samples.params["model"], samples.params.get("refiner", {}).get("model")}
            if vae not in own:
                raise _Fail(
                    "vae",
                    "invalid_input_type",
                    f"genserve decodes with the sampling model's VAE, not '{vae}''s",
                )
            if samples.video:
                return (Clip(samples, (node.id,)),)
            return (self._decode(samples, [node.id]),)
        if isinstance(samples, FromPicture) and samples.mask is None and samples.size is None:
            return (samples.image,)  # encode then decode: the picture itself
        if isinstance(samples, Unfinished):
            raise _Fail("samples", "invalid_input_type", _LEFTOVER)
        raise _Fail("samples", "invalid_input_type", "genserve decodes latents that a KSampler made")

    def _ImageScale(self, node: GraphNode) -> tuple[Any, ...]:
        image: Images = self._in(node, "image")
        width, height = node.inputs["width"], node.inputs["height"]
        if width < 1 or height < 1:
            raise _Fail("width", "value_smaller_than_min", "give both width and height")
        params = {
            "width": width,
            "height": height,
            "method": node.inputs["upscale_method"],
            "crop": node.inputs["crop"],
            "source": [image.ref(i) for i in range(image.count)],
        }
        deps = (image.stage,) if image.stage else ()
        key = self._add_stage("scale", params, deps, image.count, [node.id])
        return (Images(key, (), image.count, (width, height)),)

    def _ImageUpscaleWithModel(self, node: GraphNode) -> tuple[Any, ...]:
        (name, scale), image = self._in(node, "upscale_model"), self._in(node, "image")
        params = {"model": name, "scale": scale, "source": [image.ref(i) for i in range(image.count)]}
        deps = (image.stage,) if image.stage else ()
        key = self._add_stage("upscale", params, deps, image.count, [node.id])
        size = None if image.size is None else (round(image.size[0] * scale), round(image.size[1] * scale))
        return (Images(key, (), image.count, size),)

    def _SaveImage(self, node: GraphNode) -> tuple[Any, ...]:
        prefix = str(node.inputs["filename_prefix"]) or "ComfyUI"
        self.outputs.append(Output(node.id, self._in(node, "images"), "output", prefix))
        return ()

    def _PreviewImage(self, node: GraphNode) -> tuple[Any, ...]:
        self.outputs.append(Output(node.id, self._in(node, "images"), "temp", "ComfyUI_temp"))
        return ()

    # -- video outputs: the save node picks the file the video job's worker encodes ----------------

    def _clip(self, node: GraphNode, name: str) -> Clip:
        clip = self._in(node, name)
        if not isinstance(clip, Clip):
            raise _Fail(
                name, "invalid_input_type", "needs a video model's frames (VAEDecode of its KSampler)"
            )
        return clip

    def _save_clip(
        self, node: GraphNode, clip: Clip, fps: float, output: dict[str, Any], extension: str
    ) -> tuple[Any, ...]:
        if fps != int(fps):
            raise _Fail("fps", "value_not_in_list", "genserve encodes a whole number of frames per second")
        sampled = clip.sampled
        params = {**sampled.params, "fps": int(fps), "output": output}
        nodes = [sampled.node, *clip.nodes]
        key = self._add_stage("video", params, sampled.deps, 1, nodes, main=sampled.node)
        size = (sampled.params["width"], sampled.params["height"])
        prefix = str(node.inputs["filename_prefix"]) or "ComfyUI"
        images = Images(key, (), 1, size)
        self.outputs.append(Output(node.id, images, "output", prefix, extension, video=True))
        return ()

    def _SaveAnimatedWEBP(self, node: GraphNode) -> tuple[Any, ...]:
        if node.inputs["lossless"]:
            raise _Fail("lossless", "value_not_in_list", "genserve's animated WebP is lossy (quality 80)")
        clip = self._clip(node, "images")
        return self._save_clip(node, clip, node.inputs["fps"], {"container": "webp"}, "webp")

    def _SaveAnimatedPNG(self, node: GraphNode) -> tuple[Any, ...]:
        # The worker writes a WebP; the driver turns it into an APNG (video encode has no APNG).
        clip = self._clip(node, "images")
        return self._save_clip(node, clip, node.inputs["fps"], {"container": "webp"}, "png")

    def _SaveWEBM(self, node: GraphNode) -> tuple[Any, ...]:
        crf = float(node.inputs["crf"])
        if crf != int(crf):
            raise _Fail("crf", "value_not_in_list", "genserve's crf is a whole number")
        output = {"container": "webm", "codec": node.inputs["codec"], "crf": int(crf)}
        return self._save_clip(node, self._clip(node, "images"), node.inputs["fps"], output, "webm")

    def _CreateVideo(self, node: GraphNode) -> tuple[Any, ...]:
        return (replace(self._clip(node, "images"), fps=float(node.inputs["fps"])),)

    def _SaveVideo(self, node: GraphNode) -> tuple[Any, ...]:
        clip = self._clip(node, "video")
        output = {"container": "mp4", "codec": "h264"}  # format auto/mp4, codec auto/h264
        return self._save_clip(node, clip, clip.fps or 30.0, output, "mp4")

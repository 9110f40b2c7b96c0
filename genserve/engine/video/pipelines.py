"""The video model runner: the only video code that loads diffusers pipelines.

One folder serves several pipeline classes (an LTX folder runs LTXConditionPipeline, a Wan T2V
folder also runs WanVideoToVideoPipeline); the engine picks the class per mode and shares the
loaded components between them. Which mode each family takes is `families.VIDEO_PIPELINES`; the API
refuses mismatches up front, and `generate` checks them again with a ValueError.

How each mode maps onto diffusers:

| family      | t2v                 | i2v                        | flf2v / keyframes              | v2v (restyle / extend)            |
|-------------|---------------------|----------------------------|--------------------------------|-----------------------------------|
| wan         | WanPipeline         | WanImageToVideo (image=)   | WanImageToVideo (last_image=)  | WanVideoToVideo (strength)        |
| ltx         | LTXCondition        | image condition at frame 0 | image conditions at their frames | video condition at frame 0      |
| svd         | —                   | StableVideoDiffusion       | —                              | —                                 |
| animatediff | AnimateDiff(SDXL)   | —                          | keyframes: AnimateDiffSparseControlNet (a SparseCtrl model) | AnimateDiffVideoToVideo (strength) |

SparseCtrl keyframes (AnimateDiff SD1.5 with `request.sparsectrl`): the pictures are the
conditioning frames at their frame indexes, the others are masked out (the conditioning mask
channel). The SparseCtrl pipeline is built from the model's loaded AnimateDiff components plus the
SparseCtrl model, so nothing is loaded twice. An RGB SparseCtrl VAE-encodes its pictures by sampling
the posterior with torch's global generator (diffusers passes none); the engine runs that call with
the global generator seeded from the request's seed (and restored after), so a seed gives one clip.
"""

from __future__ import annotations

import importlib
import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AnimateDiffPipeline,
    AnimateDiffSDXLPipeline,
    AnimateDiffSparseControlNetPipeline,
    AnimateDiffVideoToVideoPipeline,
    DiffusionPipeline,
    LTXConditionPipeline,
    MotionAdapter,
    SparseControlNetModel,
    StableVideoDiffusionPipeline,
    WanImageToVideoPipeline,
    WanPipeline,
    WanVideoToVideoPipeline,
)
from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition

from genserve.engine.errors import ModelLoadError
from genserve.engine.models.controls import ControlInfo
from genserve.engine.models.registry import ModelInfo
from genserve.engine.video.families import VIDEO_FAMILIES, keyframes_needed, served_modes
from genserve.engine.video.previews import fit_video_rgb_map, preview_frames, video_latent_frames
from genserve.schemas.video import VideoParams

# A motion folder with this file needs genserve-shapes-motion's own UNet (see _from_motion_adapter).
MOTION_TEXT_FILE = "motion_text_conditioning.safetensors"

# FreeNoise context windows overlap by the window minus this stride.
FREE_NOISE_STRIDE = 4


@dataclass
class VideoRequest:
    params: VideoParams  # resolved: width, height, num_frames, fps, steps, guidance, seed and mode are set
    keyframes: list[tuple[int, PIL.Image.Image]] = field(default_factory=list)  # (frame index, picture)
    video: np.ndarray | None = None  # (F, H, W, 3) uint8: v2v input, or the frames an "extend" continues
    preview_every: int = 0
    # AnimateDiff keyframes: the SparseCtrl model `params.sparsectrl.model` names (models/controls.py).
    sparsectrl: ControlInfo | None = None


@dataclass
class _Loaded:
    pipe: DiffusionPipeline
    rgb_map: Any = None  # fitted on the first preview


class WanFirstLastToVideoPipeline(WanImageToVideoPipeline):
    """Wan image-to-video that also takes a single first frame on an FLF2V checkpoint.

    An FLF2V transformer (`pos_embed_seq_len` set) embeds exactly two CLIP pictures; diffusers'
    pipeline gives it one when `last_image` is None and the reshape fails. Here a lone first frame
    is embedded twice, while the VAE conditioning (and its mask) still fixes the first frame only.
    """

    def encode_image(self, image: Any, device: torch.device | None = None) -> torch.Tensor:
        two_pictures = self.transformer is not None and self.transformer.config.pos_embed_seq_len
        if two_pictures and not isinstance(image, list):
            image = [image, image]
        return super().encode_image(image, device)


def pipeline_class(info: ModelInfo, mode: str) -> type[DiffusionPipeline]:
    """The diffusers class that runs `mode` on the model in `info`."""
    family = info.family
    if family == "wan":
        if mode in ("i2v", "flf2v"):
            return WanFirstLastToVideoPipeline
        return WanVideoToVideoPipeline if mode == "v2v" else WanPipeline
    if family == "ltx":
        return LTXConditionPipeline
    if family == "svd":
        return StableVideoDiffusionPipeline
    if family == "animatediff_sdxl":
        return AnimateDiffSDXLPipeline
    if family == "animatediff":
        return AnimateDiffVideoToVideoPipeline if mode == "v2v" else AnimateDiffPipeline
    raise ValueError(f"{info.name} is not a video model (family {family})")


class VideoEngine:
    def __init__(self, device: str = "cpu", dtype: torch.dtype | None = None, max_loaded: int = 1) -> None:
        self.device = device
        self.dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[tuple[str, str], _Loaded] = OrderedDict()

    def loaded_models(self) -> list[str]:
        return list(dict.fromkeys(name for name, _ in self._loaded))

    def load(self, info: ModelInfo, mode: str, base: ModelInfo | None = None) -> DiffusionPipeline:
        return self._load(info, mode, base).pipe

    def _load(
        self, info: ModelInfo, mode: str, base: ModelInfo | None, sparsectrl: ControlInfo | None = None
    ) -> _Loaded:
        if sparsectrl is not None:
            return self._load_sparsectrl(info, base, sparsectrl)
        cls = pipeline_class(info, mode)
        key = (info.name, cls.__name__)
        if key in self._loaded:
            self._loaded.move_to_end(key)
            return self._loaded[key]
        sibling = next((entry for (name, _), entry in self._loaded.items() if name == info.name), None)
        try:
            if sibling is not None:  # same weights, another pipeline class: share the components
                pipe = _share_components(cls, sibling.pipe)
            elif info.base_model is not None:
                pipe = self._from_motion_adapter(info, cls, base)
            else:
                pipe = cls.from_pretrained(info.path, dtype=self.dtype, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ModelLoadError(f"cannot load video model {info.name} as {cls.__name__}: {error}") from error
        pipe.set_progress_bar_config(disable=True)
        self._loaded[key] = entry = _Loaded(pipe.to(self.device))
        while len(self.loaded_models()) > self.max_loaded:
            oldest = self.loaded_models()[0]
            for stale in [k for k in self._loaded if k[0] == oldest]:
                del self._loaded[stale]
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # hand the evicted weights' memory back at once
        return entry

    def _load_sparsectrl(self, info: ModelInfo, base: ModelInfo | None, sparsectrl: ControlInfo) -> _Loaded:
        """AnimateDiffSparseControlNetPipeline: the model's AnimateDiff components plus the SparseCtrl."""
        key = (info.name, f"{AnimateDiffSparseControlNetPipeline.__name__}:{sparsectrl.path}")
        if key in self._loaded:
            self._loaded.move_to_end(key)
            return self._loaded[key]
        animatediff = self._load(info, "t2v", base).pipe
        try:
            controlnet = SparseControlNetModel.from_pretrained(
                sparsectrl.path, dtype=self.dtype, local_files_only=True
            )
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ModelLoadError(f"cannot load SparseCtrl model {sparsectrl.name}: {error}") from error
        cls = AnimateDiffSparseControlNetPipeline
        expected, optional = cls._get_signature_keys(cls)
        components = {
            name: module
            for name, module in animatediff.components.items()
            if name in expected or name in optional
        }
        components.setdefault("motion_adapter", None)
        pipe = cls(**components, controlnet=controlnet.to(self.device))
        pipe.set_progress_bar_config(disable=True)
        self._loaded[key] = entry = _Loaded(pipe)
        return entry

    def _from_motion_adapter(self, info: ModelInfo, cls: type, base: ModelInfo | None) -> DiffusionPipeline:
        if base is None or base.name != info.base_model:
            raise ModelLoadError(
                f"{info.name} is a motion adapter for {info.base_model}; pass that model as base"
            )
        if (Path(info.path) / MOTION_TEXT_FILE).is_file() and cls is AnimateDiffPipeline:
            # genserve-shapes-motion: its UNet keeps the base UNet's text addition embedding and
            # feeds the prompt to every motion module (toymodel/motion.py), which diffusers'
            # UNetMotionModel.from_unet2d would drop; the model's own loader builds it.
            from genserve.toymodel.motion_eval import load_motion_pipeline

            return load_motion_pipeline(base.path, info.path, sampler=info.default_sampler or "dpmpp_2m")
        adapter = MotionAdapter.from_pretrained(info.path, dtype=self.dtype, local_files_only=True)
        overrides = _motion_overrides(info.path, base.path, self.dtype)
        return cls.from_pretrained(
            base.path, motion_adapter=adapter, **overrides, dtype=self.dtype, local_files_only=True
        )

    def generate(
        self,
        info: ModelInfo,
        request: VideoRequest,
        on_step: Callable[[int, int], None] | None = None,
        on_preview: Callable[[int, int, np.ndarray], None] | None = None,
        base: ModelInfo | None = None,
    ) -> np.ndarray:
        """Make one clip; returns its frames as (F, H, W, 3) uint8. Exceptions from on_step propagate."""
        params = request.params
        # 1. Check what the API should already have refused.
        _check(info, request)
        entry = self._load(info, params.mode, base, request.sparsectrl)
        pipe = entry.pipe

        # 2. Progress and previews, once per denoising step.
        def step_end(pipeline: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            total = getattr(pipeline, "_num_timesteps", None) or params.steps
            if on_step is not None:
                on_step(i + 1, total)
            every = request.preview_every
            if on_preview is not None and every and (i + 1) % every == 0:
                if entry.rgb_map is None:
                    entry.rgb_map = fit_video_rgb_map(pipe, info.family)
                frames = video_latent_frames(
                    tensors["latents"], info.family, num_frames=params.num_frames,
                    height=params.height, width=params.width, pipe=pipe,
                )  # fmt: skip
                on_preview(i + 1, total, preview_frames(frames, entry.rgb_map))
            return {}

        # 3. The family's own arguments for this mode, then the shared ones.
        kwargs = _mode_arguments(info.family, request, pipe)
        kwargs.update(
            height=params.height,
            width=params.width,
            num_inference_steps=params.steps,
            generator=torch.Generator("cpu").manual_seed(params.seed),
            output_type="np",
            callback_on_step_end=step_end,
        )
        if info.family != "svd":
            kwargs.update(prompt=params.prompt, negative_prompt=params.negative_prompt or None,
                          guidance_scale=params.guidance)  # fmt: skip
        if params.mode != "v2v" or info.family == "ltx":
            kwargs["num_frames"] = params.num_frames

        # 4. Run, with FreeNoise windows for this call only (the pipeline is cached).
        free_noise = params.long is not None and params.long.strategy == "free_noise"
        if free_noise and not hasattr(pipe, "enable_free_noise"):
            raise ValueError(f"free_noise needs an AnimateDiff (SD1.5) model; {info.name} is {info.family}")
        if free_noise:
            window = VIDEO_FAMILIES[info.family].max_window_frames or 16
            pipe.enable_free_noise(
                context_length=min(16, window, params.num_frames), context_stride=FREE_NOISE_STRIDE
            )
        try:
            if request.sparsectrl is not None:  # the RGB keyframes' VAE posterior draws from torch's RNG
                devices = [torch.device(self.device)] if torch.device(self.device).type == "cuda" else []
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(params.seed)
                    frames = pipe(**kwargs).frames[0]
            else:
                frames = pipe(**kwargs).frames[0]
        finally:
            if free_noise:
                pipe.disable_free_noise()
        return (np.asarray(frames, dtype=np.float32).clip(0, 1) * 255).round().astype(np.uint8)


def _motion_overrides(motion: Path, base: Path, dtype: torch.dtype) -> dict[str, Any]:
    """Components a motion folder brings besides its adapter, in place of its base model's: a text
    encoder and tokenizer that know the motion words (genserve-shapes-motion), a scheduler."""
    index = json.loads((base / "model_index.json").read_text())
    overrides: dict[str, Any] = {}
    for name in ("text_encoder", "tokenizer", "scheduler"):
        folder = motion / name
        if not folder.is_dir() or not isinstance(index.get(name), list) or None in index[name]:
            continue
        library, class_name = index[name]
        component = getattr(importlib.import_module(library), class_name)
        kwargs = {"dtype": dtype} if name == "text_encoder" else {}
        overrides[name] = component.from_pretrained(folder, local_files_only=True, **kwargs)
    return overrides


def _share_components(cls: type[DiffusionPipeline], pipe: DiffusionPipeline) -> DiffusionPipeline:
    """`cls` built from an already loaded pipeline's modules (no copy, no dtype cast, unlike from_pipe)."""
    expected, optional = cls._get_signature_keys(cls)
    components = {
        name: module for name, module in pipe.components.items() if name in expected or name in optional
    }
    return cls(**components)


def _check(info: ModelInfo, request: VideoRequest) -> None:
    params = request.params
    if info.kind != "video":
        raise ValueError(f"{info.name} is not a video model")
    modes = served_modes(info.family, info.video_modes, sparsectrl=request.sparsectrl is not None)
    if params.mode not in modes:
        raise ValueError(f"{info.name} does not do {params.mode} (it does: {', '.join(modes)})")
    if (params.sparsectrl is None) != (request.sparsectrl is None):
        raise ValueError(
            "params.sparsectrl names a SparseCtrl model; request.sparsectrl must be its ControlInfo"
        )
    if request.sparsectrl is not None and params.mode != "keyframes":
        raise ValueError(f"a SparseCtrl model conditions keyframes mode, not {params.mode}")
    missing = [name for name in ("width", "height", "num_frames", "fps", "steps", "guidance", "seed")
               if getattr(params, name) is None]  # fmt: skip
    if missing:
        raise ValueError(f"unresolved video parameters: {', '.join(missing)}")
    family = VIDEO_FAMILIES[info.family]
    problem = family.frame_problem(params.num_frames)
    problem = (
        problem or family.size_problem("width", params.width) or family.size_problem("height", params.height)
    )
    if problem:
        raise ValueError(problem)
    least, most = keyframes_needed(params.mode)
    count = len(request.keyframes)
    if count < least or (most is not None and count > most):
        raise ValueError(f"{params.mode} takes {least}{'' if most == least else '+'} keyframes, got {count}")
    if params.mode == "v2v" and (request.video is None or len(request.video) == 0):
        raise ValueError("v2v needs input frames (request.video)")
    if any(not 0 <= index < params.num_frames for index, _ in request.keyframes):
        raise ValueError(f"keyframe indexes must lie in 0..{params.num_frames - 1}")


def _mode_arguments(family: str, request: VideoRequest, pipe: Any) -> dict[str, Any]:
    """The conditioning arguments of `request.params.mode` for this family's pipeline."""
    params, keyframes = request.params, sorted(request.keyframes, key=lambda pair: pair[0])
    pictures = [picture.convert("RGB") for _, picture in keyframes]
    video = [PIL.Image.fromarray(frame) for frame in request.video] if request.video is not None else None
    if family == "ltx":
        if params.mode == "v2v":
            # Frames shorter than the clip are a segment to continue ("extend"): kept as they are,
            # the rest is new. A whole clip is restyled: conditioned at 1 - strength, so strength 1
            # ignores it.
            assert video is not None
            extend = len(video) < params.num_frames or (
                params.long is not None and params.long.strategy == "extend"
            )
            strength = 1.0 if extend else 1.0 - params.strength
            condition = LTXVideoCondition(video=video, frame_index=0, strength=strength)
            return {"conditions": [condition], "frame_rate": params.fps}
        conditions = [
            LTXVideoCondition(image=pic, frame_index=index)
            for (index, _), pic in zip(keyframes, pictures, strict=True)
        ]
        return {"conditions": conditions or None, "frame_rate": params.fps}
    if family == "wan" and params.mode in ("i2v", "flf2v"):
        return {"image": pictures[0], "last_image": pictures[1] if params.mode == "flf2v" else None}
    if family == "svd":
        return {"image": pictures[0], "fps": params.fps, "max_guidance_scale": params.guidance,
                "min_guidance_scale": min(1.0, params.guidance), "decode_chunk_size": 8}  # fmt: skip
    if params.mode == "v2v":
        return {"video": video, "strength": params.strength}
    if params.mode == "keyframes":  # AnimateDiff with a SparseCtrl model (checked in _check)
        assert params.sparsectrl is not None
        return {
            "conditioning_frames": pictures,
            "controlnet_frame_indices": [index for index, _ in keyframes],
            "controlnet_conditioning_scale": float(params.sparsectrl.strength),
        }
    return {}

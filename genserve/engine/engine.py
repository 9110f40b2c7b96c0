"""The engine: loads registered models and turns resolved GenerationParams into images.

This package (with `loading`, `samplers` and `fixtures`) is the only place that imports torch or
diffusers. One `Engine` lives in each worker process; it is not tied to any queue or store.

Reproducibility: image i of a request uses seed + i. Its initial noise is drawn on the CPU from
`torch.Generator("cpu").manual_seed(seed + i)`, so it does not depend on the GPU model, and the same
generator feeds ancestral samplers' per-step noise. With the same seed, model, sampler, size,
num_images and device/dtype, pixels are identical. Image i of a batch and a single run with seed + i
start from the same noise, but batched kernels round differently: they agree to about one level.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import PIL.Image
import torch
from diffusers import DiffusionPipeline

from genserve.engine.errors import EngineError, ModelLoadError, OutOfMemory, UnsupportedSampler
from genserve.engine.loading import load_pipeline, resolve_device, resolve_dtype
from genserve.engine.previews import LatentRgbMap, fit_latent_rgb_map, preview_images
from genserve.engine.registry import SUPPORTED_SAMPLERS, ModelInfo, sampler_supported
from genserve.engine.samplers import build_scheduler
from genserve.schemas.generation import GenerationParams

__all__ = ["Engine", "EngineError", "ModelLoadError", "OutOfMemory", "UnsupportedSampler"]

StepCallback = Callable[[int, int], None]
PreviewCallback = Callable[[int, int, list[PIL.Image.Image]], None]


class Engine:
    def __init__(
        self,
        models: Mapping[str, ModelInfo],
        *,
        device: str = "auto",
        dtype: str = "auto",
        threads: int | None = None,
    ) -> None:
        if threads:
            # On a shared CPU, more torch threads than free cores is ~10x slower, not faster.
            torch.set_num_threads(threads)
        self._models = dict(models)
        self._device = resolve_device(device)
        self._dtype = resolve_dtype(dtype, self._device)
        self._pipelines: dict[str, DiffusionPipeline] = {}
        self._preview_maps: dict[str, LatentRgbMap] = {}
        self._load_lock = threading.Lock()

    @property
    def device(self) -> str:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def load(self, name: str) -> None:
        """Load model `name` into the cache (no-op if loaded); raises ModelLoadError on failure."""
        if name in self._pipelines:
            return  # the common case: no lock, so a long load of another model never blocks generation
        with self._load_lock:
            if name in self._pipelines:
                return
            info = self._model_info(name)
            pipe = load_pipeline(info, self._models, device=self._device, dtype=self._dtype)
            self._preview_maps[name] = fit_latent_rgb_map(pipe.vae, pipe.vae_scale_factor)
            self._pipelines[name] = pipe

    def knows(self, name: str) -> bool:
        return name in self._models

    def update_models(self, models: Mapping[str, ModelInfo]) -> None:
        """Register models added to the models directory since start (loaded ones stay cached)."""
        self._models.update(models)

    def loaded_models(self) -> list[str]:
        return list(self._pipelines)

    def warmup(self, name: str) -> None:
        """Load `name` and run one 1-step generation at its native size (first-call kernels, allocator)."""
        info = self._model_info(name)
        self.load(name)
        self.generate(
            GenerationParams(
                prompt="warmup",
                model=name,
                seed=0,
                steps=1,
                width=info.native_width,
                height=info.native_height,
            )
        )

    def generate(
        self,
        params: GenerationParams,
        on_step: StepCallback | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> list[PIL.Image.Image]:
        """Generate `params.num_images` images; image i uses seed `params.seed + i`.

        `on_step(step, total)` runs after every denoising step (1-based). An exception it raises
        stops the run and propagates unchanged; that is how a worker cancels a job.
        `on_preview(step, total, images)` gets cheap latent→RGB previews every `params.preview_every`
        steps (never on the last step: the real images follow).
        """
        # 0. Check inputs
        if params.model is None or params.seed is None or params.width is None or params.height is None:
            raise ValueError("generate() needs resolved params: model, seed, width and height must be set")
        info = self._model_info(params.model)
        if not sampler_supported(info.family, params.sampler):
            raise UnsupportedSampler(
                f"sampler '{params.sampler}' is not supported for {info.family} model '{info.name}'; "
                f"supported: {', '.join(SUPPORTED_SAMPLERS[info.family])}"
            )
        self.load(info.name)
        pipe = self._pipelines[info.name]
        multiple = size_multiple(pipe)
        if params.width % multiple or params.height % multiple:
            raise EngineError(
                f"width and height must be multiples of {multiple} for model '{info.name}' "
                f"(got {params.width}x{params.height})"
            )

        # 1. A per-call pipeline with the requested sampler; the cached one is never modified
        scheduler = build_scheduler(info.family, params.sampler, pipe.scheduler.config)
        call_pipe = copy.copy(pipe)
        call_pipe.scheduler = scheduler

        # 2. Initial noise, seeded per image on the CPU
        generators = cpu_generators(image_seeds(params.seed, params.num_images))
        latents = initial_noise(generators, latent_shape(pipe, params.width, params.height))
        if info.family == "sd3":
            # The SD/SDXL pipelines scale given latents by init_noise_sigma; SD3's uses them as they are.
            latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)
        latents = latents.to(device=self._device, dtype=self._dtype)

        # 3. Denoise and decode
        preview_every = params.preview_every or 0
        progress = _StepReporter(
            on_step, on_preview if preview_every else None, preview_every, self._preview_maps[info.name]
        )
        try:
            with torch.inference_mode():
                output = call_pipe(
                    prompt=params.prompt,
                    negative_prompt=params.negative_prompt or None,
                    num_inference_steps=params.steps,
                    guidance_scale=params.cfg_scale,
                    width=params.width,
                    height=params.height,
                    num_images_per_prompt=params.num_images,
                    latents=latents,
                    generator=generators,
                    callback_on_step_end=progress,
                    output_type="pil",
                )
        except BaseException as error:
            if error is progress.raised or not isinstance(error, Exception):
                raise  # cancellation from on_step, KeyboardInterrupt, ...: not ours to translate
            if is_out_of_memory(error):
                self._release_cached_memory()
                size = f"{params.width}x{params.height}"
                raise OutOfMemory(
                    f"out of memory generating {params.num_images} image(s) at {size} on {self._device}: "
                    f"{_first_line(error)}"
                ) from error
            raise EngineError(f"generation failed: {type(error).__name__}: {_first_line(error)}") from error
        return list(output.images)

    def _model_info(self, name: str) -> ModelInfo:
        if name not in self._models:
            known = ", ".join(sorted(self._models)) or "none"
            raise ModelLoadError(f"unknown model '{name}'; registered models: {known}")
        return self._models[name]

    def _release_cached_memory(self) -> None:
        if torch.device(self._device).type == "cuda":
            torch.cuda.empty_cache()


class _StepReporter:
    """callback_on_step_end adapter: reports (step, total), previews, and remembers what a callback raised."""

    def __init__(
        self,
        on_step: StepCallback | None,
        on_preview: PreviewCallback | None,
        preview_every: int,
        rgb_map: LatentRgbMap,
    ) -> None:
        self.on_step = on_step
        self.on_preview = on_preview
        self.preview_every = preview_every
        self.rgb_map = rgb_map
        self.raised: BaseException | None = None

    def __call__(self, pipe: DiffusionPipeline, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        step, total = i + 1, pipe.num_timesteps
        try:
            if self.on_step is not None:
                self.on_step(step, total)
            if self.on_preview is not None and step % self.preview_every == 0 and step < total:
                self.on_preview(step, total, preview_images(tensors["latents"], self.rgb_map))
        except BaseException as error:
            self.raised = error
            raise
        return {}  # no tensor is replaced


# Pure helpers: seeds, noise and shapes


def image_seeds(seed: int, num_images: int) -> list[int]:
    """Image i of a request uses seed + i, so any image can be reproduced on its own."""
    return [seed + i for i in range(num_images)]


def cpu_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def initial_noise(generators: Sequence[torch.Generator], shape: tuple[int, int, int]) -> torch.Tensor:
    """Unit Gaussian latents (batch, *shape) in float32 on the CPU; row i comes from generator i only."""
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators])


def latent_shape(pipe: DiffusionPipeline, width: int, height: int) -> tuple[int, int, int]:
    denoiser = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    scale = pipe.vae_scale_factor
    return denoiser.config.in_channels, height // scale, width // scale


def size_multiple(pipe: DiffusionPipeline) -> int:
    """Pixel sizes must divide into whole latents (and whole patches for transformer models)."""
    patch = pipe.transformer.config.patch_size if hasattr(pipe, "transformer") else 1
    return max(8, pipe.vae_scale_factor * patch)


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    # Some backends (MPS, older CUDA paths) raise a plain RuntimeError.
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else "(no message)"

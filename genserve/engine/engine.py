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

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline

from genserve.engine.batch import denoise_batch
from genserve.engine.conditioning.latents import EncodingCache, LatentDist, encode_pixels, pixels_to_tensor
from genserve.engine.conditioning.lora import ActiveLora, HotswapAdapter, LoraAdapters
from genserve.engine.errors import EngineError, ModelLoadError, OutOfMemory, UnsupportedSampler
from genserve.engine.loop.denoise import (
    BatchItem,
    BatchStepCallback,
    ItemOutcome,
    PreviewCallback,
    StepCallback,
)
from genserve.engine.loop.previews import LatentRgbMap, fit_latent_rgb_map
from genserve.engine.loop.row import start_index
from genserve.engine.models.cache import ModelCache, budget_bytes, estimate_bytes
from genserve.engine.models.control_loading import Annotators, ControlModels, ip_adapter_loaded
from genserve.engine.models.controls import ControlInfo, control_problems, scan_annotators, scan_controls
from genserve.engine.models.loading import load_pipeline, resolve_device, resolve_dtype
from genserve.engine.models.loras import LoraInfo, builtin_loras, registered_loras
from genserve.engine.models.registry import SUPPORTED_SAMPLERS, ModelInfo, sampler_supported
from genserve.engine.models.samplers import build_scheduler
from genserve.engine.models.upscalers import UpscalerInfo, face_detectors, scan_upscalers
from genserve.engine.speed.optimize import (
    AppliedOptimizations,
    EngineOptimizations,
    WarmupRun,
    apply_optimizations,
)
from genserve.engine.stages.plan import output_size, refiner_problem, schedule_error
from genserve.engine.upscale.stage import PostStage, post_process_batch, register_hires_upscaler
from genserve.schemas.generation import GenerationParams, batch_key

if TYPE_CHECKING:
    from genserve.config import Settings

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineError", "ModelLoadError", "OutOfMemory", "UnsupportedSampler"]


# Peak activation memory per image and megapixel in half precision (CFG pair included): rough,
# conservative guesses (not measured here; no GPU yet) dominated by the VAE decode at large sizes.
_ACTIVATION_BYTES_PER_MEGAPIXEL = {"sd15": 2.5e9, "sdxl": 3.0e9, "sd3": 3.5e9}


def activation_room_bytes(free_bytes: int, reserved_bytes: int, weight_bytes: int) -> int:
    """Device memory a batch's activations can use: what the driver has free plus what our caching
    allocator holds beyond the loaded weights.

    A running batch's activations sit inside `reserved_bytes` (growing it takes the same bytes from
    `free_bytes`), so the room is the same whether the next batch is planned between batches or
    during one (the worker prefetches the next batch while the current one runs its last step).
    """
    return max(0, free_bytes + reserved_bytes - weight_bytes)


class Engine:
    def __init__(
        self,
        models: Mapping[str, ModelInfo],
        *,
        device: str = "auto",
        dtype: str = "auto",
        threads: int | None = None,
        vram_budget_gib: float | None = None,
        ram_budget_gib: float | None = None,
        offload_to_cpu: bool = True,
        warmup_on_load: bool = False,
        optimizations: EngineOptimizations | None = None,
        upscalers: Mapping[str, UpscalerInfo] | None = None,
        face_detector: Path | None = None,
        loras: Mapping[str, LoraInfo] | Callable[[], Mapping[str, LoraInfo]] | None = None,
        lora_cache_size: int = 8,
        lora_hotswap_preload: str | None = None,
        controls: Mapping[str, ControlInfo] | None = None,
        annotators: Mapping[str, Path] | None = None,
    ) -> None:
        if threads:
            # On a shared CPU, more torch threads than free cores is ~10x slower, not faster.
            torch.set_num_threads(threads)
        self._models = dict(models)
        self._device = resolve_device(device)
        self._dtype = resolve_dtype(dtype, self._device)
        self._preview_maps: dict[str, LatentRgbMap] = {}
        self._warmup_on_load = warmup_on_load
        self._optimizations = optimizations or EngineOptimizations()
        self._applied: dict[str, AppliedOptimizations] = {}
        self._encodings = EncodingCache()  # VAE encodings of input pictures, by model and pixels
        # Upscalers and face restorers (engine/upscale/): after decode, and the hires fix's model upscalers.
        self.post = PostStage(upscalers, device=self._device, dtype=self._dtype, face_detector=face_detector)
        # LoRAs by name (a registry, or a callable that rescans one; default: the built-in ones) and
        # the adapters loaded into each cached pipeline.
        self._loras = loras if callable(loras) else (builtin_loras if loras is None else lambda: loras)
        self._lora_cache_size = lora_cache_size
        self._lora_hotswap_preload = lora_hotswap_preload
        self._adapters: dict[str, LoraAdapters | HotswapAdapter] = {}
        # ControlNets, T2I-Adapters, IP-Adapters (models/controls.py) and annotators, loaded on use.
        self._controls = dict(controls or {})
        self._control_models = ControlModels(self._device, self._dtype)
        self._annotators = Annotators(dict(annotators or {}), self._device)
        # Loaded pipelines live in an LRU cache bounded by the memory budgets (weights only).
        self._cache = ModelCache(
            lambda name: load_pipeline(
                self._model_info(name), self._models, device=self._device, dtype=self._dtype
            ),
            device=self._device,
            vram_budget_bytes=budget_bytes(vram_budget_gib),
            ram_budget_bytes=budget_bytes(ram_budget_gib),
            offload_to_cpu=offload_to_cpu,
            estimate=lambda name: estimate_bytes(self._models[name].path, self._dtype),
            on_load=self._prepare,
        )

    @property
    def device(self) -> str:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def load(self, name: str) -> None:
        """Load model `name` into the cache (no-op if loaded); raises ModelLoadError on failure."""
        self._model_info(name)
        self._cache.get(name)

    def pipeline(self, name: str) -> DiffusionPipeline:
        """The loaded diffusers pipeline (loading it if needed): for tools and benchmarks. Do not mutate."""
        self._model_info(name)
        return self._cache.get(name)

    def _prepare(self, name: str, pipe: DiffusionPipeline) -> None:
        """After every fresh load (never on a cache hit): fit the preview map, warm up if asked."""
        self._encodings.forget(name)
        self._adapters[name] = self._new_adapters()  # a fresh pipeline has none loaded
        if self._optimizations.lora_hotswap_rank:  # before the first LoRA load (and the compile)
            pipe.enable_lora_hotswap(target_rank=self._optimizations.lora_hotswap_rank)
            self._preload_hotswap_lora(name, pipe)
        self._preview_maps[name] = fit_latent_rgb_map(pipe.vae, pipe.vae_scale_factor)
        family = self._models[name].family
        self._applied[name] = apply_optimizations(
            pipe, family, self._optimizations, self._device, self._dtype
        )
        log.info(
            "optimizations applied", extra={"model": name, "optimizations": self._applied[name].summary()}
        )
        if self._warmup_on_load and not self._models[name].refiner:  # a refiner never runs alone
            self.warmup(name)

    def knows(self, name: str) -> bool:
        return name in self._models

    def update_models(
        self, models: Mapping[str, ModelInfo], controls: Mapping[str, ControlInfo] | None = None
    ) -> None:
        """Register models added to the models directory since start (loaded ones stay cached)."""
        self._models.update(models)
        self._controls.update(controls or {})

    def preprocess(
        self,
        name: str,
        picture: PIL.Image.Image,
        threshold_a: float | None = None,
        threshold_b: float | None = None,
    ) -> PIL.Image.Image:
        """A control map by the named preprocessor (weight-free, or an annotator's)."""
        from genserve.engine.stages.controls import preprocess_picture

        return PIL.Image.fromarray(
            preprocess_picture(name, picture, self._annotators, threshold_a, threshold_b)
        )

    def estimate_max_batch_images(self, params: GenerationParams) -> int | None:
        """How many images of this size fit in free GPU memory next to the loaded models; None on CPU.

        A rough activation budget per megapixel and family (the VAE decode is the peak at large
        sizes); operators pin exact figures with the `batch_limits` setting.
        """
        if torch.device(self._device).type != "cuda":
            return None
        device = torch.device(self._device)
        free_bytes, _ = torch.cuda.mem_get_info(device)
        room = activation_room_bytes(
            free_bytes, torch.cuda.memory_reserved(device), self._cache.resident_bytes()["device"]
        )
        family = self._model_info(params.model).family
        width, height = output_size(params, family)
        megapixels = width * height / 1e6
        per_image = (
            _ACTIVATION_BYTES_PER_MEGAPIXEL[family] * megapixels * (2 if self._dtype == torch.float32 else 1)
        )
        return max(1, int(0.8 * room // per_image))

    def loaded_models(self) -> list[str]:
        """Models on the device, most recently used first."""
        return self._cache.loaded()

    def warmup(self, name: str) -> None:
        """Load `name` and run its warm-up plan (first-call kernels, allocator, compiled shapes)."""
        info = self._model_info(name)
        self.load(name)
        applied = self._applied.get(name)
        runs = (
            applied.warmup_plan(info.native_width, info.native_height)
            if applied
            else [WarmupRun(info.native_width, info.native_height, 1, 1)]
        )
        for run in runs:
            self.generate(
                GenerationParams(
                    prompt="warmup",
                    model=name,
                    seed=0,
                    steps=run.steps,
                    width=run.width,
                    height=run.height,
                    num_images=run.num_images,
                )
            )
        if applied:
            applied.finish_warmup()

    def generate(
        self,
        params: GenerationParams,
        on_step: StepCallback | None = None,
        on_preview: PreviewCallback | None = None,
        *,
        init_image: PIL.Image.Image | None = None,
        mask: PIL.Image.Image | None = None,
        control_images: dict[str, PIL.Image.Image] | None = None,
    ) -> list[PIL.Image.Image]:
        """Generate `params.num_images` images; image i uses seed `params.seed + i`.

        `init_image` / `mask` are the pictures behind `params.init_image` / `params.mask`;
        `control_images` those named in `params.controlnets` / `params.ip_adapter`, by name.

        `on_step(step, total)` runs after every denoising step (1-based). An exception it raises
        stops the run and propagates unchanged; that is how a worker cancels a job.
        `on_preview(step, total, images)` gets cheap latent→RGB previews every `params.preview_every`
        steps (never on the last step: the real images follow).
        """
        item = BatchItem(params, on_step, on_preview, init_image, mask, control_images or {})
        [outcome] = self.generate_batch([item])
        if outcome.error is not None:
            raise outcome.error
        return outcome.images

    def generate_batch(
        self, items: list[BatchItem], on_batch_step: BatchStepCallback | None = None
    ) -> list[ItemOutcome]:
        """Run compatible requests (same `batch_key`) as one batch.

        Each item gets its images, or the exception its own callback raised (it left the batch at
        that step; the others went on). Engine failures (out of memory, ...) raise for the batch.
        """
        # 0. Check inputs
        if not items:
            return []
        for item in items:
            p = item.params
            if p.model is None or p.seed is None or p.width is None or p.height is None:
                raise ValueError(
                    "generate() needs resolved params: model, seed, width and height must be set"
                )
            if batch_key(p) != batch_key(items[0].params):
                raise ValueError("a batch needs the same model, size, steps and sampler for every item")
            _check_pictures(item)
        params = items[0].params
        info = self._model_info(params.model)
        items = [_with_default_cfg_scale(item, info) for item in items]
        if not sampler_supported(info.family, params.sampler):
            raise UnsupportedSampler(
                f"sampler '{params.sampler}' is not supported for {info.family} model '{info.name}'; "
                f"supported: {', '.join(SUPPORTED_SAMPLERS[info.family])}"
            )
        self._check_stages(items, info)
        register_hires_upscaler(self.post, params)
        self._check_controls(items, info)
        pipe = self._cache.get(info.name)
        multiple = size_multiple(pipe)
        for what, (width, height) in (
            ("", (params.width, params.height)),
            ("hires ", output_size(params, info.family)),
        ):
            if width % multiple or height % multiple:
                raise EngineError(
                    f"{what}width and height must be multiples of {multiple} for model '{info.name}' "
                    f"(got {width}x{height})"
                )

        self._activate_loras(info, pipe, params)

        # 1. Denoise and decode; the cached pipeline and its scheduler are never modified (but for
        # which of its LoRA adapters are active: the batch's set, just activated)
        scheduler = build_scheduler(info.family, params.sampler, pipe.scheduler.config)

        def encode(image: np.ndarray) -> LatentDist:
            return self._encodings.encode(
                info.name, pipe, image, device=self._device, tile_above=self._encode_tile_above()
            )

        def encode_upscaled(image: np.ndarray) -> LatentDist:
            pixels = pixels_to_tensor(image, self._device, pipe.vae.dtype)
            return encode_pixels(pipe, pixels, tile_above=self._encode_tile_above())

        def load_refiner() -> tuple[DiffusionPipeline, object]:
            assert params.refiner is not None
            refiner = self._cache.get(params.refiner.model)
            return refiner, build_scheduler(info.family, params.sampler, refiner.scheduler.config)

        def load_control(name: str) -> tuple[str, object]:
            control = self._controls[name]
            return control.kind, self._control_models.get(control)

        ip = params.ip_adapter
        ip_info = self._controls[ip.model] if ip is not None else None

        def encode_images(pictures: list[PIL.Image.Image]) -> torch.Tensor:
            assert ip_info is not None
            return self._control_models.encode_images(ip_info, pictures)

        try:
            adapter = (
                ip_adapter_loaded(pipe, ip_info, ip)
                if ip is not None and ip_info is not None
                else contextlib.nullcontext()
            )
            with torch.inference_mode(), adapter:
                outcomes = denoise_batch(
                    pipe,
                    info.family,
                    scheduler,
                    items,
                    device=self._device,
                    dtype=self._dtype,
                    rgb_map=self._preview_maps[info.name],
                    on_batch_step=on_batch_step,
                    encode=encode,
                    encode_upscaled=encode_upscaled,
                    load_refiner=load_refiner,
                    load_control=load_control,
                    annotate=self._annotators,
                    encode_images=encode_images,
                )
                post_process_batch(self.post, items, outcomes)
                return outcomes
        except Exception as error:
            if is_out_of_memory(error):
                self._release_cached_memory()
                images = sum(item.params.num_images for item in items)
                size = f"{params.width}x{params.height}"
                raise OutOfMemory(
                    f"out of memory generating {images} image(s) at {size} on {self._device}: "
                    f"{_first_line(error)}"
                ) from error
            raise EngineError(f"generation failed: {type(error).__name__}: {_first_line(error)}") from error

    def _check_stages(self, items: list[BatchItem], info: ModelInfo) -> None:
        """The hires fix and the refiner can run for these requests on this model (the API
        checks the same; these catch direct Engine callers)."""
        params = items[0].params
        if info.refiner:
            raise EngineError(
                f"model '{info.name}' is an SDXL refiner: it finishes another SDXL model's "
                "latents; name it in refiner.model"
            )
        if params.hires is not None:
            sampler = params.hires.sampler or params.sampler
            if not sampler_supported(info.family, sampler):
                raise UnsupportedSampler(f"hires sampler '{sampler}' is not supported for {info.family}")
            if any(item.params.init_image is not None for item in items):
                raise EngineError("hires is a second pass of a text-to-image request; not with an init_image")
            if (problem := schedule_error(params)) is not None:
                raise EngineError(problem)
        if params.refiner is not None:
            problem = refiner_problem(params, info, self._models)
            if problem is not None:
                raise EngineError(problem)

    def _check_controls(self, items: list[BatchItem], info: ModelInfo) -> None:
        """Every control model a request names is registered, of the base model's family, and its
        pictures were loaded (the API checks the same, naming the field)."""
        for item in items:
            p = item.params
            for field, problem in control_problems(p, self._controls, info):
                raise EngineError(f"{field}: {problem}")
            refs = [u.image for u in p.controlnets or []] + (p.ip_adapter.images if p.ip_adapter else [])
            missing = [ref for ref in refs if ref not in item.control_images]
            if missing:
                raise EngineError(f"control pictures not loaded: {missing[0]} (BatchItem.control_images)")

    def _activate_loras(self, info: ModelInfo, pipe: DiffusionPipeline, params: GenerationParams) -> None:
        """The batch's LoRA set (the same for every item: it is in batch_key) becomes the active one."""
        loras = self._loras()
        active = []
        for i, ref in enumerate(params.loras or ()):
            if ref.weight == 0:
                continue
            if ref.name not in loras:
                raise EngineError(f"loras[{i}].name: unknown LoRA '{ref.name}'; see GET /v1/loras")
            active.append(ActiveLora(loras[ref.name], ref.weight, f"loras[{i}].name"))
        adapters = self._adapters.setdefault(info.name, self._new_adapters())
        adapters.activate(pipe, info.family, active)

    def _preload_hotswap_lora(self, name: str, pipe: DiffusionPipeline) -> None:
        """The preload LoRA into the hot-swap slot at weight 0, so the compile sees the slot."""
        lora = self._lora_hotswap_preload
        info = self._models[name]
        loras = self._loras()
        if lora is None or lora not in loras or loras[lora].family != info.family:
            if lora is not None:
                log.warning("lora_hotswap_preload %r: no %s LoRA of that name", lora, info.family)
            return
        try:
            self._adapters[name].activate(
                pipe, info.family, [ActiveLora(loras[lora], 0.0, "lora_hotswap_preload")]
            )
        except EngineError as error:  # the model still serves; its first LoRA batch compiles
            log.warning("lora_hotswap_preload %r not loaded: %s", lora, error)

    def _new_adapters(self) -> LoraAdapters | HotswapAdapter:
        if self._optimizations.lora_hotswap_rank:
            return HotswapAdapter()
        return LoraAdapters(self._lora_cache_size)

    def _encode_tile_above(self) -> int:
        """Input pictures encode in tiles as images decode: the same `vae_tiling` lever and threshold."""
        mode = self._optimizations.vae_tiling
        if mode == "auto":
            return self._optimizations.vae_tile_above_pixels
        return 0 if mode == "on" else 2**62

    def _model_info(self, name: str) -> ModelInfo:
        if name not in self._models:
            known = ", ".join(sorted(self._models)) or "none"
            raise ModelLoadError(f"unknown model '{name}'; registered models: {known}")
        return self._models[name]

    def _release_cached_memory(self) -> None:
        if torch.device(self._device).type == "cuda":
            torch.cuda.empty_cache()


def engine_optimizations(settings: Settings) -> EngineOptimizations:
    """The engine's levers from the settings; compile caches default to <data_dir>/compile-cache."""
    options = settings.optimizations.model_dump()
    options["compile_cache_dir"] = (
        settings.optimizations.compile_cache_dir or settings.data_dir / "compile-cache"
    )
    return EngineOptimizations.from_dict(options)


def engine_from_settings(
    models: Mapping[str, ModelInfo], settings: Settings, *, warmup: bool | None = None
) -> Engine:
    """The serving engine as the settings describe it: device, dtype, threads, cache budgets, levers."""
    return Engine(
        models,
        device=settings.device,
        dtype=settings.dtype,
        threads=settings.torch_threads,
        vram_budget_gib=settings.vram_budget_gib,
        ram_budget_gib=settings.ram_budget_gib,
        offload_to_cpu=settings.offload_to_cpu,
        warmup_on_load=settings.warmup if warmup is None else warmup,
        optimizations=engine_optimizations(settings),
        upscalers=scan_upscalers(settings.models_dir, builtin=settings.builtin_models),
        face_detector=next(iter(face_detectors(settings.models_dir)), None),
        loras=lambda: registered_loras(settings),
        lora_hotswap_preload=settings.lora_hotswap_preload,
        controls=scan_controls(settings.models_dir, builtin=settings.builtin_models),
        annotators=scan_annotators(settings.models_dir),
    )


# Pure helpers: seeds, noise and shapes


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


def _check_pictures(item: BatchItem) -> None:
    """The pictures a request names must have been loaded, and its strength must run a step."""
    p = item.params
    for field in ("init_image", "mask"):
        if (getattr(p, field) is None) != (getattr(item, field) is None):
            raise EngineError(
                f"params.{field} and BatchItem.{field} must be given together "
                "(the worker loads the picture the job names)"
            )
    if (p.mask is not None or p.outpaint is not None) and p.init_image is None:
        raise EngineError("a mask or outpaint needs an init_image")
    if p.init_image is not None:
        try:
            start_index(p.steps, p.strength)
        except ValueError as error:  # int(steps × strength) < 1
            raise EngineError(str(error)) from None


def _with_default_cfg_scale(item: BatchItem, info: ModelInfo) -> BatchItem:
    """A request that names no CFG scale gets the model's (API requests arrive resolved already)."""
    if item.params.cfg_scale is not None:
        return item
    update = {"cfg_scale": info.request_cfg_scale}
    return dataclasses.replace(item, params=item.params.model_copy(update=update))

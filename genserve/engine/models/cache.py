"""The model cache: loaded pipelines of one worker, bounded by a device (VRAM) and a RAM budget.

Two tiers on an accelerator: pipelines that run live on the device, most recently used last in
`_on_device`. When loading a model needs room, the least recently used ones are evicted: with
`offload_to_cpu` each moves to CPU RAM while the RAM budget allows (evicting the least recently used
CPU-resident ones out entirely to make room), else it is dropped. Getting an offloaded model moves it
back without reading the disk again (an "offloaded_hit").

On a CPU device there is one tier: VRAM means nothing there, so the RAM budget bounds the device tier
and nothing is offloaded.

Sizes are parameter + buffer bytes of each pipeline's torch modules. Before a load, the size is
estimated from the weights on disk (safetensors headers: element counts times the load dtype), so the
room is made first; when there is no estimate, the cache loads, then evicts. Budgets bound weights
only: leave headroom for activations (they grow with image size and batch).

A model larger than the whole budget still loads, alone, with a warning. None means unbounded.

Threading: `get` is serialised by one lock, held for a whole load. A hit on a device-resident model
takes only the short state lock, so a long load never blocks generation with a loaded model, and the
listings (`loaded`, `offloaded`, `resident_bytes`) never wait for a load. A pipeline returned by `get`
stays usable until a later `get` of another model evicts it: the worker runs one batch at a time.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from genserve.engine.errors import ModelLoadError, OutOfMemory
from genserve.engine.models.registry import UnknownModelFormat, _safetensors_header
from genserve.metrics import MODEL_CACHE_REQUESTS, MODEL_EVICTIONS, MODEL_LOAD_SECONDS, MODEL_LOADS

logger = logging.getLogger(__name__)

Loader = Callable[[str], Any]
Mover = Callable[[Any, str], Any]

# genserve never loads SD1.x's NSFW checker (see loading.py), so its weights take no memory.
NOT_LOADED_COMPONENTS = frozenset({"safety_checker"})

_OTHER_WEIGHT_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")  # read when a folder has no safetensors


def pipeline_bytes(pipe: Any) -> int:
    """Parameter + buffer bytes of the pipeline's torch modules (a tensor shared by two counts once)."""
    seen: set[int] = set()
    total = 0
    for component in getattr(pipe, "components", {}).values():
        if not isinstance(component, torch.nn.Module):
            continue
        for tensor in (*component.parameters(), *component.buffers()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


def move_pipeline(pipe: Any, device: str) -> Any:
    return pipe.to(device)


def budget_bytes(gib: float | None) -> int | None:
    """A budget in GiB from Settings, in bytes (None stays unbounded)."""
    return None if gib is None else int(gib * 2**30)


def estimate_bytes(path: Path, dtype: torch.dtype | None = None) -> int | None:
    """Memory the weights at `path` (a diffusers folder or a single file) will take once loaded.

    Safetensors floating-point tensors count as elements times `dtype`'s size (the pipeline is
    loaded in that dtype), other tensors and other weight formats as their bytes on disk. In a
    diffusers folder, only components named in model_index.json and loaded by genserve count, and a
    component's variant files (`*.fp16.safetensors`) only when it has no plain ones. None when no
    weights are found.
    """
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = [file for folder in _component_folders(path) for file in _weight_files(folder)]
    else:
        return None
    if not files:
        return None
    item_bytes = dtype.itemsize if dtype is not None else None
    return sum(_file_bytes(file, item_bytes) for file in files)


def _component_folders(folder: Path) -> list[Path]:
    index = _read_model_index(folder)
    if index is None:
        return [folder]
    return [
        folder / name
        for name, value in index.items()
        if not name.startswith("_")
        and name not in NOT_LOADED_COMPONENTS
        and isinstance(value, list)
        and value[:2] != [None, None]
        and (folder / name).is_dir()
    ]


def _read_model_index(folder: Path) -> dict | None:
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    return index if isinstance(index, dict) else None


def _weight_files(folder: Path) -> list[Path]:
    """The files from_pretrained reads: safetensors if any (plain before variants), else others."""
    for suffixes in ((".safetensors",), _OTHER_WEIGHT_SUFFIXES):
        files = sorted(f for f in folder.iterdir() if f.is_file() and f.name.endswith(suffixes))
        if files:
            return [f for f in files if _is_plain(f)] or files
    return []


def _is_plain(file: Path) -> bool:
    """`model.safetensors` or `model-00001-of-00002.safetensors`, not `model.fp16.safetensors`."""
    return "." not in file.name[: -len(file.suffix)]


def _file_bytes(file: Path, item_bytes: int | None) -> int:
    if item_bytes is None or file.suffix != ".safetensors":
        return file.stat().st_size
    try:
        header = _safetensors_header(file)
    except (OSError, UnknownModelFormat):
        return file.stat().st_size
    total = 0
    for dtype, shape in header.values():
        elements = math.prod(shape)
        floating = dtype.startswith(("F", "BF"))  # F64, F32, F16, BF16, F8_E4M3, ...
        total += elements * (item_bytes if floating else _stored_item_bytes(dtype))
    return total


def _stored_item_bytes(dtype: str) -> int:
    """I64 -> 8, U8 -> 1, BOOL -> 1."""
    bits = re.match(r"[A-Z]+(\d+)", dtype)
    return max(1, int(bits.group(1)) // 8) if bits else 1


@dataclass
class _Entry:
    pipe: Any
    nbytes: int


class ModelCache:
    """Loaded pipelines for one worker and device, least recently used evicted first."""

    def __init__(
        self,
        loader: Loader,
        *,
        device: str,
        vram_budget_bytes: int | None,
        ram_budget_bytes: int | None,
        offload_to_cpu: bool = True,
        size_of: Callable[[Any], int] = pipeline_bytes,
        on_load: Callable[[str, Any], None] | None = None,
        estimate: Callable[[str], int | None] | None = None,
        move: Mover = move_pipeline,
    ) -> None:
        """`loader(name)` returns the pipeline on `device`; `on_load(name, pipe)` runs after each fresh
        load (fit previews, warm up); `estimate(name)` gives its size before loading, or None;
        `move(pipe, device)` moves a pipeline between the device and "cpu"."""
        self._loader = loader
        self._device = device
        self._two_tier = torch.device(device).type != "cpu"
        if self._two_tier:
            self._device_budget = _bound(vram_budget_bytes)
        else:
            if vram_budget_bytes is not None:
                logger.info("device is the CPU: the VRAM budget is ignored, the RAM budget bounds the cache")
            self._device_budget = _bound(ram_budget_bytes)
        self._offload = self._two_tier and offload_to_cpu
        self._ram_budget = _bound(ram_budget_bytes)
        self._size_of = size_of
        self._on_load = on_load
        self._estimate = estimate
        self._move = move
        self._on_device: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._on_cpu: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.RLock()  # serialises get(); re-entrant for on_load's warmup
        self._state_lock = threading.Lock()  # guards the two dicts, held only briefly

    # Reading the state (never waits for a load)

    def loaded(self) -> list[str]:
        """Device-resident models, most recently used first."""
        with self._state_lock:
            return list(reversed(self._on_device))

    def offloaded(self) -> list[str]:
        """Models offloaded to CPU RAM, most recently used first."""
        with self._state_lock:
            return list(reversed(self._on_cpu))

    def resident_bytes(self) -> dict[str, int]:
        """Bytes of weights held per tier: {"device": ..., "cpu": ...}."""
        with self._state_lock:
            return {"device": _total(self._on_device.values()), "cpu": _total(self._on_cpu.values())}

    # Getting a model

    def get(self, name: str) -> Any:
        """The pipeline for `name` on the device: cached, moved back from CPU RAM, or loaded."""
        pipe = self._device_hit(name)
        if pipe is not None:
            return pipe
        with self._lock:
            pipe = self._device_hit(name)
            if pipe is not None:
                return pipe
            with self._state_lock:
                entry = self._on_cpu.pop(name, None)
            if entry is not None:
                MODEL_CACHE_REQUESTS.labels(model=name, result="offloaded_hit").inc()
                return self._move_back(name, entry)
            MODEL_CACHE_REQUESTS.labels(model=name, result="miss").inc()
            return self._load(name)

    def clear(self) -> None:
        """Drop every cached pipeline (both tiers)."""
        with self._lock:
            with self._state_lock:
                entries = [*self._on_device.values(), *self._on_cpu.values()]
                self._on_device.clear()
                self._on_cpu.clear()
            entries.clear()
            self._release_memory()

    def _device_hit(self, name: str) -> Any | None:
        with self._state_lock:
            entry = self._on_device.get(name)
            if entry is None:
                return None
            self._on_device.move_to_end(name)
        MODEL_CACHE_REQUESTS.labels(model=name, result="hit").inc()
        return entry.pipe

    def _load(self, name: str) -> Any:
        # 1. Make room for the estimated size first, so two models never share the device over budget
        estimate = self._estimate(name) if self._estimate is not None else None
        warned = estimate is not None and self._warn_if_oversize(name, estimate)
        if estimate is not None:
            self._make_device_room(estimate)

        # 2. Load (once more after evicting everything, if the device ran out of memory)
        started = time.perf_counter()
        try:
            pipe = self._loader(name)
        except Exception as error:
            if not (_is_out_of_memory(error) and self._on_device):
                raise
            pipe = None  # retried below, once the failed attempt's traceback (and tensors) are gone
        if pipe is None:
            logger.warning(
                "out of memory loading a model; evicting all others and retrying", extra={"model": name}
            )
            self._make_device_room(None)
            self._release_memory()
            pipe = self._loader(name)

        # 3. Fit the real size: evict more if the estimate was low (or missing)
        nbytes = self._size_of(pipe)
        if not warned:
            self._warn_if_oversize(name, nbytes)
        self._make_device_room(nbytes)
        with self._state_lock:
            self._on_device[name] = _Entry(pipe, nbytes)

        # 4. Prepare it (previews, warmup); a model that fails this is not kept
        if self._on_load is not None:
            try:
                self._on_load(name, pipe)
            except BaseException:
                with self._state_lock:
                    self._on_device.pop(name, None)
                del pipe
                self._release_memory()
                raise
        seconds = time.perf_counter() - started
        MODEL_LOADS.labels(model=name).inc()
        MODEL_LOAD_SECONDS.labels(model=name).observe(seconds)
        logger.info(
            "loaded model %s in %.1f s (%.2f GiB on %s)",
            name,
            seconds,
            nbytes / 2**30,
            self._device,
            extra={"model": name},
        )
        return pipe

    def _move_back(self, name: str, entry: _Entry) -> Any:
        self._make_device_room(entry.nbytes)
        try:
            moved = self._try_move_back(entry)
            if not moved:  # out of memory with other models on the device: evict them, once more
                self._make_device_room(None)
                self._release_memory()
                entry.pipe = self._move(entry.pipe, self._device)
        except Exception as error:
            # Half-moved pipelines are not worth keeping: drop it, the next get() loads it afresh.
            del entry
            self._release_memory()
            if _is_out_of_memory(error):
                raise OutOfMemory(f"out of memory moving model '{name}' back to {self._device}") from error
            raise ModelLoadError(
                f"could not move model '{name}' back to {self._device}: {type(error).__name__}: {error}"
            ) from error
        with self._state_lock:
            self._on_device[name] = entry
        logger.info("moved model %s back to %s", name, self._device, extra={"model": name})
        return entry.pipe

    def _try_move_back(self, entry: _Entry) -> bool:
        try:
            entry.pipe = self._move(entry.pipe, self._device)
        except Exception as error:
            if not (_is_out_of_memory(error) and self._on_device):
                raise
            return False
        return True

    # Eviction

    def _make_device_room(self, nbytes: float | None) -> None:
        """Evict least recently used device-resident models until `nbytes` more fit the budget
        (None: evict them all)."""
        evicted = dropped = False
        while True:
            with self._state_lock:
                if not self._on_device:
                    break
                if nbytes is not None and _total(self._on_device.values()) + nbytes <= self._device_budget:
                    break
                name, entry = self._on_device.popitem(last=False)
            dropped |= self._evict_from_device(name, entry)
            entry = None  # so a dropped pipeline is garbage before the memory is released
            evicted = True
        if evicted:
            self._release_memory(collect=dropped)

    def _evict_from_device(self, name: str, entry: _Entry) -> bool:
        """Offload or drop one model; True when something was dropped (it, or others from RAM)."""
        if self._offload and entry.nbytes <= self._ram_budget:
            dropped = self._make_ram_room(entry.nbytes)
            try:
                entry.pipe = self._move(entry.pipe, "cpu")
            except Exception:
                logger.warning(
                    "could not offload model to CPU RAM; dropping it", extra={"model": name}, exc_info=True
                )
            else:
                with self._state_lock:
                    self._on_cpu[name] = entry
                MODEL_EVICTIONS.labels(model=name, to="cpu").inc()
                logger.info("offloaded model %s to CPU RAM", name, extra={"model": name})
                return dropped
        MODEL_EVICTIONS.labels(model=name, to="dropped").inc()
        logger.info("dropped model %s from the cache", name, extra={"model": name})
        return True

    def _make_ram_room(self, nbytes: int) -> bool:
        dropped = False
        while True:
            with self._state_lock:
                if not self._on_cpu or _total(self._on_cpu.values()) + nbytes <= self._ram_budget:
                    return dropped
                name, _ = self._on_cpu.popitem(last=False)
            dropped = True
            MODEL_EVICTIONS.labels(model=name, to="dropped").inc()
            logger.info("dropped offloaded model %s from CPU RAM", name, extra={"model": name})

    def _warn_if_oversize(self, name: str, nbytes: int) -> bool:
        if nbytes <= self._device_budget:
            return False
        logger.warning(
            "model %s (%.2f GiB) is larger than the %s budget (%.2f GiB); it is loaded alone",
            name,
            nbytes / 2**30,
            "VRAM" if self._two_tier else "RAM",
            self._device_budget / 2**30,
            extra={"model": name},
        )
        return True

    def _release_memory(self, *, collect: bool = True) -> None:
        """Free what evicted pipelines held: Python cycles of dropped ones, then CUDA's cached blocks."""
        if collect:
            gc.collect()
        if torch.device(self._device).type == "cuda" and torch.cuda.is_initialized():
            torch.cuda.empty_cache()


def _bound(budget: int | None) -> float:
    return math.inf if budget is None else float(budget)


def _total(entries: Iterable[_Entry]) -> int:
    return sum(entry.nbytes for entry in entries)


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (OutOfMemory, torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()

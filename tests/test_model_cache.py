"""The model cache on fake pipelines (LRU, budgets, the CPU offload tier, metrics), size estimates,
and GPU metrics being harmless without a GPU."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from prometheus_client import REGISTRY
from safetensors.torch import save_file

from genserve.engine.errors import OutOfMemory
from genserve.engine.models.cache import ModelCache, budget_bytes, estimate_bytes, pipeline_bytes
from genserve.engine.speed import gpu_metrics
from genserve.metrics import GPU_TEMPERATURE, GPU_UTILIZATION


class FakePipe:
    """Just enough of a diffusers pipeline: `components` and `.to(device)`."""

    def __init__(self, name: str, nbytes: int) -> None:
        self.name = name
        self.nbytes = nbytes
        self.device = "loaded-device"
        self.components = {"unet": torch.nn.Linear(2, 2), "scheduler": object(), "tokenizer": None}

    def to(self, device: str) -> FakePipe:
        self.device = device
        return self


class CountingLoader:
    def __init__(self, sizes: dict[str, int]) -> None:
        self.sizes = sizes
        self.calls: list[str] = []

    def __call__(self, name: str) -> FakePipe:
        self.calls.append(name)
        return FakePipe(name, self.sizes[name])


class Moves:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def __call__(self, pipe: FakePipe, device: str) -> FakePipe:
        self.calls.append((pipe.name, device))
        return pipe.to(device)


def make_cache(sizes: dict[str, int], **kwargs: object) -> tuple[ModelCache, CountingLoader]:
    loader = CountingLoader(sizes)
    options: dict = dict(
        device="cpu", vram_budget_bytes=None, ram_budget_bytes=None, size_of=lambda p: p.nbytes
    )
    return ModelCache(loader, **{**options, **kwargs}), loader


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def requests(model: str, result: str) -> float:
    return metric("genserve_model_cache_requests_total", model=model, result=result)


def evictions(model: str, to: str) -> float:
    return metric("genserve_model_evictions_total", model=model, to=to)


# 1. LRU order and metrics


def test_lru_order_hits_and_misses_are_counted() -> None:
    cache, loader = make_cache({"lru-a": 1, "lru-b": 1, "lru-c": 1})
    before = (
        requests("lru-a", "miss"),
        requests("lru-a", "hit"),
        metric("genserve_model_loads_total", model="lru-a"),
    )

    first = cache.get("lru-a")
    cache.get("lru-b")
    cache.get("lru-c")
    assert cache.loaded() == ["lru-c", "lru-b", "lru-a"]
    assert cache.get("lru-a") is first
    assert cache.loaded() == ["lru-a", "lru-c", "lru-b"]
    assert loader.calls == ["lru-a", "lru-b", "lru-c"]

    after = (
        requests("lru-a", "miss"),
        requests("lru-a", "hit"),
        metric("genserve_model_loads_total", model="lru-a"),
    )
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1]
    assert metric("genserve_model_load_seconds_count", model="lru-a") >= 1


def test_budget_evicts_the_least_recently_used() -> None:
    # On a CPU device there is one tier, bounded by the RAM budget; nothing is offloaded.
    cache, loader = make_cache({"bud-a": 100, "bud-b": 100, "bud-c": 100}, ram_budget_bytes=250)
    dropped = evictions("bud-b", "dropped")
    cache.get("bud-a")
    cache.get("bud-b")
    cache.get("bud-a")  # b is now the least recently used
    cache.get("bud-c")
    assert cache.loaded() == ["bud-c", "bud-a"]
    assert cache.offloaded() == []
    assert cache.resident_bytes() == {"device": 200, "cpu": 0}
    assert evictions("bud-b", "dropped") == dropped + 1
    cache.get("bud-b")
    assert loader.calls == ["bud-a", "bud-b", "bud-c", "bud-b"]


def test_estimate_makes_room_before_loading() -> None:
    seen_while_loading: list[list[str]] = []
    sizes = {"est-a": 100, "est-b": 100}
    loader = CountingLoader(sizes)

    def load(name: str) -> FakePipe:
        seen_while_loading.append(cache.loaded())  # the listing never waits for the load
        return loader(name)

    cache = ModelCache(
        load,
        device="cpu",
        vram_budget_bytes=None,
        ram_budget_bytes=150,
        size_of=lambda p: p.nbytes,
        estimate=sizes.get,
    )
    cache.get("est-a")
    cache.get("est-b")
    assert seen_while_loading == [[], []]  # est-a was evicted before est-b was read
    assert cache.loaded() == ["est-b"]


def test_without_estimate_the_cache_loads_then_evicts() -> None:
    cache, _ = make_cache({"late-a": 100, "late-b": 100}, ram_budget_bytes=150)
    cache.get("late-a")
    cache.get("late-b")
    assert cache.loaded() == ["late-b"]


def test_a_model_larger_than_the_budget_loads_alone_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    cache, _ = make_cache({"big-small": 100, "big-huge": 500}, ram_budget_bytes=150)
    cache.get("big-small")
    with caplog.at_level(logging.WARNING, logger="genserve.engine.models.cache"):
        cache.get("big-huge")
    assert cache.loaded() == ["big-huge"]
    assert [r.getMessage() for r in caplog.records if "larger than" in r.getMessage()]
    cache.get("big-small")
    assert cache.loaded() == ["big-small"]


# 2. The CPU offload tier (a fake accelerator: moves are recorded, nothing touches CUDA)


def test_evicted_model_is_offloaded_and_moved_back_without_loading() -> None:
    moves = Moves()
    sizes = {"off-a": 100, "off-b": 100, "off-c": 100, "off-d": 100}
    cache, loader = make_cache(sizes, device="cuda", vram_budget_bytes=250, ram_budget_bytes=150, move=moves)
    to_cpu = evictions("off-a", "cpu")
    offloaded_hits = requests("off-a", "offloaded_hit")

    a = cache.get("off-a")
    cache.get("off-b")
    cache.get("off-c")
    assert cache.loaded() == ["off-c", "off-b"]
    assert cache.offloaded() == ["off-a"]
    assert a.device == "cpu" and moves.calls == [("off-a", "cpu")]
    assert evictions("off-a", "cpu") == to_cpu + 1

    # Getting it back: no load, the device's LRU (off-b) goes to CPU RAM to make room.
    assert cache.get("off-a") is a
    assert a.device == "cuda"
    assert loader.calls == ["off-a", "off-b", "off-c"]
    assert requests("off-a", "offloaded_hit") == offloaded_hits + 1
    assert cache.loaded() == ["off-a", "off-c"]
    assert cache.offloaded() == ["off-b"]
    assert moves.calls[1:] == [("off-b", "cpu"), ("off-a", "cuda")]

    # RAM holds one model: offloading off-c drops the least recently used CPU-resident one.
    dropped = evictions("off-b", "dropped")
    cache.get("off-d")
    assert cache.loaded() == ["off-d", "off-a"]
    assert cache.offloaded() == ["off-c"]
    assert evictions("off-b", "dropped") == dropped + 1
    assert cache.resident_bytes() == {"device": 200, "cpu": 100}


def test_without_offload_or_room_in_ram_evicted_models_are_dropped() -> None:
    moves = Moves()
    sizes = {"drop-a": 100, "drop-b": 100}
    cache, _ = make_cache(sizes, device="cuda", vram_budget_bytes=150, offload_to_cpu=False, move=moves)
    cache.get("drop-a")
    cache.get("drop-b")
    assert (cache.loaded(), cache.offloaded(), moves.calls) == (["drop-b"], [], [])

    sizes = {"drop-c": 100, "drop-d": 100}
    cache, _ = make_cache(sizes, device="cuda", vram_budget_bytes=150, ram_budget_bytes=50, move=moves)
    cache.get("drop-c")
    cache.get("drop-d")
    assert (cache.loaded(), cache.offloaded(), moves.calls) == (["drop-d"], [], [])


def test_a_failed_move_back_drops_the_model_and_says_so() -> None:
    def move(pipe: FakePipe, device: str) -> FakePipe:
        if device != "cpu":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return pipe.to(device)

    cache, _ = make_cache({"mv-a": 100, "mv-b": 100}, device="cuda", vram_budget_bytes=150, move=move)
    cache.get("mv-a")
    cache.get("mv-b")
    with pytest.raises(OutOfMemory, match="mv-a"):
        cache.get("mv-a")  # fails, evicts mv-b to make room, fails again
    assert (cache.loaded(), cache.offloaded()) == ([], ["mv-b"])


# 3. Loading: on_load, failures, out of memory, threads


def test_on_load_runs_after_each_fresh_load_and_may_use_the_cache() -> None:
    calls: list[str] = []

    def on_load(name: str, pipe: FakePipe) -> None:
        calls.append(name)
        assert cache.get(name) is pipe  # a warmup generation goes through get() again

    cache, _ = make_cache({"hook-a": 100, "hook-b": 100}, ram_budget_bytes=150, on_load=on_load)
    cache.get("hook-a")
    cache.get("hook-a")
    cache.get("hook-b")
    cache.get("hook-a")
    assert calls == ["hook-a", "hook-b", "hook-a"]


def test_a_model_whose_on_load_fails_is_not_kept() -> None:
    def on_load(name: str, pipe: FakePipe) -> None:
        raise RuntimeError("warmup failed")

    cache, _ = make_cache({"bad-a": 100}, on_load=on_load)
    with pytest.raises(RuntimeError, match="warmup failed"):
        cache.get("bad-a")
    assert cache.loaded() == []


def test_out_of_memory_on_load_evicts_everything_and_retries_once() -> None:
    sizes = {"oom-a": 100, "oom-b": 100}
    loader = CountingLoader(sizes)
    attempts: list[str] = []

    def load(name: str) -> FakePipe:
        attempts.append(name)
        if name == "oom-never" or (name == "oom-b" and cache.loaded()):
            raise OutOfMemory(f"out of memory loading model '{name}'")
        return loader(name)

    cache = ModelCache(
        load, device="cpu", vram_budget_bytes=None, ram_budget_bytes=None, size_of=lambda p: p.nbytes
    )
    cache.get("oom-a")
    cache.get("oom-b")
    assert cache.loaded() == ["oom-b"]
    assert attempts == ["oom-a", "oom-b", "oom-b"]

    with pytest.raises(OutOfMemory):
        cache.get("oom-never")
    assert attempts[3:] == ["oom-never", "oom-never"]
    assert cache.loaded() == []


def test_a_long_load_does_not_block_hits_or_listings() -> None:
    release = threading.Event()
    sizes = {"slow-a": 1, "slow-b": 1}
    loader = CountingLoader(sizes)

    def load(name: str) -> FakePipe:
        if name == "slow-b":
            assert release.wait(5)
        return loader(name)

    cache = ModelCache(
        load, device="cpu", vram_budget_bytes=None, ram_budget_bytes=None, size_of=lambda p: p.nbytes
    )
    a = cache.get("slow-a")
    loading = threading.Thread(target=cache.get, args=("slow-b",))
    loading.start()
    try:
        assert cache.get("slow-a") is a
        assert cache.loaded() == ["slow-a"]
    finally:
        release.set()
        loading.join(5)
    assert cache.loaded() == ["slow-b", "slow-a"]


# 4. Sizes


def test_pipeline_bytes_counts_module_parameters_and_buffers_once() -> None:
    shared = torch.nn.Linear(4, 4)  # 16 + 4 float32 parameters
    norm = torch.nn.BatchNorm1d(4)  # 8 parameters, 8 float32 + 1 int64 buffers
    pipe = SimpleNamespace(
        components={"a": shared, "b": shared, "norm": norm, "tokenizer": object(), "x": None}
    )
    assert pipeline_bytes(pipe) == 20 * 4 + 8 * 4 + 8 * 4 + 8
    assert budget_bytes(None) is None and budget_bytes(1.5) == 3 * 2**29


def test_estimate_bytes_reads_only_loaded_components(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
        "image_encoder": [None, None],
    }
    for name in ("unet", "text_encoder", "tokenizer", "safety_checker", "image_encoder", "not_listed"):
        (folder / name).mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps(index))
    save_file({"w": torch.zeros(10, 10)}, folder / "unet" / "diffusion_pytorch_model.safetensors")
    save_file(
        {"w": torch.zeros(10, 10, dtype=torch.float16)},
        folder / "unet" / "diffusion_pytorch_model.fp16.safetensors",
    )
    # A component with only variant files counts them; integer tensors keep their size.
    save_file(
        {"w": torch.zeros(5, dtype=torch.float16), "ids": torch.zeros(5, dtype=torch.int64)},
        folder / "text_encoder" / "model.fp16.safetensors",
    )
    for skipped in ("safety_checker", "image_encoder", "not_listed"):
        save_file({"w": torch.zeros(1000)}, folder / skipped / "model.safetensors")

    assert estimate_bytes(folder, torch.float32) == 100 * 4 + 5 * 4 + 5 * 8
    assert estimate_bytes(folder, torch.float16) == 100 * 2 + 5 * 2 + 5 * 8
    on_disk = sum(
        (folder / f).stat().st_size
        for f in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.fp16.safetensors")
    )
    assert estimate_bytes(folder) == on_disk
    assert estimate_bytes(folder / "unet" / "diffusion_pytorch_model.safetensors", torch.bfloat16) == 200
    assert estimate_bytes(tmp_path / "missing") is None
    assert estimate_bytes(folder / "tokenizer") is None


def test_estimate_matches_a_loaded_tiny_pipeline(tiny_models_dir: Path) -> None:
    from genserve.engine.models.loading import load_pipeline
    from genserve.engine.models.registry import read_model_info

    info = read_model_info(tiny_models_dir / "tiny-sd15")
    pipe = load_pipeline(info, {info.name: info}, device="cpu", dtype=torch.float32)
    # Buffers that are not saved (CLIP's position ids) are the only difference.
    estimate, actual = estimate_bytes(info.path, torch.float32), pipeline_bytes(pipe)
    assert 0.99 * actual <= estimate <= actual


# 5. GPU metrics without a GPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_gpu_metrics_are_harmless_no_ops_without_a_gpu() -> None:
    assert gpu_metrics.gpu_samples() == {}
    assert gpu_metrics.publish_gpu_metrics() == {}
    assert list(gpu_metrics.GpuCollector().collect()) == []
    assert REGISTRY.get_sample_value("genserve_gpu_utilization_percent", {"gpu": "0"}) is None


def fake_nvml(*, init_error: bool = False) -> SimpleNamespace:
    class NVMLError(Exception):
        pass

    def init() -> None:
        nvml.inits += 1
        if init_error:
            raise NVMLError("NVML Shared Library Not Found")

    def power(handle: object) -> int:
        raise NVMLError("Not Supported")

    nvml = SimpleNamespace(
        inits=0,
        NVMLError=NVMLError,
        NVML_TEMPERATURE_GPU=0,
        nvmlInit=init,
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda index: f"gpu{index}",
        nvmlDeviceGetUtilizationRates=lambda handle: SimpleNamespace(gpu=42, memory=7),
        nvmlDeviceGetTemperature=lambda handle, sensor: 55,
        nvmlDeviceGetPowerUsage=power,
    )
    return nvml


def test_nvml_start_failure_is_remembered() -> None:
    nvml = fake_nvml(init_error=True)
    reader = gpu_metrics.NvmlReader(nvml)
    assert reader.readings() == {} and reader.readings() == {}
    assert nvml.inits == 1
    assert gpu_metrics.NvmlReader(None).readings() == {}


def test_nvml_readings_are_published_and_unsupported_ones_omitted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_metrics, "_NVML", gpu_metrics.NvmlReader(fake_nvml()))
    try:
        samples = gpu_metrics.publish_gpu_metrics()
        assert samples == {0: gpu_metrics.GpuSample(utilization_percent=42.0, temperature_celsius=55.0)}
        assert REGISTRY.get_sample_value("genserve_gpu_utilization_percent", {"gpu": "0"}) == 42.0
        assert REGISTRY.get_sample_value("genserve_gpu_power_watts", {"gpu": "0"}) is None
        names = [family.name for family in gpu_metrics.GpuCollector().collect()]
        assert names == ["genserve_gpu_utilization_percent", "genserve_gpu_temperature_celsius"]
    finally:
        GPU_UTILIZATION.remove("0")
        GPU_TEMPERATURE.remove("0")


def test_torch_memory_is_labelled_by_physical_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # A worker pinned to physical GPU 3 sees it as cuda:0; its memory is reported as gpu 3.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda index: 1000)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index: 2048)
    monkeypatch.setattr(gpu_metrics, "_NVML", gpu_metrics.NvmlReader(None))
    assert gpu_metrics.gpu_samples() == {
        3: gpu_metrics.GpuSample(memory_allocated_bytes=1000, memory_reserved_bytes=2048)
    }

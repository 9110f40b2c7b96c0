"""GPU metrics: torch's allocator memory and NVML utilization, temperature and power, per GPU.

Workers run in their own processes with prometheus_client's multiprocess mode, where a custom
collector in a worker is never scraped. So a worker calls `publish_gpu_metrics()` every few seconds,
which sets multiprocess-aware gauges (genserve.metrics.GPU_*); `GpuCollector` serves a single-process
registry instead. Use one or the other in a registry, never both: they export the same names.

GPUs are labelled by their NVML (physical) index, the one nvidia-smi shows, whatever
CUDA_VISIBLE_DEVICES a worker has, so workers on different GPUs never share a label by accident.

Without a GPU everything here is a cheap no-op: a process that never used CUDA holds no GPU memory
(and asking would create a CUDA context), and a failed NVML start is remembered, not retried. Reading
metrics never raises.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from types import ModuleType
from typing import Any

import torch
from prometheus_client.core import GaugeMetricFamily, Metric

from genserve.metrics import (
    GPU_MEMORY_ALLOCATED,
    GPU_MEMORY_RESERVED,
    GPU_POWER,
    GPU_TEMPERATURE,
    GPU_UTILIZATION,
)

try:
    import pynvml  # the nvidia-ml-py package
except ImportError:  # pragma: no cover - a declared dependency, but metrics must not need it
    pynvml = None

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuSample:
    """One GPU's readings; a field is None when this process or the GPU cannot tell."""

    memory_allocated_bytes: int | None = None
    memory_reserved_bytes: int | None = None
    utilization_percent: float | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None


# The gauge that exports each GpuSample field.
_EXPORTS = {
    "memory_allocated_bytes": GPU_MEMORY_ALLOCATED,
    "memory_reserved_bytes": GPU_MEMORY_RESERVED,
    "utilization_percent": GPU_UTILIZATION,
    "temperature_celsius": GPU_TEMPERATURE,
    "power_watts": GPU_POWER,
}


class NvmlReader:
    """NVML readings by physical GPU index. Starts NVML on first use; a failure is remembered."""

    def __init__(self, nvml: ModuleType | None = pynvml) -> None:
        self._nvml = nvml
        self._ready: bool | None = None if nvml is not None else False
        self._lock = threading.Lock()

    def readings(self) -> dict[int, dict[str, float]]:
        nvml = self._started()
        if nvml is None:
            return {}
        readers: dict[str, Callable[[Any], float]] = {
            "utilization_percent": lambda handle: nvml.nvmlDeviceGetUtilizationRates(handle).gpu,
            "temperature_celsius": lambda handle: nvml.nvmlDeviceGetTemperature(
                handle, nvml.NVML_TEMPERATURE_GPU
            ),
            "power_watts": lambda handle: nvml.nvmlDeviceGetPowerUsage(handle) / 1000,  # milliwatts
        }
        result: dict[int, dict[str, float]] = {}
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            values: dict[str, float] = {}
            for key, read in readers.items():
                try:
                    values[key] = float(read(handle))
                except nvml.NVMLError:
                    pass  # not supported by this GPU or driver (power on some boards, for one)
            result[index] = values
        return result

    def _started(self) -> ModuleType | None:
        if self._ready is False:  # the common case without a GPU: no lock, no call
            return None
        with self._lock:
            if self._ready is None:
                try:
                    self._nvml.nvmlInit()
                    self._ready = True
                except Exception as error:
                    logger.debug(
                        "NVML unavailable; GPU utilization, temperature and power are omitted: %s", error
                    )
                    self._ready = False
        return self._nvml if self._ready else None


_NVML = NvmlReader()


def gpu_samples() -> dict[int, GpuSample]:
    """Readings for every GPU this process can see, by NVML index; {} without a GPU. Never raises."""
    try:
        memory = _torch_memory()
        nvml = _NVML.readings()
    except Exception:
        logger.debug("reading GPU metrics failed", exc_info=True)
        return {}
    return {gpu: GpuSample(**memory.get(gpu, {}), **nvml.get(gpu, {})) for gpu in sorted({*memory, *nvml})}


def publish_gpu_metrics() -> dict[int, GpuSample]:
    """Set the genserve_gpu_* gauges from `gpu_samples()` (a worker calls this every few seconds)."""
    samples = gpu_samples()
    for gpu, sample in samples.items():
        for key, gauge in _EXPORTS.items():
            value = getattr(sample, key)
            if value is not None:
                gauge.labels(gpu=str(gpu)).set(value)
    return samples


class GpuCollector:
    """The same readings as a custom collector, for a single-process registry."""

    def collect(self) -> Iterable[Metric]:
        samples = gpu_samples()
        for field in fields(GpuSample):
            [described] = _EXPORTS[field.name].describe()
            family = GaugeMetricFamily(described.name, described.documentation, labels=["gpu"])
            for gpu, sample in samples.items():
                value = getattr(sample, field.name)
                if value is not None:
                    family.add_metric([str(gpu)], value)
            if family.samples:
                yield family


def _torch_memory() -> dict[int, dict[str, int]]:
    """This process's allocator memory per GPU; {} if it never used CUDA."""
    if not torch.cuda.is_initialized():
        return {}
    return {
        _nvml_index(index): {
            "memory_allocated_bytes": torch.cuda.memory_allocated(index),
            "memory_reserved_bytes": torch.cuda.memory_reserved(index),
        }
        for index in range(torch.cuda.device_count())
    }


def _nvml_index(cuda_index: int) -> int:
    """The NVML index of CUDA device `cuda_index`, honouring CUDA_VISIBLE_DEVICES (ordinals or UUIDs)."""
    try:
        return torch.cuda._get_nvml_device_index(cuda_index)  # private, but what torch.cuda.utilization uses
    except Exception:
        return cuda_index

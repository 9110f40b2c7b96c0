"""A module's forward, gated by shape: bucketed batch padding, compiled for warmed shapes, eager for others.

`apply_optimizations` installs a `GatedForward` as the denoiser's (and the VAE decoder's) `forward`. It
  - pads the batch to a bucket, so a few shapes cover every batch size,
  - runs the torch.compile'd forward (dynamic=False: each padded shape compiles once),
  - after `seal()` (the end of warm-up), runs shapes it has not seen eagerly instead of compiling them
    in the middle of a request (a compile of the SDXL UNet takes minutes),
  - applies the SDPA backend choice around every call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

log = logging.getLogger(__name__)


def resolve_sdpa(backend: str, device: str) -> tuple[list[Any] | None, str, str | None]:
    """(SDPBackend list to prefer, the name applied, a note when the request fell back).

    Each choice keeps the others as fallbacks, in priority order, for shapes the preferred kernel
    does not take (the VAE's single 512-wide attention head is too wide for flash attention).
    """
    from torch.nn.attention import SDPBackend

    if backend == "auto":
        return None, "auto", None
    cuda = torch.device(device).type == "cuda"
    if backend in ("cudnn", "efficient") and not cuda:
        return None, "auto", f"sdpa_backend: {backend} needs CUDA; using torch's default on {device}"
    order = {
        "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
        "cudnn": [
            SDPBackend.CUDNN_ATTENTION,
            SDPBackend.FLASH_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION,
            SDPBackend.MATH,
        ],
        "efficient": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH],
        "math": [SDPBackend.MATH],
    }[backend]
    if not cuda:
        order = [b for b in order if b in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)]
    return order, backend, None


def sdpa_context(backends: list[Any] | None) -> contextlib.AbstractContextManager[Any]:
    """The SDPA backends to use, in priority order, around one call; nothing for torch's default."""
    if backends is None:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    if _sdpa_kernel_has_priority():
        return sdpa_kernel(backends, set_priority=True)
    return sdpa_kernel(backends)  # older torch: the list is a set, tried in torch's own order


@functools.cache
def _sdpa_kernel_has_priority() -> bool:
    from torch.nn.attention import sdpa_kernel

    return "set_priority" in inspect.signature(sdpa_kernel).parameters


# Shape-gated compiled forward


class GatedForward:
    """Replaces a module's `forward`: bucketed batch padding, compiled for warmed shapes, eager otherwise.

    `inner` is the module's own (bound) forward; `compiled` is torch.compile(inner) or None (then only
    the SDPA backend is applied). A shape is the padded inputs' shapes, dtypes and flags: torch
    compiles each new one, so after `seal()` unseen shapes call `inner` instead.
    """

    def __init__(
        self,
        inner: Callable[..., Any],
        *,
        compiled: Callable[..., Any] | None = None,
        buckets: tuple[int, ...] = (),
        sdpa: list[Any] | None = None,
        cudagraphs: bool = False,
        name: str = "",
    ) -> None:
        self.inner = inner
        self.compiled = compiled
        self.buckets = tuple(sorted(buckets))
        self.sdpa = sdpa
        self.cudagraphs = cudagraphs
        self.name = name
        self.sealed = False
        self.shapes: dict[tuple, float] = {}  # shape -> seconds of its first (compiling) call
        self.compiled_calls = 0
        self.eager_calls = 0
        self.eager_shapes: set[tuple] = set()  # unwarmed shapes seen after seal(), logged once each

    def seal(self) -> None:
        self.sealed = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is None:
            with sdpa_context(self.sdpa):
                return self.inner(*args, **kwargs)
        rows = batch_rows(args, kwargs)
        bucket = bucket_for(rows, self.buckets) if rows is not None else None
        if bucket is not None and bucket != rows:
            padded_args, padded_kwargs = pad_rows(args, rows, bucket), pad_rows(kwargs, rows, bucket)
        else:
            padded_args, padded_kwargs = args, kwargs
        key = shape_key(padded_args, padded_kwargs)
        first = key not in self.shapes
        if first and self.sealed:
            self.eager_calls += 1
            if key not in self.eager_shapes:
                self.eager_shapes.add(key)
                log.info("%s: shape %s was not warmed up; running it eagerly", self.name, key)
            with sdpa_context(self.sdpa):
                return self.inner(*args, **kwargs)
        start = time.perf_counter()
        with sdpa_context(self.sdpa):
            if self.cudagraphs and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
                torch.compiler.cudagraph_mark_step_begin()
            output = self.compiled(*padded_args, **padded_kwargs)
        self.compiled_calls += 1
        if first:
            self.shapes[key] = time.perf_counter() - start
            log.info("%s: compiled shape %s in %.1f s", self.name, key, self.shapes[key])
        if rows is not None and (bucket != rows or self.cudagraphs):
            # CUDA graphs reuse their output buffers on the next replay: hand out a copy.
            output = unpad_rows(output, rows, clone=self.cudagraphs)
        return output


def batch_rows(args: tuple, kwargs: Mapping[str, Any]) -> int | None:
    """Rows of the batch: the first dimension of the main input (positional, sample, hidden_states)."""
    for value in (args[0] if args else None, kwargs.get("sample"), kwargs.get("hidden_states")):
        if isinstance(value, torch.Tensor) and value.ndim >= 1:
            return int(value.shape[0])
    return None


def bucket_for(rows: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds `rows`; `rows` itself above the largest bucket."""
    return next((b for b in buckets if b >= rows), rows)


def pad_rows(value: Any, rows: int, bucket: int) -> Any:
    """Repeat the last row of every batch-major tensor up to `bucket` rows (in tuples and dicts too).

    Rows are independent in these models (per-sample norms and attention), so padding never changes
    the real rows beyond kernel rounding.
    """
    if isinstance(value, torch.Tensor):
        if value.ndim >= 1 and value.shape[0] == rows:
            return torch.cat([value, value[-1:].expand(bucket - rows, *value.shape[1:])])
        return value
    if isinstance(value, tuple):
        return tuple(pad_rows(v, rows, bucket) for v in value)
    if isinstance(value, dict):
        return {k: pad_rows(v, rows, bucket) for k, v in value.items()}
    return value


def unpad_rows(value: Any, rows: int, *, clone: bool = False) -> Any:
    if isinstance(value, torch.Tensor):
        value = value[:rows] if value.ndim >= 1 else value
        return value.clone() if clone else value
    if isinstance(value, (tuple, list)):
        return type(value)(unpad_rows(v, rows, clone=clone) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return type(value)(
            **{
                f.name: unpad_rows(getattr(value, f.name), rows, clone=clone)
                for f in dataclasses.fields(value)
            }
        )
    return value


def shape_key(args: tuple, kwargs: Mapping[str, Any]) -> tuple:
    def describe(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return (tuple(value.shape), str(value.dtype).removeprefix("torch."), value.device.type)
        if isinstance(value, (tuple, list)):
            return tuple(describe(v) for v in value)
        if isinstance(value, dict):
            return tuple((k, describe(v)) for k, v in sorted(value.items()))
        if value is None or isinstance(value, (bool, int, str)):
            return value
        return type(value).__name__

    return describe(args), describe(dict(kwargs))

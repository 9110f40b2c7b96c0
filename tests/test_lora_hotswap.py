"""LoRA hot-swap for compiled single-LoRA deployments (issue 18, the `lora_hotswap_rank` lever):
a swapped-in LoRA gives what a fresh load of it gives, weights and "no LoRA" are written in place,
and a compiled UNet swaps without recompiling (dynamo's counters; the eager backend traces and
guards exactly as inductor does, without its code generation: 140 s cold on this CPU;
benchmarks/lora_hotswap.py runs the same sequence with inductor)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from genserve.engine.engine import Engine, EngineError
from genserve.engine.models.loras import scan_loras
from genserve.engine.models.registry import scan_models
from genserve.engine.speed.optimize import EngineOptimizations
from tests.test_lora import params, pixels, write_diffusers_lora, write_kohya_lora

torch.set_num_threads(1)
RANK = 8


@pytest.fixture(scope="module")
def models(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lora-hotswap-models")
    for entry in tiny_models_dir.iterdir():
        (root / entry.name).symlink_to(entry)
    sd15 = tiny_models_dir / "tiny-sd15"
    write_diffusers_lora(sd15, root / "lora" / "style-a.safetensors", seed=1)  # rank 4, alpha 4
    write_diffusers_lora(sd15, root / "lora" / "style-b.safetensors", seed=2, rank=2, alpha=6)
    write_kohya_lora(sd15, root / "lora" / "kohya-c.safetensors", seed=3)  # with text-encoder weights
    return root


def engine(models: Path, preload: str | None = None, **levers: object) -> Engine:
    return Engine(
        scan_models(models),
        device="cpu",
        dtype="float32",
        loras=scan_loras(models),
        optimizations=EngineOptimizations(**levers),
        lora_hotswap_preload=preload,
    )


@pytest.fixture(scope="module")
def reference(models: Path) -> Engine:
    """LoRAs loaded the ordinary way (set_adapters), no compile."""
    return engine(models)


def image(engine: Engine, lora: str | None, weight: float = 1.0, steps: int = 2) -> np.ndarray:
    loras = None if lora is None else [{"name": lora, "weight": weight}]
    return pixels(engine.generate(params(loras, steps=steps))[0])


def test_the_engine_refuses_what_cannot_be_hot_swapped(models: Path) -> None:
    hot = engine(models, lora_hotswap_rank=RANK)
    with pytest.raises(EngineError, match=r"loras\[1\]\.name: .*one LoRA at a time"):
        hot.generate(params([{"name": "style-a"}, {"name": "style-b"}]))
    with pytest.raises(EngineError, match=r"loras\[0\]\.name: .*text-encoder weights"):
        hot.generate(params([{"name": "kohya-c"}]))
    with pytest.raises(ValueError, match="lora_hotswap_rank"):
        EngineOptimizations(lora_hotswap_rank=-1)


def test_a_compiled_unet_swaps_without_recompiling_and_equals_fresh_loads(
    models: Path, reference: Engine
) -> None:
    """A warm-up-like first batch without LoRA (the preloaded LoRA at weight 0 in the slot), then A,
    B swapped in place (another rank, padded, and alpha), A again at another weight, and no LoRA:
    each equals the same request on an engine that loads LoRAs the ordinary way, and none of them
    compiles a new graph."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    levers = dict(lora_hotswap_rank=RANK, compile="default", compile_backend="eager", compile_vae=False)
    hot = engine(models, preload="style-a", **levers)
    plain = image(hot, None)  # compiles the UNet with the LoRA slot in it
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0 and hot._applied["tiny-sd15"].compile == "default"
    first = image(hot, "style-a")
    swapped = image(hot, "style-b", 0.6)
    reweighted = image(hot, "style-a", 0.5)
    off = image(hot, None)
    assert counters["stats"]["unique_graphs"] == graphs  # no recompilation for any of them
    assert hot._adapters["tiny-sd15"].swaps == 2
    assert np.array_equal(plain, off)
    assert np.abs(first - image(reference, "style-a")).max() <= 1
    assert np.abs(swapped - image(reference, "style-b", 0.6)).max() <= 1
    assert np.abs(swapped - first).max() > 8
    assert np.abs(reweighted - image(reference, "style-a", 0.5)).max() <= 1
    assert np.array_equal(off, image(reference, None))  # weight 0 adds exactly nothing


def test_a_preload_that_cannot_load_leaves_the_model_serving(models: Path) -> None:
    hot = engine(models, preload="kohya-c", lora_hotswap_rank=RANK)  # text-encoder weights: refused
    hot.load("tiny-sd15")
    assert hot._adapters["tiny-sd15"].loaded() == []
    assert image(hot, "style-b").shape == (64, 64, 3)


def test_the_api_refuses_two_loras_when_hot_swapping(models: Path, tmp_path: Path) -> None:
    from genserve.api.submission import resolve_params
    from genserve.config import Settings
    from genserve.schemas import LimitError

    def settings(rank: int) -> Settings:
        return Settings(
            data_dir=tmp_path,
            models_dir=models,
            builtin_models=False,
            optimizations={"lora_hotswap_rank": rank},
        )

    two = params([{"name": "style-a"}, {"name": "style-b"}])
    resolve_params(two, scan_models(models), settings(0))  # without hot-swap: fine
    with pytest.raises(LimitError) as refused:
        resolve_params(two, scan_models(models), settings(RANK))
    assert refused.value.field == "loras[1].name" and "one LoRA at a time" in str(refused.value)
    resolve_params(params([{"name": "style-b"}]), scan_models(models), settings(RANK))

"""The engine on tiny random-weight pipelines: loading, sizes, seeds, samplers, progress, errors."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from genserve.engine.engine import (
    Engine,
    EngineError,
    ModelLoadError,
    OutOfMemory,
    UnsupportedSampler,
    activation_room_bytes,
)
from genserve.engine.loop.denoise import BatchItem
from genserve.engine.loop.guidance import apply_guidance
from genserve.engine.models.fixtures import write_tiny_pipeline, write_tiny_single_file
from genserve.engine.models.registry import SUPPORTED_SAMPLERS, scan_models
from genserve.engine.models.samplers import FAMILY_SAMPLERS, build_scheduler
from genserve.schemas.generation import SAMPLER_NAMES, GenerationParams


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread() -> Iterator[None]:
    # The tiny models gain nothing from a second thread, and on a small shared machine a thread
    # waiting for a busy core makes every op many times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def engine(tiny_models_dir: Path) -> Engine:
    return Engine(scan_models(tiny_models_dir), device="cpu")


def params(model: str = "tiny-sd15", **overrides: object) -> GenerationParams:
    values: dict = dict(prompt="a red circle", model=model, seed=42, steps=3, width=64, height=64)
    return GenerationParams(**{**values, **overrides})


def pixels(images: list) -> list[np.ndarray]:
    return [np.asarray(image) for image in images]


# 1. Loading and sizes


def test_auto_device_and_dtype(tiny_models_dir: Path) -> None:
    engine = Engine(scan_models(tiny_models_dir))
    cuda = torch.cuda.is_available()
    assert engine.device == ("cuda" if cuda else "cpu")
    assert engine.dtype == (torch.float16 if cuda else torch.float32)
    assert Engine({}, device="cpu", dtype="bfloat16").dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("device", "dtype", "message"), [("gpu0", "auto", "invalid device"), ("cpu", "fp8", "dtype")]
)
def test_bad_device_or_dtype_settings_are_refused(device: str, dtype: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Engine({}, device=device, dtype=dtype)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3"])
def test_each_family_generates_the_requested_size(engine: Engine, family: str) -> None:
    images = engine.generate(params(f"tiny-{family}", width=64, height=48))

    assert len(images) == 1
    assert images[0].size == (64, 48)
    assert images[0].mode == "RGB"
    assert f"tiny-{family}" in engine.loaded_models()


def test_warmup_loads_and_runs(tiny_models_dir: Path) -> None:
    engine = Engine(scan_models(tiny_models_dir), device="cpu")
    steps: list[int] = []
    engine.warmup("tiny-sdxl")
    assert engine.loaded_models() == ["tiny-sdxl"]
    engine.generate(params("tiny-sdxl", steps=2), on_step=lambda i, n: steps.append(i))  # still usable
    assert steps == [1, 2]


# 2. Seeds


def test_same_seed_gives_identical_pixels_and_another_seed_differs(engine: Engine) -> None:
    first = pixels(engine.generate(params(seed=7)))[0]
    again = pixels(engine.generate(params(seed=7)))[0]
    other = pixels(engine.generate(params(seed=8)))[0]

    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_guidance_is_per_row_and_off_at_scale_one_or_below() -> None:
    uncond = torch.zeros(3, 1, 2, 2)
    cond = torch.ones(3, 1, 2, 2)
    guided = apply_guidance(uncond, cond, torch.tensor([7.0, 1.0, 0.5]))
    assert torch.equal(guided[0], torch.full((1, 2, 2), 7.0))  # u + 7 (c - u)
    assert torch.equal(guided[1], cond[1]) and torch.equal(guided[2], cond[2])  # guidance off


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3"])
def test_cross_request_batch_matches_each_request_alone(engine: Engine, family: str) -> None:
    """Different prompts, negatives, seeds, CFG and image counts in one batch: each request's
    pixels are those it gets alone, to within 1/255 (fp32 on CPU)."""
    model = f"tiny-{family}"
    requests = [
        params(model, prompt="a red circle", seed=3, cfg_scale=7.0),
        params(model, prompt="a blue star", negative_prompt="green", seed=40, cfg_scale=2.5, num_images=2),
        params(model, prompt="a square", seed=41, cfg_scale=1.0),
    ]
    outcomes = engine.generate_batch([BatchItem(p) for p in requests])
    for request, outcome in zip(requests, outcomes, strict=True):
        alone = pixels(engine.generate(request))
        batched = pixels(outcome.images)
        assert outcome.error is None and len(batched) == request.num_images
        for a, b in zip(alone, batched, strict=True):
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_a_canceled_member_leaves_the_batch_and_the_others_are_undisturbed(engine: Engine) -> None:
    class Canceled(Exception):
        pass

    def cancel_at_step_2(step: int, total: int) -> None:
        if step == 2:
            raise Canceled

    rows_per_step: list[int] = []
    keep, cancel = params(seed=5, steps=4), params(seed=6, steps=4, num_images=2)
    outcomes = engine.generate_batch(
        [BatchItem(keep), BatchItem(cancel, on_step=cancel_at_step_2)],
        on_batch_step=lambda step, total, rows: rows_per_step.append(rows),
    )
    assert isinstance(outcomes[1].error, Canceled) and outcomes[1].images == []
    assert rows_per_step == [3, 3, 1, 1]  # the canceled request's 2 rows stopped costing compute
    alone = pixels(engine.generate(keep))[0]
    assert np.abs(alone.astype(int) - pixels(outcomes[0].images)[0].astype(int)).max() <= 1


def test_a_batch_refuses_incompatible_members(engine: Engine) -> None:
    with pytest.raises(ValueError, match="same model, size, steps and sampler"):
        engine.generate_batch([BatchItem(params(steps=2)), BatchItem(params(steps=3))])


@pytest.mark.parametrize("sampler", ["euler", "euler_a"])
def test_image_i_of_a_batch_matches_a_single_run_with_seed_plus_i(engine: Engine, sampler: str) -> None:
    batch = pixels(engine.generate(params(seed=10, num_images=2, sampler=sampler)))
    single = pixels(engine.generate(params(seed=11, num_images=1, sampler=sampler)))[0]

    assert len(batch) == 2
    assert not np.array_equal(batch[0], batch[1])
    # Same noise (and same per-step noise for euler_a); a batch of 2 runs different float kernels
    # than a batch of 1, so a few pixels may round one level apart, but never more.
    difference = np.abs(batch[1].astype(int) - single.astype(int))
    assert difference.max() <= 1
    assert (difference > 0).mean() < 0.01


# 3. Samplers


def test_sampler_tables_agree() -> None:
    assert {family: set(table) for family, table in FAMILY_SAMPLERS.items()} == {
        family: set(names) for family, names in SUPPORTED_SAMPLERS.items()
    }


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_every_sampler_runs_on_sd15(engine: Engine, sampler: str) -> None:
    images = engine.generate(params(sampler=sampler, steps=4))

    assert images[0].size == (64, 64)
    # The cached pipeline keeps its own scheduler: samplers are per call.
    assert isinstance(engine.pipeline("tiny-sd15").scheduler, EulerDiscreteScheduler)


@pytest.mark.parametrize("sampler", SUPPORTED_SAMPLERS["sd3"])
def test_flow_samplers_run_on_sd3(engine: Engine, sampler: str) -> None:
    assert engine.generate(params("tiny-sd3", sampler=sampler, steps=4))[0].size == (64, 64)


def test_samplers_change_the_result(engine: Engine) -> None:
    euler = pixels(engine.generate(params(sampler="euler", steps=4)))[0]
    ancestral = pixels(engine.generate(params(sampler="euler_a", steps=4)))[0]
    assert not np.array_equal(euler, ancestral)


def test_schedulers_keep_the_model_schedule_and_pick_the_solver(engine: Engine) -> None:
    config = engine.pipeline("tiny-sd15").scheduler.config
    karras = build_scheduler("sd15", "dpmpp_2m_karras", config)
    assert type(karras).__name__ == "DPMSolverMultistepScheduler"
    assert karras.config.use_karras_sigmas and karras.config.algorithm_type == "dpmsolver++"
    assert karras.config.beta_schedule == "scaled_linear"
    assert build_scheduler("sd15", "ddim", config).config.clip_sample is False

    flow = build_scheduler("sd3", "dpmpp_2m", engine.pipeline("tiny-sd3").scheduler.config)
    assert flow.config.prediction_type == "flow_prediction" and flow.config.use_flow_sigmas
    assert flow.config.flow_shift == 3.0


def test_unsupported_sampler_is_refused(engine: Engine) -> None:
    with pytest.raises(UnsupportedSampler, match="euler_a.*sd3.*supported: euler, dpmpp_2m, unipc"):
        engine.generate(params("tiny-sd3", sampler="euler_a"))


# 4. Progress and cancellation


def test_on_step_reports_every_step(engine: Engine) -> None:
    calls: list[tuple[int, int]] = []
    engine.generate(params(steps=5), on_step=lambda i, n: calls.append((i, n)))
    assert calls == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]


class Canceled(Exception):
    pass


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_exception_from_on_step_propagates_unchanged_and_stops_the_run(engine: Engine, family: str) -> None:
    calls: list[int] = []
    cancel = Canceled("job canceled")

    def on_step(step: int, total: int) -> None:
        calls.append(step)
        if step == 2:
            raise cancel

    with pytest.raises(Canceled) as caught:
        engine.generate(params(f"tiny-{family}", steps=10), on_step=on_step)

    assert caught.value is cancel
    assert calls == [1, 2]
    assert engine.generate(params(f"tiny-{family}", steps=1))  # the engine is still usable


# 5. Errors


def test_unresolved_params_are_a_programming_error(engine: Engine) -> None:
    with pytest.raises(ValueError, match="resolved"):
        engine.generate(GenerationParams(prompt="x", model="tiny-sd15"))


def test_unknown_model(engine: Engine) -> None:
    with pytest.raises(ModelLoadError, match="unknown model 'nope'.*tiny-sd15"):
        engine.load("nope")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_checkpoint_raises_model_load_error(
    tiny_models_dir: Path, tmp_path: Path, damage: str
) -> None:
    folder = shutil.copytree(tiny_models_dir / "tiny-sd15", tmp_path / "broken")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"\x00garbage" * 100 if damage == "garbage" else data[: len(data) // 2])
    engine = Engine(scan_models(tmp_path), device="cpu")

    with pytest.raises(ModelLoadError, match=r"could not load model 'broken' \(diffusers at .*broken\)"):
        engine.load("broken")
    assert engine.loaded_models() == []


def test_failures_inside_the_pipeline_become_engine_errors(
    tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Engine(scan_models(tiny_models_dir), device="cpu")
    engine.load("tiny-sd15")
    unet = engine.pipeline("tiny-sd15").unet

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(unet, "forward", out_of_memory)
    with pytest.raises(
        OutOfMemory, match=r"out of memory generating 2 image\(s\) at 64x64 on cpu: CUDA out of"
    ):
        engine.generate(params(num_images=2))

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("shapes do not match\nlong details")

    monkeypatch.setattr(unet, "forward", broken)
    with pytest.raises(EngineError, match=r"^generation failed: RuntimeError: shapes do not match$"):
        engine.generate(params())


# 6. Single-file checkpoints


def test_single_file_loads_offline_with_a_same_family_folder(tmp_path: Path) -> None:
    write_tiny_pipeline("sd15", tmp_path / "base", seed=3)
    write_tiny_single_file(tmp_path / "finetune.safetensors", seed=3)
    models = scan_models(tmp_path)
    assert models["finetune"].format == "single_file" and models["finetune"].family == "sd15"
    engine = Engine(models, device="cpu")

    from_file = pixels(engine.generate(params("finetune")))[0]
    from_folder = pixels(engine.generate(params("base")))[0]

    # Same weights in two layouts: the same image.
    assert np.array_equal(from_file, from_folder)


def test_single_file_without_a_config_folder_says_what_is_missing(tmp_path: Path) -> None:
    write_tiny_single_file(tmp_path / "lonely.safetensors")
    engine = Engine(scan_models(tmp_path), device="cpu")

    with pytest.raises(ModelLoadError, match="needs a diffusers-format sd15 model folder"):
        engine.load("lonely")


def test_fixtures_are_deterministic(tmp_path: Path) -> None:
    def unet_bytes(seed: int, name: str) -> bytes:
        folder = write_tiny_pipeline("sd15", tmp_path / name, seed=seed)
        return (folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()

    rng_before = torch.random.get_rng_state()
    assert unet_bytes(0, "a") == unet_bytes(0, "b")
    assert unet_bytes(0, "c") != unet_bytes(1, "d")
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the global RNG is left alone


def test_memory_budget_keeps_the_most_recently_used_models(tiny_models_dir: Path) -> None:
    # A budget smaller than any model: each load evicts the others (on CPU there is one tier).
    engine = Engine(scan_models(tiny_models_dir), device="cpu", ram_budget_gib=1e-6)
    engine.generate(params("tiny-sd15"))
    engine.generate(params("tiny-sd3"))
    assert engine.loaded_models() == ["tiny-sd3"]
    unbounded = Engine(scan_models(tiny_models_dir), device="cpu")
    unbounded.load("tiny-sd15")
    unbounded.load("tiny-sd3")
    unbounded.load("tiny-sd15")  # a hit makes it the most recently used
    assert unbounded.loaded_models() == ["tiny-sd15", "tiny-sd3"]


def test_activation_room_is_the_same_between_batches_and_during_one():
    gib = 2**30
    weights = 5 * gib
    idle = activation_room_bytes(free_bytes=60 * gib, reserved_bytes=weights + 3 * gib, weight_bytes=weights)
    # A running batch uses the 3 GiB cached and grows the pool by 4 GiB more, taken from the free memory.
    running = activation_room_bytes(
        free_bytes=56 * gib, reserved_bytes=weights + 7 * gib, weight_bytes=weights
    )
    assert idle == running == 63 * gib
    # Another process taking memory does shrink it.
    assert (
        activation_room_bytes(free_bytes=40 * gib, reserved_bytes=weights + 3 * gib, weight_bytes=weights)
        == 43 * gib
    )

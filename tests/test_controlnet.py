"""ControlNet and T2I-Adapter per row (issue 18): the loop reproduces diffusers' ControlNet pipeline,
rows with different controls (or none) share a batch and equal their lone runs, window, scale,
modes, several units, preprocessors, the registry and the API's checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from genserve.engine.conditioning.control import in_window, soft_weights, step_extras
from genserve.engine.conditioning.preprocess import PREPROCESSORS, run_preprocessor
from genserve.engine.engine import Engine, EngineError
from genserve.engine.loop.denoise import BatchItem
from genserve.engine.models.control_fixtures import write_tiny_controlnet, write_tiny_t2i_adapter
from genserve.engine.models.controls import scan_controls
from genserve.engine.models.registry import scan_models
from genserve.engine.models.samplers import build_scheduler
from genserve.schemas.control import ControlNetUnit
from genserve.schemas.generation import GenerationParams, batch_key

torch.set_num_threads(1)

A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64


@pytest.fixture(scope="module")
def models(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("control-models")
    for entry in tiny_models_dir.iterdir():
        (root / entry.name).symlink_to(entry)
    write_tiny_controlnet(root / "tiny-sd15", root / "controlnet" / "cn-sd15", "sd15", seed=1)
    write_tiny_controlnet(root / "tiny-sd15", root / "controlnet" / "cn-sd15-b", "sd15", seed=2)
    write_tiny_controlnet(root / "tiny-sdxl", root / "controlnet" / "cn-sdxl", "sdxl", seed=3)
    write_tiny_t2i_adapter(root / "tiny-sd15", root / "t2i_adapter" / "t2i-sd15", "sd15", seed=4)
    from genserve.engine.models.fixtures import write_tiny_pipeline

    write_tiny_pipeline("sd15", root / "tiny-sd15-inpaint", inpainting=True)
    return root


@pytest.fixture(scope="module")
def engine(models: Path) -> Engine:
    return Engine(scan_models(models), device="cpu", dtype="float32", controls=scan_controls(models))


def picture(seed: int = 0, size: tuple[int, int] = (64, 64)) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


IMAGES = {A: picture(1), B: picture(2)}


def params(model: str = "tiny-sd15", **kwargs: object) -> GenerationParams:
    base = dict(prompt="a red circle", model=model, seed=3, steps=8, width=64, height=64, cfg_scale=5.0)
    return GenerationParams(**{**base, **kwargs})


def unit(model: str = "cn-sd15", image: str = A, **kwargs: object) -> ControlNetUnit:
    return ControlNetUnit(model=model, image=image, **kwargs)


def pixels(image: PIL.Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


def run(engine: Engine, p: GenerationParams) -> np.ndarray:
    return pixels(engine.generate(p, control_images=IMAGES)[0])


# 1. The key correctness test: one request equals diffusers' ControlNet pipeline


@pytest.mark.parametrize(
    ("scale", "start", "end", "sampler"),
    [(1.0, 0.0, 1.0, "euler"), (0.7, 0.25, 0.75, "dpmpp_2m"), (1.3, 0.0, 0.5, "euler_a")],
)
def test_one_request_equals_diffusers_controlnet_pipeline(
    engine: Engine, models: Path, scale: float, start: float, end: float, sampler: str
) -> None:
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    ours = run(engine, params(sampler=sampler, controlnets=[unit(scale=scale, start=start, end=end)]))
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        models / "tiny-sd15",
        controlnet=ControlNetModel.from_pretrained(models / "controlnet" / "cn-sd15"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.scheduler = build_scheduler("sd15", sampler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        "a red circle",
        image=IMAGES[A],
        num_inference_steps=8,
        guidance_scale=5.0,
        controlnet_conditioning_scale=scale,
        control_guidance_start=start,
        control_guidance_end=end,
        generator=torch.Generator("cpu").manual_seed(3),
    ).images[0]
    assert np.abs(ours - pixels(theirs)).max() <= 1
    assert np.abs(ours - run(engine, params(sampler=sampler))).max() > 10  # the control did something


def test_sdxl_request_equals_diffusers_sdxl_controlnet_pipeline(engine: Engine, models: Path) -> None:
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    ours = run(engine, params("tiny-sdxl", controlnets=[unit("cn-sdxl", scale=0.8)]))
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        models / "tiny-sdxl", controlnet=ControlNetModel.from_pretrained(models / "controlnet" / "cn-sdxl")
    )
    pipe.scheduler = build_scheduler("sdxl", "euler", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        "a red circle",
        image=IMAGES[A],
        num_inference_steps=8,
        guidance_scale=5.0,
        controlnet_conditioning_scale=0.8,
        generator=torch.Generator("cpu").manual_seed(3),
    ).images[0]
    assert np.abs(ours - pixels(theirs)).max() <= 1


# 2. Per row, in one batch


def test_mixed_batch_equals_separate_runs(engine: Engine) -> None:
    """Requests with different controls, or none, share one batch and each equals its lone run."""
    requests = [
        params(seed=1),
        params(seed=2, controlnets=[unit(scale=0.9)]),
        params(seed=3, controlnets=[unit("cn-sd15-b", B, mode="prompt", start=0.2)], num_images=2),
        params(seed=4, controlnets=[unit(mode="control"), unit("cn-sd15-b", B, scale=0.5)], cfg_scale=3.0),
        params(seed=5, controlnets=[unit("t2i-sd15", B, scale=0.8)]),
    ]
    assert len({batch_key(p) for p in requests}) == 1  # controls stay out of the batch key
    batched = engine.generate_batch([BatchItem(p, control_images=IMAGES) for p in requests])
    for p, outcome in zip(requests, batched, strict=True):
        alone = engine.generate(p, control_images=IMAGES)
        for a, b in zip(outcome.images, alone, strict=True):
            assert np.abs(pixels(a) - pixels(b)).max() <= 1


def test_scale_zero_and_empty_window_equal_no_control(engine: Engine) -> None:
    plain = run(engine, params())
    assert np.abs(run(engine, params(controlnets=[unit(scale=0.0)])) - plain).max() == 0
    assert np.abs(run(engine, params(controlnets=[unit(start=0.9, end=0.95)])) - plain).max() == 0


def test_window_start_and_end_change_the_result(engine: Engine) -> None:
    full = run(engine, params(controlnets=[unit()]))
    early = run(engine, params(controlnets=[unit(end=0.5)]))
    late = run(engine, params(controlnets=[unit(start=0.5)]))
    assert np.abs(full - early).max() > 0 and np.abs(full - late).max() > 0 and np.abs(early - late).max() > 0


def test_two_controlnets_are_a_sum(engine: Engine) -> None:
    """Two units at once equal diffusers' MultiControlNet (residuals added)."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    models_dir = Path(engine._controls["cn-sd15"].path).parents[1]
    ours = run(engine, params(controlnets=[unit(scale=0.6), unit("cn-sd15-b", B, scale=0.9)]))
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        models_dir / "tiny-sd15",
        controlnet=[
            ControlNetModel.from_pretrained(models_dir / "controlnet" / n) for n in ("cn-sd15", "cn-sd15-b")
        ],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.scheduler = build_scheduler("sd15", "euler", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        "a red circle",
        image=[IMAGES[A], IMAGES[B]],
        num_inference_steps=8,
        guidance_scale=5.0,
        controlnet_conditioning_scale=[0.6, 0.9],
        generator=torch.Generator("cpu").manual_seed(3),
    ).images[0]
    assert np.abs(ours - pixels(theirs)).max() <= 1


def test_t2i_adapter_equals_diffusers_adapter_pipeline(engine: Engine, models: Path) -> None:
    from diffusers import StableDiffusionAdapterPipeline, T2IAdapter

    ours = run(engine, params(controlnets=[unit("t2i-sd15", scale=0.8)]))
    pipe = StableDiffusionAdapterPipeline.from_pretrained(
        models / "tiny-sd15",
        adapter=T2IAdapter.from_pretrained(models / "t2i_adapter" / "t2i-sd15"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.scheduler = build_scheduler("sd15", "euler", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        "a red circle",
        image=IMAGES[A],
        num_inference_steps=8,
        guidance_scale=5.0,
        adapter_conditioning_scale=0.8,
        generator=torch.Generator("cpu").manual_seed(3),
    ).images[0]
    assert np.abs(ours - pixels(theirs)).max() <= 1
    plain = run(engine, params())
    assert np.abs(ours - plain).max() > 0
    # the SDXL adapter pipeline's adapter_conditioning_factor: the first half of the steps only
    half = run(engine, params(controlnets=[unit("t2i-sd15", scale=0.8, end=0.5)]))
    assert np.abs(half - ours).max() > 0 and np.abs(half - plain).max() > 0


# 3. Modes, window and weights (pure)


def test_window_matches_diffusers_controlnet_keep() -> None:
    for steps, start, end in [(20, 0.0, 1.0), (20, 0.2, 0.7), (7, 0.3, 0.3), (10, 0.0, 0.55)]:
        keep = [1.0 - float(i / steps < start or (i + 1) / steps > end) for i in range(steps)]
        assert [float(in_window(i, steps, start, end)) for i in range(steps)] == keep


def test_soft_injection_weights() -> None:
    """My prompt is more important: 0.825**(12-i) over SD1.5's 13 residuals, the mid block's 1."""
    weights = soft_weights(13, "prompt")
    assert weights == [0.825 ** float(12 - i) for i in range(13)]
    assert weights[-1] == 1.0 and abs(weights[0] - 0.0994) < 1e-3
    assert soft_weights(13, "balanced") == [1.0] * 13
    assert soft_weights(13, "control") == weights


def test_control_mode_leaves_the_unconditional_half_alone(engine: Engine) -> None:
    """ "ControlNet is more important": residuals only on the conditional rows of the CFG pair."""
    model = engine._control_models.get(engine._controls["cn-sd15"])
    from genserve.engine.conditioning.control import RowControl

    image = torch.rand(1, 3, 64, 64)
    x = torch.randn(4, 4, 32, 32)
    embeds = torch.randn(4, 77, 32)
    t = torch.tensor(500)
    units = [[RowControl(model, "controlnet", image, mode="control")], []]
    with torch.inference_mode():
        kwargs = step_extras(units, [(0, 8), (0, 8)], True, x, t, embeds, None).kwargs
    mid = kwargs["mid_block_additional_residual"]
    # rows: [uncond 0, uncond 1, cond 0, cond 1]: only cond 0 carries control
    assert [bool(mid[k].abs().sum() > 0) for k in range(4)] == [False, False, True, False]
    balanced = [[RowControl(model, "controlnet", image)], []]
    with torch.inference_mode():
        mid = step_extras(balanced, [(0, 8), (0, 8)], True, x, t, embeds, None).kwargs
    mid = mid["mid_block_additional_residual"]
    assert [bool(mid[k].abs().sum() > 0) for k in range(4)] == [True, False, True, False]


def test_modes_differ(engine: Engine) -> None:
    results = {m: run(engine, params(controlnets=[unit(mode=m)])) for m in ("balanced", "prompt", "control")}
    assert np.abs(results["balanced"] - results["prompt"]).max() > 0
    assert np.abs(results["prompt"] - results["control"]).max() > 0


# 4. Checks


def test_family_mismatch_and_unknown_model_are_refused(engine: Engine) -> None:
    with pytest.raises(EngineError, match=r"controlnets\[0\]\.model.*sdxl"):
        engine.generate(params(controlnets=[unit("cn-sdxl")]), control_images=IMAGES)
    with pytest.raises(EngineError, match=r"controlnets\[1\]\.model.*unknown control model"):
        engine.generate(params(controlnets=[unit(), unit("nope")]), control_images=IMAGES)
    with pytest.raises(EngineError, match=r"controlnets\[0\]\.model.*sdxl controlnet.*sd3"):
        engine.generate(params("tiny-sd3", controlnets=[unit("cn-sdxl")]), control_images=IMAGES)
    with pytest.raises(EngineError, match="t2i_adapter on SD3 models is not supported"):
        engine.generate(params("tiny-sd3", controlnets=[unit("t2i-sd15")]), control_images=IMAGES)


def test_registry_lists_control_models_with_their_family(models: Path) -> None:
    controls = scan_controls(models)
    assert {n: (c.kind, c.family) for n, c in controls.items()} == {
        "cn-sd15": ("controlnet", "sd15"),
        "cn-sd15-b": ("controlnet", "sd15"),
        "cn-sdxl": ("controlnet", "sdxl"),
        "t2i-sd15": ("t2i_adapter", "sd15"),
    }
    assert "controlnet" not in scan_models(models)  # the base-model scan skips control folders


# 5. Preprocessors


def test_canny_is_cv2_canny_with_a1111_defaults() -> None:
    import cv2

    image = np.asarray(picture(5))
    assert np.array_equal(run_preprocessor("canny", image)[:, :, 0], cv2.Canny(image, 100, 200))
    assert np.array_equal(
        run_preprocessor("canny", image, threshold_a=50, threshold_b=80)[:, :, 0], cv2.Canny(image, 50, 80)
    )


@pytest.mark.parametrize("name", sorted(PREPROCESSORS))
def test_every_weight_free_preprocessor_gives_an_rgb_map(name: str) -> None:
    image = np.asarray(picture(6, (48, 40)))
    out = run_preprocessor(name, image)
    assert out.shape == (40, 48, 3) and out.dtype == np.uint8
    assert np.array_equal(run_preprocessor(name, image), out)  # pure: same input, same map


def test_invert_and_none() -> None:
    image = np.asarray(picture(7))
    assert np.array_equal(run_preprocessor("invert", image), 255 - image)
    assert np.array_equal(run_preprocessor("none", image), image)


def test_preprocessor_runs_before_the_control(engine: Engine) -> None:
    """A unit with preprocessor canny equals the same unit given the canny map itself."""
    edges = PIL.Image.fromarray(run_preprocessor("canny", np.asarray(IMAGES[A])))
    with_pre = run(engine, params(controlnets=[unit(preprocessor="canny")]))
    given = pixels(engine.generate(params(controlnets=[unit(image=B)]), control_images={B: edges})[0])
    assert np.abs(with_pre - given).max() == 0


def test_deepcache_runs_full_steps_for_controlled_rows(models: Path, engine: Engine) -> None:
    """DeepCache's shallow steps would drop the deep control residuals: controlled rows get full steps."""
    from genserve.engine.speed.optimize import EngineOptimizations

    cached = Engine(
        scan_models(models),
        device="cpu",
        dtype="float32",
        controls=scan_controls(models),
        optimizations=EngineOptimizations(deepcache=3),
    )
    p = params(controlnets=[unit(scale=0.9)])
    assert np.abs(run(cached, p) - run(engine, p)).max() <= 1


def test_controlnet_on_a_9_channel_inpainting_model(engine: Engine) -> None:
    """The ControlNet sees the 4 latent channels of a 9-channel inpainting UNet's input."""
    mask = PIL.Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    p = params("tiny-sd15-inpaint", init_image=B, mask=A, strength=1.0)
    pictures = {"init_image": IMAGES[B], "mask": mask}
    plain = pixels(engine.generate(p, **pictures)[0])
    controlled = pixels(
        engine.generate(
            p.model_copy(update={"controlnets": [unit(image=B)]}), control_images=IMAGES, **pictures
        )[0]
    )
    assert np.abs(controlled - plain).max() > 0
    assert np.abs(controlled[:8] - plain[:8]).max() <= 1  # outside the mask: pasted back unchanged


def test_hires_keeps_the_control_in_its_second_pass(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """As in the A1111 ControlNet extension's default, a unit acts in both passes of a hires request:
    its model runs on every step of the first pass with the map at the request's size and on every
    step of the second with the map at the larger size; such a row batches with a plain hires row and
    each equals its lone run."""
    from diffusers import ControlNetModel

    from genserve.schemas.generation import HiresOptions

    hires = HiresOptions(scale=2, steps=4, strength=0.5)
    controlled = params(seed=2, steps=4, controlnets=[unit(scale=0.9)], hires=hires)
    sizes: list[tuple[int, int]] = []
    forward = ControlNetModel.forward

    def counting(self: ControlNetModel, *args: object, **kwargs: object) -> object:
        cond = kwargs.get("controlnet_cond", args[3] if len(args) > 3 else None)
        sizes.append(tuple(cond.shape[-2:]))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(ControlNetModel, "forward", counting)
    alone = run(engine, controlled)
    assert sizes == [(64, 64)] * 4 + [(128, 128)] * 4

    plain = params(seed=1, steps=4, hires=hires)
    assert batch_key(plain) == batch_key(controlled)
    batched = engine.generate_batch([BatchItem(p, control_images=IMAGES) for p in (plain, controlled)])
    assert np.abs(pixels(batched[1].images[0]) - alone).max() <= 1
    assert np.abs(pixels(batched[0].images[0]) - run(engine, plain)).max() <= 1
    assert alone.shape == (128, 128, 3)

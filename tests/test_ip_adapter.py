"""IP-Adapter (issue 18): a tiny IP-Adapter built in code (conditioning.md Appendix A) runs in the
shared loop as diffusers runs it, its (model, scale, style_only) is in batch_key, requests with other
reference pictures share a batch, and the cached pipeline is unchanged afterwards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from genserve.engine.engine import Engine
from genserve.engine.loop.denoise import BatchItem
from genserve.engine.models.control_fixtures import write_tiny_ip_adapter
from genserve.engine.models.control_loading import clip_pixels, ip_adapter_scale
from genserve.engine.models.controls import scan_controls
from genserve.engine.models.registry import scan_models
from genserve.engine.models.samplers import build_scheduler
from genserve.schemas.control import IPAdapterOptions
from genserve.schemas.generation import GenerationParams, batch_key

torch.set_num_threads(1)
A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64


def picture(seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8))


IMAGES = {A: picture(1), B: picture(2)}


@pytest.fixture(scope="module")
def models(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ip-models")
    for entry in tiny_models_dir.iterdir():
        (root / entry.name).symlink_to(entry)
    write_tiny_ip_adapter(root / "tiny-sd15", root / "ipadapter" / "ip-sd15", "sd15", seed=5)
    return root


@pytest.fixture(scope="module")
def engine(models: Path) -> Engine:
    return Engine(scan_models(models), device="cpu", dtype="float32", controls=scan_controls(models))


def params(**kwargs: object) -> GenerationParams:
    base = dict(prompt="a red circle", model="tiny-sd15", seed=3, steps=6, width=64, height=64, cfg_scale=5.0)
    return GenerationParams(**{**base, **kwargs})


def ip(images: list[str], scale: float = 0.8, style_only: bool = False) -> dict:
    return {"model": "ip-sd15", "images": images, "scale": scale, "style_only": style_only}


def pixels(image: PIL.Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


def run(engine: Engine, p: GenerationParams) -> np.ndarray:
    return pixels(engine.generate(p, control_images=IMAGES)[0])


def test_registry_reads_the_ip_adapter(models: Path) -> None:
    info = scan_controls(models)["ip-sd15"]
    assert (info.kind, info.family, info.weight_name) == ("ipadapter", "sd15", "ip-adapter.safetensors")


def test_equals_diffusers_with_the_same_image_embeddings(engine: Engine, models: Path) -> None:
    """diffusers' pipeline with load_ip_adapter, fed the image embeddings our encoder makes (plain
    IP-Adapter: zeros for the negative), gives the same pixels."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPVisionModelWithProjection

    ours = run(engine, params(ip_adapter=ip([A, B])))
    encoder = CLIPVisionModelWithProjection.from_pretrained(
        models / "ipadapter" / "ip-sd15" / "image_encoder"
    )
    with torch.no_grad():
        embeds = encoder(clip_pixels([IMAGES[A], IMAGES[B]], 32)).image_embeds[None]
    pipe = StableDiffusionPipeline.from_pretrained(
        models / "tiny-sd15", safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.load_ip_adapter(
        str(models / "ipadapter" / "ip-sd15"),
        subfolder="",
        weight_name="ip-adapter.safetensors",
        image_encoder_folder=None,
    )
    pipe.set_ip_adapter_scale(0.8)
    pipe.scheduler = build_scheduler("sd15", "euler", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        "a red circle",
        ip_adapter_image_embeds=[torch.cat([torch.zeros_like(embeds), embeds])],
        num_inference_steps=6,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(3),
    ).images[0]
    assert np.abs(ours - pixels(theirs)).max() <= 1
    assert np.abs(ours - run(engine, params())).max() > 0


def test_batch_key_holds_model_style_and_picture_count_but_not_scale_or_pictures() -> None:
    key = batch_key(params(ip_adapter=ip([A])))
    assert key == batch_key(params(ip_adapter=ip([B]), seed=9, prompt="other"))
    assert key == batch_key(params(ip_adapter=ip([A], scale=0.5)))  # the scale is per row
    assert key != batch_key(params(ip_adapter=ip([B, A])))  # more image tokens per row
    assert key != batch_key(params(ip_adapter=ip([A], style_only=True)))
    assert key != batch_key(params())


def test_requests_with_other_pictures_and_scales_share_a_batch(engine: Engine) -> None:
    """Each row's scale is its own (RowScales): every request equals its lone run, and the scales
    made a difference."""
    requests = [
        params(seed=1, ip_adapter=ip([A])),
        params(seed=2, ip_adapter=ip([B], scale=0.3), num_images=2),
        params(seed=1, ip_adapter=ip([A], scale=1.6), cfg_scale=1.0),
        params(seed=1, ip_adapter=ip([A], scale=0.0)),
    ]
    assert len({batch_key(p) for p in requests}) == 1
    batched = engine.generate_batch([BatchItem(p, control_images=IMAGES) for p in requests])
    for p, outcome in zip(requests, batched, strict=True):
        for a, b in zip(outcome.images, engine.generate(p, control_images=IMAGES), strict=True):
            assert np.abs(pixels(a) - pixels(b)).max() <= 1
    first, _, third, off = (pixels(o.images[0]) for o in batched)
    assert np.abs(first - off).max() > 0
    assert np.array_equal(off, run(engine, params(seed=1)))  # scale 0: exactly no image prompt
    assert np.abs(third - run(engine, params(seed=1, cfg_scale=1.0))).max() > 0


def test_the_style_only_pattern_is_kept_per_row(engine: Engine) -> None:
    requests = [
        params(seed=1, steps=3, ip_adapter=ip([A], 0.7, style_only=True)),
        params(seed=2, steps=3, ip_adapter=ip([B], 1.2, style_only=True)),
    ]
    batched = engine.generate_batch([BatchItem(p, control_images=IMAGES) for p in requests])
    for p, outcome in zip(requests, batched, strict=True):
        assert np.abs(pixels(outcome.images[0]) - run(engine, p)).max() <= 1


def test_the_cached_pipeline_is_unchanged_after_an_ip_adapter_batch(engine: Engine) -> None:
    before = run(engine, params(seed=11))
    run(engine, params(seed=11, ip_adapter=ip([A])))
    assert np.abs(run(engine, params(seed=11)) - before).max() == 0
    assert engine.pipeline("tiny-sd15").unet.encoder_hid_proj is None


def test_style_only_sets_instantstyle_blocks(engine: Engine) -> None:
    config = engine.pipeline("tiny-sd15").unet.config
    assert ip_adapter_scale(IPAdapterOptions(**ip([A], 0.7)), config) == 0.7
    style = ip_adapter_scale(IPAdapterOptions(**ip([A], 0.7, style_only=True)), config)
    first_attention = next(k for k, b in enumerate(config.up_block_types) if "CrossAttn" in b)
    assert set(style["up"]) == {f"block_{first_attention}"}

    class SDXLLike:  # SDXL's layout: the first up block has three transformers
        up_block_types = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
        layers_per_block = 2

    assert ip_adapter_scale(IPAdapterOptions(**ip([A], 1.0, style_only=True)), SDXLLike) == {
        "up": {"block_0": [0.0, 1.0, 0.0]}
    }
    styled = run(engine, params(ip_adapter=ip([A], 0.7, style_only=True)))
    full = run(engine, params(ip_adapter=ip([A], 0.7)))
    assert np.abs(styled - full).max() > 0


def test_hires_second_pass_keeps_the_image_prompt(engine: Engine) -> None:
    """The IP-Adapter stays loaded for the hires pass, whose rows carry the same embeddings."""
    hires = {"scale": 1.5, "steps": 3, "strength": 0.5}
    with_ip = run(engine, params(steps=4, hires=hires, ip_adapter=ip([A])))
    plain = run(engine, params(steps=4, hires=hires))
    assert with_ip.shape == (96, 96, 3) and np.abs(with_ip - plain).max() > 0

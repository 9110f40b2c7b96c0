"""Speed levers on the CPU: each one matches the eager path (relative L2 of final latents <= 2e-2).

The pipelines are the fixtures' tiny ones, built in memory. Compilation is exercised with torch.compile's
"eager" backend (Dynamo tracing, guards, the shape gate, buckets and sealing, in seconds): inductor's
CPU compile of even the tiny UNet takes minutes here, so that one runs only with GENSERVE_TEST_INDUCTOR=1.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from genserve.bench.paths import ACCURACY_LIMIT, engine_latents, relative_l2
from genserve.engine.loop.previews import fit_latent_rgb_map
from genserve.engine.models.fixtures import _build
from genserve.engine.speed.deepcache import DeepCacheForward, begin_run, enable_deepcache, shallow_forward
from genserve.engine.speed.gated import GatedForward, bucket_for, resolve_sdpa
from genserve.engine.speed.optimize import (
    EngineOptimizations,
    OptimizationError,
    apply_optimizations,
    preferred_dtype,
    resolve_compile_mode,
)
from genserve.engine.speed.vae_decode import GuardedDecode
from genserve.schemas.generation import GenerationParams

torch.set_num_threads(1)

FAMILIES = ("sd15", "sdxl", "sd3")


def params(num_images: int = 1, steps: int = 3, cfg_scale: float = 7.0, **kwargs) -> GenerationParams:
    # Resolved params, as the engine paths get them (cfg_scale included: no model card to ask here).
    return GenerationParams(
        prompt="a red fox", model="tiny", seed=7, steps=steps, width=64, height=64,
        cfg_scale=cfg_scale, num_images=num_images, preview_every=0, **kwargs,
    )  # fmt: skip


def latents(pipe, family, p: GenerationParams) -> torch.Tensor:
    rgb_map = fit_latent_rgb_map(pipe.vae, pipe.vae_scale_factor)
    return engine_latents(pipe, family, p, "cpu", torch.float32, rgb_map)


def optimized(family: str, **options):
    pipe = _build(family, 0)
    applied = apply_optimizations(pipe, family, EngineOptimizations(**options), "cpu", torch.float32)
    return pipe, applied


# 1. Options


def test_options_from_plain_dict_and_validation():
    options = EngineOptimizations.from_dict(
        {
            "channels_last": "auto",
            "fuse_qkv": "true",
            "compile": "reduce-overhead",
            "batch_buckets": "4,1,2",
            "warm_sizes": "832x1216, 1216x832",
            "deepcache": "3",
            "compile_cache_dir": "/tmp/cc",
        }
    )
    assert options.channels_last is None and options.fuse_qkv is True
    assert options.batch_buckets == (1, 2, 4) and options.warm_sizes == ("832x1216", "1216x832")
    assert options.deepcache == 3 and str(options.compile_cache_dir) == "/tmp/cc"
    with pytest.raises(ValueError, match="unknown optimization"):
        EngineOptimizations.from_dict({"turbo": True})
    with pytest.raises(ValueError, match="compile must be one of"):
        EngineOptimizations(compile="fast")
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        EngineOptimizations(warm_sizes=("big",))


def test_settings_model_matches_the_options():
    import genserve.config

    model = getattr(genserve.config, "Optimizations", None)
    if model is None:
        pytest.skip("genserve.config has no Optimizations settings model yet")
    assert set(model.model_fields) == {f.name for f in dataclasses.fields(EngineOptimizations)}
    assert EngineOptimizations.from_dict(model().model_dump()) == EngineOptimizations()


def test_device_defaults():
    assert resolve_compile_mode("auto", "sd15", "cpu") == "off"
    assert preferred_dtype("sd3", "cpu") == torch.float32
    pipe, applied = optimized("sd15")
    assert (applied.channels_last, applied.fuse_qkv, applied.compile, applied.compile_vae) == (
        True,
        False,
        "off",
        False,
    )
    assert applied.warmup_plan(64, 64) == [type(applied.warmup_plan(64, 64)[0])(64, 64, 1, 1)]


# 2. Each lever against the eager path


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_fusion_and_attention_levers_match_eager(family):
    reference = latents(_build(family, 0), family, params(2))
    pipe, applied = optimized(family, channels_last=True, fuse_qkv=True, sdpa_backend="math")
    assert applied.fuse_qkv and applied.channels_last and applied.sdpa_backend == "math"
    if family != "sd3":
        assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert pipe.vae.config.force_upcast is True  # fp32: nothing to make half-precision-safe
    assert relative_l2(latents(pipe, family, params(2)), reference) <= ACCURACY_LIMIT


def test_sdpa_backend_falls_back_where_unavailable():
    backends, name, note = resolve_sdpa("cudnn", "cpu")
    assert backends is None and name == "auto" and "needs CUDA" in note
    backends, name, _ = resolve_sdpa("flash", "cpu")
    assert name == "flash" and [b.name for b in backends] == ["FLASH_ATTENTION", "MATH"]
    _, applied = optimized("sd15", sdpa_backend="efficient")
    assert applied.sdpa_backend == "auto" and any("efficient needs CUDA" in n for n in applied.notes)


def compiled_rows(gate: GatedForward) -> list[int]:
    return sorted(args[0][0][0] for args, _ in gate.shapes)  # the main input's first dimension


def test_padding_to_a_bucket_matches_the_unpadded_batch():
    # The gate with the module's own forward as the "compiled" one: padding logic without Dynamo.
    family = "sd15"
    reference = latents(_build(family, 0), family, params(3, steps=2))
    pipe = _build(family, 0)
    inner = type(pipe.unet).forward.__get__(pipe.unet)
    gate = GatedForward(inner, compiled=inner, buckets=(2, 8))
    pipe.unet.forward = gate
    assert relative_l2(latents(pipe, family, params(3, steps=2)), reference) <= ACCURACY_LIMIT
    assert compiled_rows(gate) == [8]  # 3 images = 6 CFG rows, padded to 8


def test_compile_gates_shapes_and_matches_eager():
    family = "sd15"
    reference = latents(_build(family, 0), family, params(1, steps=2))
    pipe, applied = optimized(
        family, compile="default", compile_backend="eager", compile_vae=False, batch_buckets=(1, 4)
    )
    gate = applied.denoiser_forward
    assert isinstance(pipe.unet.forward, GatedForward) and pipe.unet.config.in_channels == 4
    run = type(applied.warmup_plan(64, 64)[0])
    assert applied.warmup_plan(64, 64) == [run(64, 64, 1, 1), run(64, 64, 4, 1)]

    assert relative_l2(latents(pipe, family, params(1, steps=2)), reference) <= ACCURACY_LIMIT
    assert compiled_rows(gate) == [2] and gate.compiled_calls == 2

    # After warm-up, a shape never seen runs eagerly instead of compiling mid-request.
    applied.finish_warmup()
    latents(pipe, family, params(2, steps=1))  # 4 rows: not warmed
    assert gate.eager_calls == 1 and gate.compiled_calls == 2 and compiled_rows(gate) == [2]


@pytest.mark.skipif(
    os.environ.get("GENSERVE_TEST_INDUCTOR") != "1",
    reason="inductor's CPU compile of the tiny UNet takes ~100 s here; set GENSERVE_TEST_INDUCTOR=1",
)
def test_inductor_compile_matches_eager(tmp_path):
    reference = latents(_build("sd15", 0), "sd15", params(1, steps=2))
    pipe, applied = optimized("sd15", compile="default", compile_cache_dir=tmp_path)
    assert relative_l2(latents(pipe, "sd15", params(1, steps=2)), reference) <= ACCURACY_LIMIT
    applied.finish_warmup()
    assert (tmp_path / "inductor").is_dir()


# 3. VAE decode


class OverflowingVae(torch.nn.Module):
    """Decodes to inf in half precision for latents marked with a large first value; fine in fp32."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1, dtype=torch.float16))
        self.use_tiling = self.use_slicing = False
        self.calls: list[tuple[torch.dtype, int]] = []

    def decode(self, z, return_dict=True):
        self.calls.append((self.weight.dtype, z.shape[0]))
        out = z.to(self.weight.dtype) * self.weight
        if self.weight.dtype == torch.float16:
            out = torch.where(z[:, :1, :1, :1] > 100, torch.full_like(out, float("inf")), out)
        return (out,)


def test_fp16_safe_decode_redoes_only_overflowed_rows_in_fp32():
    vae = OverflowingVae()
    decode = GuardedDecode(vae, scale_factor=8, check_finite=True)
    z = torch.zeros(3, 4, 8, 8)
    z[1, 0, 0, 0] = 200.0
    z[0] += 0.5
    [decoded] = decode(z, return_dict=False)
    assert torch.isfinite(decoded).all() and decoded.dtype == torch.float16
    assert decoded[1, 0, 0, 0] == 200.0 and decoded[0, 0, 1, 1] == 0.5
    assert vae.calls == [(torch.float16, 3), (torch.float32, 1)]  # one row redone
    assert vae.weight.dtype == torch.float16 and decode.fp32_redos == 1


def test_fp16_safe_vae_drops_the_fp32_upcast_of_a_half_precision_pipeline():
    pipe = _build("sdxl", 0).to(dtype=torch.float16)
    assert pipe.vae.config.force_upcast
    applied = apply_optimizations(pipe, "sdxl", EngineOptimizations(), "cpu", torch.float16)
    assert pipe.vae.config.force_upcast is False  # denoise.decode_latents no longer upcasts
    assert applied.vae_decode.startswith("float16, fp32 redo")  # bf16 only on GPUs with native bf16
    pipe = _build("sdxl", 0).to(dtype=torch.float16)
    applied = apply_optimizations(
        pipe, "sdxl", EngineOptimizations(fp16_safe_vae=False), "cpu", torch.float16
    )
    assert pipe.vae.config.force_upcast and applied.vae_decode == "fp32 (force_upcast)"


def test_vae_tiling_and_slicing_follow_the_size_thresholds():
    pipe, _ = optimized(
        "sd15", vae_tile_above_pixels=48 * 48, vae_tile_size=32, vae_slice_above_pixels=64 * 64
    )
    tiled = []
    original_tiled = pipe.vae.tiled_decode
    pipe.vae.tiled_decode = lambda *a, **k: tiled.append(1) or original_tiled(*a, **k)
    with torch.inference_mode():
        [small] = pipe.vae.decode(torch.randn(1, 4, 16, 16), return_dict=False)  # 32x32 px: whole
        assert not pipe.vae.use_tiling and not tiled and small.shape == (1, 3, 32, 32)
        [big] = pipe.vae.decode(torch.randn(2, 4, 32, 32), return_dict=False)  # 64x64 px, 2 images
        assert pipe.vae.use_tiling and pipe.vae.use_slicing and tiled and big.shape == (2, 3, 64, 64)
        assert torch.isfinite(big).all()


# 4. fp8


def test_fp8_fails_clearly_without_a_gpu():
    with pytest.raises(OptimizationError, match="compute capability 8.9"):
        optimized("sd15", fp8=True)


# 5. Buckets and DeepCache


def test_bucket_choice():
    assert [bucket_for(r, (2, 4, 8)) for r in (1, 2, 3, 5, 8, 9)] == [2, 2, 4, 8, 8, 9]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_deepcache_shallow_branch_equals_full_unet_on_the_same_step(family):
    unet = _build(family, 0).unet
    forward = enable_deepcache(unet, interval=2)
    sample = torch.randn(2, 4, 32, 32)
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim)
    added = None
    if family == "sdxl":
        added = {"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)}
    t = torch.tensor(500.0)
    with torch.inference_mode():
        begin_run(unet)
        [full] = unet(sample, t, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False)
        # With the deep features of this very input, the shallow branch must reproduce the full output.
        shallow = shallow_forward(unet, sample, t, hidden, forward._deep, added_cond_kwargs=added)
        [cached] = unet(sample, t, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False)
    assert torch.allclose(shallow, full, atol=1e-5) and torch.allclose(cached, full, atol=1e-5)
    assert (forward.full_calls, forward.cached_calls) == (1, 1)


def test_deepcache_in_the_engine_loop():
    family = "sd15"
    reference = latents(_build(family, 0), family, params(1, steps=4))
    pipe, applied = optimized(family, deepcache=2, compile="default", compile_backend="eager")
    assert applied.deepcache == 2 and applied.compile == "off"  # the UNet runs eagerly under DeepCache
    forward = pipe.unet.forward.inner
    assert isinstance(forward, DeepCacheForward)
    result = latents(pipe, family, params(1, steps=4))  # engine_latents calls begin_run
    assert (forward.full_calls, forward.cached_calls) == (2, 2)
    assert torch.isfinite(result).all() and relative_l2(result, reference) < 1.0
    # Without begin_run the cache is never armed: every call is a full one.
    forward.full_calls = forward.cached_calls = 0
    forward._armed = False
    with torch.inference_mode():
        sample, hidden = torch.randn(2, 4, 32, 32), torch.randn(2, 77, 32)
        for _ in range(3):
            pipe.unet(sample, torch.tensor(10.0), encoder_hidden_states=hidden)
    assert (forward.full_calls, forward.cached_calls) == (3, 0)


def test_deepcache_is_not_applied_to_transformers():
    _, applied = optimized("sd3", deepcache=3)
    assert applied.deepcache == 0 and any("deepcache" in n for n in applied.notes)

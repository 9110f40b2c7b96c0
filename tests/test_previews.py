"""Live previews: the latent→RGB fit is checked on a VAE whose encoder is a known linear map, and
the engine emits previews on the requested cadence."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from genserve.engine.loop.previews import fit_latent_rgb_map, latents_to_rgb, preview_images


class LinearVae(torch.nn.Module):
    """encode(x) = A · avgpool(x) + c per latent pixel: the fit must recover its inverse."""

    def __init__(self, matrix: torch.Tensor, offset: torch.Tensor, factor: int, scaling: float) -> None:
        super().__init__()
        self.matrix = torch.nn.Parameter(matrix, requires_grad=False)
        self.offset = offset
        self.factor = factor
        self.config = SimpleNamespace(scaling_factor=scaling, shift_factor=None)

    def encode(self, images: torch.Tensor) -> SimpleNamespace:
        pooled = torch.nn.functional.avg_pool2d(images, self.factor)
        mean = torch.einsum("cr,brhw->bchw", self.matrix, pooled) + self.offset.view(1, -1, 1, 1)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean))


def test_fit_recovers_a_known_linear_encoder():
    generator = torch.Generator().manual_seed(1)
    matrix = torch.randn(4, 3, generator=generator)  # 4 latent channels from RGB
    offset = torch.randn(4, generator=generator)
    vae = LinearVae(matrix, offset, factor=4, scaling=0.5)
    rgb_map = fit_latent_rgb_map(vae, vae_scale_factor=4)
    # Round trip: colour → latent (as the denoiser sees it) → colour.
    colours = torch.rand(50, 3, generator=generator) * 2 - 1
    latents = (colours @ matrix.T + offset) * 0.5
    recovered = latents @ rgb_map.weight.T + rgb_map.bias
    assert torch.allclose(recovered, colours, atol=1e-4)


def test_latents_to_rgb_shapes_and_range():
    rgb_map = SimpleNamespace(weight=torch.eye(3, 4) * 10, bias=torch.zeros(3))
    latents = torch.randn(2, 4, 5, 7)
    rgb = latents_to_rgb(latents, rgb_map)
    assert rgb.shape == (2, 5, 7, 3) and rgb.dtype == torch.uint8
    assert rgb.min() == 0 and rgb.max() == 255  # clamped, not wrapped
    pictures = preview_images(latents, rgb_map, min_side=28)
    assert [p.size for p in pictures] == [(28, 20), (28, 20)]


@pytest.fixture(scope="module")
def engine(tiny_models_dir):
    from genserve.engine.engine import Engine
    from genserve.engine.models.registry import scan_models

    torch.set_num_threads(1)
    return Engine(scan_models(tiny_models_dir))


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl", "tiny-sd3"])
def test_engine_emits_previews_every_n_steps(engine, model):
    from genserve.schemas import GenerationParams

    previews = []
    params = GenerationParams(
        prompt="x", model=model, seed=1, steps=7, width=64, height=64, num_images=2, preview_every=3
    )
    images = engine.generate(
        params, on_preview=lambda step, steps, pics: previews.append((step, steps, pics))
    )
    assert [(step, steps) for step, steps, _ in previews] == [(3, 7), (6, 7)]
    for _, _, pictures in previews:
        assert len(pictures) == 2 and pictures[0].mode == "RGB" and min(pictures[0].size) >= 64
    assert len(images) == 2


def test_previews_off_and_pixels_unchanged_by_previews(engine):
    from genserve.schemas import GenerationParams

    base = dict(prompt="x", model="tiny-sd15", seed=5, steps=4, width=64, height=64)
    calls = []
    plain = engine.generate(GenerationParams(**base, preview_every=0), on_preview=lambda *a: calls.append(a))
    with_previews = engine.generate(GenerationParams(**base, preview_every=1), on_preview=lambda *a: None)
    assert calls == []
    assert plain[0].tobytes() == with_previews[0].tobytes()

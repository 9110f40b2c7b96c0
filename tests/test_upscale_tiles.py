"""Tiled upscaling equals untiled upscaling (so seams cannot hide), batches of tiles halve on out of
memory, and tiles respect the model's size requirements. Random-weight spandrel models; needs the
`upscale` extra (spandrel, torchvision)."""

from __future__ import annotations

import pytest
import torch

spandrel = pytest.importorskip("spandrel")

from spandrel import ModelLoader  # noqa: E402
from spandrel.architectures.Compact import Compact  # noqa: E402
from spandrel.architectures.ESRGAN import ESRGAN  # noqa: E402

from genserve.engine.upscale import models as upscale_models  # noqa: E402
from genserve.engine.upscale.tiles import feather, tile_grid, upscale_tiled  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _descriptor(module: torch.nn.Module, std: float = 0.2):
    torch.manual_seed(0)
    for parameter in module.parameters():  # random weights, not the initialiser's near-zero ones
        torch.nn.init.normal_(parameter, std=std)
    return ModelLoader().load_from_state_dict(module.state_dict()).eval()


def _compact():
    return _descriptor(Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2))


def test_grid_covers_the_picture_with_equal_tiles() -> None:
    grid = tile_grid(100, 70, 32, 8)
    assert {(t.width, t.height) for t in grid} == {(32, 32)}
    covered = torch.zeros(70, 100)
    for t in grid:
        covered[t.top : t.top + t.height, t.left : t.left + t.width] += 1
    assert covered.min() >= 1
    assert max(t.left + t.width for t in grid) == 100 and max(t.top + t.height for t in grid) == 70


def test_weights_are_a_partition_over_the_picture() -> None:
    width, height, overlap, scale = 100, 70, 16, 2
    total = torch.zeros(height * scale, width * scale)
    for t in tile_grid(width, height, 40, overlap):
        total[t.top * scale : (t.top + t.height) * scale, t.left * scale : (t.left + t.width) * scale] += (
            feather(t, width, height, overlap, scale)
        )
    assert total.min() > 0.3


def _esrgan():
    return _descriptor(ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=2), std=0.1)


# Compact's receptive field is 4 input pixels (4 convolutions), within overlap/4 = 4: exact up to
# rounding. Tiny ESRGAN's (~20 convolutions) reaches further; with overlap 32 (margin 8) what its
# zero padding leaks into the blend stays far below one level of 8-bit colour (1/255).
@pytest.mark.parametrize(
    ("make", "tile", "overlap", "tolerance"), [(_compact, 32, 16, 1e-5), (_esrgan, 48, 32, 1e-3)]
)
def test_tiled_equals_untiled(make, tile: int, overlap: int, tolerance: float) -> None:  # noqa: ANN001
    descriptor = make()
    torch.manual_seed(1)
    image = torch.rand(1, 3, 72, 88)
    with torch.inference_mode():
        whole = descriptor(image)
        calls: list[int] = []

        def model(x: torch.Tensor) -> torch.Tensor:
            calls.append(len(x))
            return descriptor(x)

        tiled = upscale_tiled(model, image, 2, tile=tile, overlap=overlap, batch=4)
    assert tiled.shape == whole.shape == (1, 3, 144, 176)
    tiles = len(tile_grid(88, 72, tile, overlap))
    assert tiles > 4 and calls == [4] * (tiles // 4) + (
        [tiles % 4] if tiles % 4 else []
    )  # batches of equal tiles
    assert whole.std().item() > 1e-3  # the model does not collapse to a constant
    assert (tiled - whole).abs().max().item() < tolerance


def test_a_batch_that_runs_out_of_memory_is_halved() -> None:
    descriptor = _compact()
    image = torch.rand(1, 3, 64, 64)
    sizes: list[int] = []

    def model(x: torch.Tensor) -> torch.Tensor:
        sizes.append(len(x))
        if len(x) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return descriptor(x)

    with torch.inference_mode():
        tiled = upscale_tiled(model, image, 2, tile=32, overlap=16, batch=8)
        whole = descriptor(image)
    assert sizes[:2] == [8, 4] and max(sizes[2:]) == 2 and sum(sizes[2:]) == 9  # 9 tiles
    assert (tiled - whole).abs().max().item() < 1e-5


def test_a_tile_that_runs_out_of_memory_alone_is_halved() -> None:
    descriptor = _compact()
    seen: list[int] = []
    original = descriptor._call_fn

    def small_tiles_only(model, x):  # noqa: ANN001, ANN202
        seen.append(x.shape[-1])
        if x.shape[-1] > 64:
            raise RuntimeError("CUDA error: out of memory")
        return original(model, x)

    descriptor._call_fn = small_tiles_only
    image = torch.rand(1, 3, 128, 128)
    out = upscale_models.upscale_pixels(descriptor, image, tile=128, batch=1)
    assert out.shape == (1, 3, 256, 256)
    assert seen[0] == 128 and set(seen[1:]) == {64}


def test_tile_size_respects_the_size_requirements() -> None:
    class Requirements:
        minimum, multiple_of = 96, 32

    class Fake:
        size_requirements = Requirements()

    assert upscale_models.tile_size(Fake(), "cpu", 200) == 192
    assert upscale_models.tile_size(Fake(), "cpu", 50) == 96


def test_half_precision_only_on_a_gpu_and_where_the_architecture_allows() -> None:
    class Descriptor:
        supports_half, supports_bfloat16 = True, False

    assert upscale_models.model_dtype(Descriptor(), "cpu", torch.float16) == torch.float32
    assert upscale_models.model_dtype(Descriptor(), "cuda", torch.float16) == torch.float16
    assert upscale_models.model_dtype(Descriptor(), "cuda", torch.bfloat16) == torch.float16  # no bf16: fp16
    Descriptor.supports_half = False  # RestoreFormer, GFPGAN: bfloat16 only
    Descriptor.supports_bfloat16 = True
    assert upscale_models.model_dtype(Descriptor(), "cuda", torch.float16) == torch.float32
    assert upscale_models.model_dtype(Descriptor(), "cuda", torch.bfloat16) == torch.bfloat16

"""The cost model's upscale term: seconds per output megapixel (calibrated or default) plus a time
per face, added to an image job's estimate and pricing an upscale job."""

from __future__ import annotations

from genserve.api.upscale_submission import post_seconds
from genserve.scheduler.cost import UPSCALE_S_PER_MEGAPIXEL, upscale_rate, upscale_seconds, upscale_timing
from genserve.schemas.generation import GenerationParams


def test_rate_is_calibrated_per_device_else_default() -> None:
    timings = [upscale_timing("x2", "cpu", 1.5, samples=3)]
    assert upscale_rate(timings, "x2", "cpu") == (1.5, "calibrated")
    assert upscale_rate(timings, "x2", "NVIDIA H100") == (UPSCALE_S_PER_MEGAPIXEL["cuda"], "default")
    assert upscale_rate(timings, "other", "cpu") == (UPSCALE_S_PER_MEGAPIXEL["cpu"], "default")


def test_seconds_scale_with_output_pixels_and_faces() -> None:
    assert upscale_seconds(2_000_000, device="cpu", s_per_megapixel=1.5) == 3.0
    assert upscale_seconds(0, device="cuda", faces=2) > 0


def test_an_image_jobs_post_stage_costs_per_image() -> None:
    params = GenerationParams(prompt="x", num_images=3, upscale={"model": "x2", "scale": 2})
    timings = [upscale_timing("x2", "cpu", 2.0, samples=1)]
    assert post_seconds(params, (500, 500), timings, "cpu") == 3 * 2.0 * 1.0  # 1000x1000 out, 3 images
    assert post_seconds(GenerationParams(prompt="x"), (500, 500), timings, "cpu") == 0.0

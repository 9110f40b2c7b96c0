"""The second stages, planned: the hires fix's size and schedule (as AUTOMATIC1111 defines them)
and whether a refiner can finish a request.

Torch-free: the API checks requests with the same functions the engine runs them with
(stages/hires.py and stages/refiner.py run the passes themselves).
"""

from __future__ import annotations

from collections.abc import Mapping

from genserve.engine.models.registry import ModelInfo
from genserve.schemas.generation import GenerationParams
from genserve.schemas.image_inputs import HiresOptions

# Latent upscalers: torch.nn.functional.interpolate's mode and antialias flag for each name.
LATENT_UPSCALERS: dict[str, tuple[str, bool]] = {
    "latent": ("bilinear", False),  # AUTOMATIC1111's default "Latent"
    "latent_bilinear": ("bilinear", False),
    "latent_bicubic": ("bicubic", False),
    "latent_nearest": ("nearest", False),
    "latent_antialiased": ("bilinear", True),
}

# Every family is trained on 1000 timesteps; a sampler's schedule cannot be longer.
MAX_SCHEDULE_STEPS = 1000

# AUTOMATIC1111 caps the second pass's strength below 1, so its schedule is never shorter than its steps.
_MAX_STRENGTH = 0.999


def size_multiple(family: str) -> int:
    """What a hires size rounds to: whole latents, and whole SD3 patches (VAE factor 8 × patch 2)."""
    return 16 if family == "sd3" else 8


def is_latent_upscaler(name: str) -> bool:
    return name in LATENT_UPSCALERS


def target_size(width: int, height: int, hires: HiresOptions, multiple: int = 8) -> tuple[int, int]:
    """The second pass's (width, height): the size asked for, or the first pass's times `scale`
    rounded half up to whole `multiple`s (the web UI shows the same rounding)."""
    if hires.width is not None and hires.height is not None:
        return hires.width, hires.height
    assert hires.scale is not None  # HiresOptions needs scale or both sizes
    return _round_to(width * hires.scale, multiple), _round_to(height * hires.scale, multiple)


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(value / multiple + 0.5) * multiple)


def second_pass_steps(params: GenerationParams) -> int:
    """The steps the second pass runs: hires.steps, else the first pass's."""
    assert params.hires is not None
    return params.hires.steps or params.steps


def second_pass_schedule(steps: int, strength: float) -> tuple[int, int]:
    """(schedule length, start index) of a second pass that runs exactly `steps` steps.

    AUTOMATIC1111's hires pass (its "fix steps" img2img) stretches the schedule to
    int(steps / strength) and runs its last `steps` steps, so a weaker strength starts lower on a
    longer schedule. (Our img2img rule, the last int(total × strength) steps, could run one step
    fewer on that schedule: 10 / 0.55 → 18, int(18 × 0.55) = 9.)
    """
    total = max(steps, int(steps / min(strength, _MAX_STRENGTH)))
    return total, total - steps


def schedule_error(params: GenerationParams) -> str | None:
    """Why the request's second pass cannot run (its schedule is too long), or None."""
    if params.hires is None:
        return None
    steps = second_pass_steps(params)
    total, _ = second_pass_schedule(steps, params.hires.strength)
    if total > MAX_SCHEDULE_STEPS:
        return (
            f"hires strength {params.hires.strength} with {steps} steps needs a schedule of "
            f"int(steps / strength) = {total} timesteps; at most {MAX_SCHEDULE_STEPS} exist. "
            "Raise the strength or lower the steps"
        )
    return None


def output_size(params: GenerationParams, family: str) -> tuple[int, int]:
    """The (width, height) of the images a request gets: the hires size with a hires fix."""
    assert params.width is not None and params.height is not None
    if params.hires is None:
        return params.width, params.height
    return target_size(params.width, params.height, params.hires, size_multiple(family))


def refiner_problem(params: GenerationParams, info: ModelInfo, models: Mapping[str, ModelInfo]) -> str | None:
    """Why `params.refiner` cannot finish this request on base model `info`, or None."""
    assert params.refiner is not None
    name = params.refiner.model
    if info.family != "sdxl" or info.inpainting:
        kind = "an inpainting model" if info.inpainting else f"a {info.family} model"
        return f"a refiner finishes an SDXL base model's latents; '{info.name}' is {kind}"
    if params.hires is not None:
        return "refiner and hires in one request are not supported; ask for one of them"
    if name not in models:
        return f"refiner model '{name}' is not registered; see GET /v1/models"
    if not models[name].refiner:
        return f"model '{name}' is not an SDXL refiner (an img2img pipeline with aesthetic-score time ids)"
    return None

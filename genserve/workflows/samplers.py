"""ComfyUI's sampler and scheduler names and its `denoise`, in genserve's terms. Pure functions.

ComfyUI runs a KSampler with denoise d < 1 as the last `steps` steps of a schedule of
int(steps / d) steps (comfy/samplers.py `KSampler.set_steps`). genserve's img2img runs the last
int(total × strength) steps of a `total`-step schedule. So `total = int(steps / d)` and a strength
whose int(total × strength) is exactly `steps` run the same timesteps.
"""

from __future__ import annotations

COMFY_SAMPLERS: tuple[str, ...] = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_sde",
    "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu",
    "ddpm", "lcm", "ipndm", "deis", "ddim", "uni_pc", "uni_pc_bh2",
)  # fmt: skip
COMFY_SCHEDULERS: tuple[str, ...] = (
    "normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta",
)  # fmt: skip

# Samplers that are the same solver in genserve (engine/models/samplers.py).
_SAMPLERS = {
    "euler": "euler",
    "euler_ancestral": "euler_a",
    "dpmpp_2m": "dpmpp_2m",
    "ddim": "ddim",
    "uni_pc": "unipc",
    "uni_pc_bh2": "unipc",  # diffusers' UniPC default solver type is bh2
}
# Schedules genserve's samplers use as they are: timesteps evenly spaced over the training
# schedule (the model config's spacing). "karras" exists for DPM++ 2M only.
_PLAIN_SCHEDULES = ("normal", "simple", "sgm_uniform", "ddim_uniform")


class SamplerMappingError(ValueError):
    """A sampler/scheduler pair genserve cannot run; `input` is the KSampler input to blame."""

    def __init__(self, input_name: str, message: str) -> None:
        super().__init__(message)
        self.input = input_name


def genserve_sampler(sampler_name: str, scheduler: str) -> str:
    """genserve's sampler for ComfyUI's (sampler_name, scheduler), or SamplerMappingError."""
    sampler = _SAMPLERS.get(sampler_name)
    if sampler is None:
        supported = ", ".join(sorted(_SAMPLERS))
        raise SamplerMappingError(
            "sampler_name",
            f"sampler '{sampler_name}' has no equivalent in genserve; use one of: {supported}",
        )
    if scheduler == "karras":
        if sampler != "dpmpp_2m":
            raise SamplerMappingError(
                "scheduler", f"the karras scheduler is available with dpmpp_2m only, not '{sampler_name}'"
            )
        return "dpmpp_2m_karras"
    if scheduler not in _PLAIN_SCHEDULES:
        raise SamplerMappingError(
            "scheduler",
            f"scheduler '{scheduler}' has no equivalent in genserve; use one of: "
            f"{', '.join(_PLAIN_SCHEDULES)} (or karras with dpmpp_2m)",
        )
    return sampler


def comfy_sampler(sampler: str) -> str:
    """ComfyUI's sampler and scheduler for a genserve sampler, as messages name them."""
    if sampler == "dpmpp_2m_karras":
        return "sampler_name dpmpp_2m, scheduler karras"
    name = next((comfy for comfy, ours in _SAMPLERS.items() if ours == sampler), sampler)
    return f"sampler_name {name}, scheduler normal"


def denoise_to_strength(steps: int, denoise: float) -> tuple[int, float]:
    """(genserve steps, strength) that run the same timesteps as ComfyUI's (steps, denoise).

    The result's schedule has int(steps / denoise) steps and int(total × strength) == steps, so
    exactly `steps` steps run, the last ones of the longer schedule, as in ComfyUI.
    """
    if not 0 < denoise <= 1:
        raise ValueError("denoise must be in (0, 1]")
    if denoise > 0.9999:  # ComfyUI's own threshold for "the whole schedule"
        return steps, 1.0
    total = int(steps / denoise)
    if total <= steps:
        return steps, 1.0
    # Halfway between steps/total and (steps+1)/total: int() of total × strength lands on `steps`
    # whatever the float rounding.
    return total, (steps + 0.5) / total


def advanced_to_strength(steps: int, start_at_step: int) -> float:
    """KSamplerAdvanced from `start_at_step` to the end of a `steps` schedule, as genserve's strength."""
    return min(1.0, (steps - start_at_step + 0.5) / steps)

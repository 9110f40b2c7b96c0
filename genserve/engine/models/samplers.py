"""Sampler names -> diffusers schedulers, built from the model's own scheduler config.

Building from the model's config keeps its training schedule (betas, prediction type, timestep
spacing, flow shift); the overrides below only pick the solver and the sigma spacing. Which sampler
each family supports is decided in `registry.SUPPORTED_SAMPLERS`; this module must agree with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from genserve.engine.models.registry import SUPPORTED_SAMPLERS, Family

# A model config may ask for another sigma spacing; each sampler states the one it means.
_PLAIN_SIGMAS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
_KARRAS_SIGMAS = {**_PLAIN_SIGMAS, "use_karras_sigmas": True}
_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}

# Noise-prediction models (SD1.x/2.x, SDXL): names as in A1111 / k-diffusion.
NOISE_SAMPLERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "euler": (EulerDiscreteScheduler, _PLAIN_SIGMAS),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {**_DPMPP_2M, **_PLAIN_SIGMAS}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {**_DPMPP_2M, **_KARRAS_SIGMAS}),
    # Clipping x0 to [-1, 1] is meant for pixel-space models; latents have a wider range.
    "ddim": (DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": False}),
    "unipc": (UniPCMultistepScheduler, _PLAIN_SIGMAS),
}

# Flow-matching models (SD3): the multistep solvers take the flow parameterisation explicitly.
_FLOW = {
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "final_sigmas_type": "zero",
    **_PLAIN_SIGMAS,
}
FLOW_SAMPLERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "euler": (FlowMatchEulerDiscreteScheduler, {"stochastic_sampling": False, **_PLAIN_SIGMAS}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {**_DPMPP_2M, **_FLOW}),
    "unipc": (UniPCMultistepScheduler, _FLOW),
}

FAMILY_SAMPLERS: dict[Family, dict[str, tuple[type[SchedulerMixin], dict[str, Any]]]] = {
    "sd15": NOISE_SAMPLERS,
    "sdxl": NOISE_SAMPLERS,
    "sd3": FLOW_SAMPLERS,
}
assert all(set(FAMILY_SAMPLERS[f]) == set(SUPPORTED_SAMPLERS[f]) for f in SUPPORTED_SAMPLERS), (
    "samplers.FAMILY_SAMPLERS and registry.SUPPORTED_SAMPLERS disagree"
)


def build_scheduler(family: Family, sampler: str, base_config: Mapping[str, Any]) -> SchedulerMixin:
    """A new scheduler for `sampler`, built from a model's scheduler config (which is not modified)."""
    table = FAMILY_SAMPLERS[family]
    if sampler not in table:
        raise ValueError(
            f"sampler '{sampler}' is not supported for {family} models; supported: {sorted(table)}"
        )
    scheduler_class, overrides = table[sampler]
    if overrides.get("use_flow_sigmas"):
        # The flow solvers read the shift from `flow_shift`; FlowMatchEuler's config calls it `shift`.
        overrides = {**overrides, "flow_shift": base_config.get("shift", base_config.get("flow_shift", 1.0))}
    return scheduler_class.from_config(dict(base_config), **overrides)

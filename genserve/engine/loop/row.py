"""A row: one image of one request, with everything that is its own in the shared loop.

Rows of a batch share the model, the size, the step count and the sampler's timestep list. Each row
keeps its own scheduler (multistep samplers hold per-sample history), its own generator (so it
draws the noise it would draw alone), the loop index at which it joins (img2img starts part-way
down the schedule) and, when it inpaints, what it adds to each step: a blend for 4-channel models or
extra input channels for 9-channel inpainting models. The loop treats every row alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


def start_index(steps: int, strength: float) -> int:
    """The loop index where a row of this strength joins: it runs the last int(steps × strength) steps
    of the same `steps`-long schedule (diffusers' and AUTOMATIC1111's img2img semantics)."""
    run = min(int(steps * strength), steps)
    if run < 1:
        raise ValueError(f"strength {strength} of {steps} steps runs no step; raise strength or steps")
    return steps - run


def renoise(scheduler: Any, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Clean latents noised to timestep t: `add_noise` for SD samplers, `scale_noise` for flow matching.

    Euler-type schedulers read the sigma at their begin or current step index, so the scheduler must
    already stand where t is (set_begin_index before the row's first step; after a step, the next).
    """
    t = t.reshape(1)
    if hasattr(scheduler, "add_noise"):
        return scheduler.add_noise(clean, noise, t)
    return scheduler.scale_noise(clean, t, noise)


@dataclass
class Blend:
    """Inpainting on a 4-channel model: after each step, what lies outside the mask goes back to the
    original latents, noised to the level of the next step (clean after the last one)."""

    mask: torch.Tensor  # (1, 1, h, w) in latent space; 1 = repaint
    original: torch.Tensor  # (1, C, h, w) clean latents of the picture
    noise: torch.Tensor  # (1, C, h, w) the row's noise, reused so the kept area follows one path

    def apply(self, scheduler: Any, latents: torch.Tensor, next_t: torch.Tensor | None) -> torch.Tensor:
        kept = self.original if next_t is None else renoise(scheduler, self.original, self.noise, next_t)
        return blend(latents, kept, self.mask)


def blend(generated: torch.Tensor, kept: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(1 − m)·kept + m·generated: m = 1 repaints, m = 0 keeps."""
    return (1 - mask) * kept + mask * generated


@dataclass
class Row:
    item: int  # index of the request in the batch
    seed: int
    scheduler: Any
    generator: torch.Generator  # CPU, seeded with `seed`: initial noise, VAE sampling, ancestral noise
    start: int  # loop index of the row's first step
    latents: torch.Tensor  # (1, C, h, w): before the first step, the starting latents
    blend: Blend | None = None
    # Channels appended to the (scaled) model input: mask + masked-picture latents for 9-channel UNets.
    extra: torch.Tensor | None = None
    # Loop index where the row leaves this model (an SDXL base hands over to its refiner); None: the end.
    end: int | None = None
    # What the row adds to each UNet call: ControlNet / T2I-Adapter units (conditioning/control.py)
    # and an IP-Adapter's image embeddings (1, images, D) and scale.
    controls: list[Any] = field(default_factory=list)
    image_embeds: torch.Tensor | None = None
    ip_scale: float = 0.0

    def active(self, index: int) -> bool:
        return index >= self.start and (self.end is None or index < self.end)

    def done(self, index: int) -> bool:
        """The row has nothing left to compute on this model from loop index `index` on."""
        return self.end is not None and index >= self.end

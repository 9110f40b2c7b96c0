"""DeepCache-style feature caching for UNet denoisers: an opt-in trade of quality for speed.

Ma, Fang and Wang 2023, "DeepCache: Accelerating Diffusion Models for Free" (arXiv:2312.00858),
Algorithm 1 with a uniform interval N. The deep (low-resolution) features of a UNet change slowly from
one denoising step to the next, so:

- every N-th call runs the whole UNet and keeps the input of its last up block (the deep features);
- the calls in between run only the shallow branch: conv_in → first down block → last up block (fed
  the cached deep features and fresh skip connections) → output head.

The branch here is a whole level (the first down block and the last up block), coarser than the
paper's finest branch; it skips all attention below the top level. For SDXL, whose top level has no
attention, a cached step costs a few percent of a full one; for SD1.5 roughly a third.

Use: `enable_deepcache(unet, interval)` once (apply_optimizations does it when `deepcache` > 0), then
`begin_run(unet)` at the start of every denoising run. The cache is armed only by `begin_run`, so a
loop that never calls it gets exact full steps, and one run never reuses another run's features. A
change in the number of rows (a request leaving the batch) forces a full step. The UNet runs eagerly
under DeepCache (its forward hook would break a compiled graph), so apply_optimizations does not
compile a UNet that uses it.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel, UNet2DConditionOutput

__all__ = ["DeepCacheForward", "begin_run", "enable_deepcache"]


class DeepCacheForward:
    """Replaces `unet.forward`: full calls every `interval` calls of a run, shallow calls between."""

    def __init__(self, unet: UNet2DConditionModel, interval: int) -> None:
        if interval < 1:
            raise ValueError(f"deepcache interval must be >= 1, got {interval}")
        self.unet = unet
        self.interval = interval
        self.full = type(unet).forward.__get__(unet)  # the model's own forward
        self.full_calls = 0
        self.cached_calls = 0
        self._armed = False
        self._calls = 0  # calls since begin_run
        self._deep: torch.Tensor | None = None
        self._capturing = False
        unet.up_blocks[-1].register_forward_pre_hook(self._capture, with_kwargs=True)

    def begin_run(self) -> None:
        """Start a denoising run: forget the previous run's features, and allow cached calls."""
        self._armed = True
        self._calls = 0
        self._deep = None

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        **kwargs: Any,
    ) -> UNet2DConditionOutput | tuple[torch.Tensor]:
        cached = (
            self._armed
            and self._calls % self.interval != 0
            and self._deep is not None
            and self._deep.shape[0] == sample.shape[0]
        )
        self._calls += 1
        if not cached:
            self.full_calls += 1
            self._capturing = True
            try:
                return self.full(sample, timestep, encoder_hidden_states, **kwargs)
            finally:
                self._capturing = False
        self.cached_calls += 1
        return_dict = kwargs.pop("return_dict", True)
        output = shallow_forward(self.unet, sample, timestep, encoder_hidden_states, self._deep, **kwargs)
        return UNet2DConditionOutput(sample=output) if return_dict else (output,)

    def _capture(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self._capturing:
            self._deep = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def enable_deepcache(unet: UNet2DConditionModel, interval: int) -> DeepCacheForward:
    """Install DeepCache on `unet` (in place; the module keeps its type and config)."""
    if not isinstance(unet, UNet2DConditionModel):
        raise TypeError(f"DeepCache needs a UNet2DConditionModel, not {type(unet).__name__}")
    forward = DeepCacheForward(unet, interval)
    unet.forward = forward
    return forward


def begin_run(denoiser: torch.nn.Module) -> None:
    """Call once before each denoising run; a no-op for a denoiser without DeepCache."""
    forward = _find(denoiser)
    if forward is not None:
        forward.begin_run()


def _find(denoiser: torch.nn.Module) -> DeepCacheForward | None:
    forward = denoiser.__dict__.get("forward")
    # apply_optimizations may wrap it (SDPA backend): follow `.inner` links.
    while forward is not None and not isinstance(forward, DeepCacheForward):
        forward = getattr(forward, "inner", None)
    return forward


def shallow_forward(
    unet: UNet2DConditionModel,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    encoder_hidden_states: torch.Tensor,
    deep: torch.Tensor,
    *,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    cross_attention_kwargs: dict[str, Any] | None = None,
    timestep_cond: torch.Tensor | None = None,
    class_labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    **unsupported: Any,
) -> torch.Tensor:
    """UNet2DConditionModel.forward with every level below the top replaced by `deep`.

    The same phases as diffusers' forward (time embedding, conditioning, conv_in, down, up, output
    head), for the configurations genserve serves (no ControlNet/adapter residuals, no GLIGEN).
    """
    extras = {key for key, value in unsupported.items() if value is not None}
    if extras:
        raise ValueError(f"DeepCache does not support UNet arguments: {', '.join(sorted(extras))}")
    if attention_mask is not None:
        attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
    if encoder_attention_mask is not None:
        encoder_attention_mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0

    # 1. Time and added conditioning
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
    class_emb = unet.get_class_embed(sample=sample, class_labels=class_labels)
    if class_emb is not None:
        emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
    aug_emb = unet.get_aug_embed(
        emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
    )
    if aug_emb is not None:
        emb = emb + aug_emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    encoder_hidden_states = unet.process_encoder_hidden_states(
        encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
    )
    attention = {
        "encoder_hidden_states": encoder_hidden_states,
        "attention_mask": attention_mask,
        "cross_attention_kwargs": cross_attention_kwargs,
        "encoder_attention_mask": encoder_attention_mask,
    }

    # 2. The top level down: conv_in and the first down block give the last up block's skips
    hidden = unet.conv_in(sample)
    first_down = unet.down_blocks[0]
    if getattr(first_down, "has_cross_attention", False):
        _, residuals = first_down(hidden_states=hidden, temb=emb, **attention)
    else:
        _, residuals = first_down(hidden_states=hidden, temb=emb)
    last_up = unet.up_blocks[-1]
    skips = (hidden, *residuals)[: len(last_up.resnets)]

    # 3. The top level up, from the cached deep features
    if getattr(last_up, "has_cross_attention", False):
        hidden = last_up(
            hidden_states=deep, temb=emb, res_hidden_states_tuple=skips, upsample_size=None, **attention
        )
    else:
        hidden = last_up(hidden_states=deep, temb=emb, res_hidden_states_tuple=skips, upsample_size=None)

    # 4. Output head
    if unet.conv_norm_out:
        hidden = unet.conv_act(unet.conv_norm_out(hidden))
    return unet.conv_out(hidden)

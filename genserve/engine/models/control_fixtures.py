"""Tiny random-weight control models for tests, written as real folders (no downloads).

Recipes from diffusers' own tests (conditioning.md Appendix A):

- ControlNet: `ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))`: two
  entries for the tiny VAE's factor 2. A fresh ControlNet adds exactly zero (its zero convolutions),
  so the three zero-initialised parts are re-initialised to make the control change the output.
- SD3 ControlNet: `SD3ControlNetModel.from_config({**transformer.config, num_layers, extra channels 0})`,
  not `from_transformer` (it writes into the live transformer's config); its zero-initialised
  `controlnet_blocks` and `pos_embed_input` are re-initialised the same way.
- T2I-Adapter: `T2IAdapter(3, <UNet block_out_channels>, 2, downscale_factor=<VAE factor>)`.
- IP-Adapter: a tiny `CLIPVisionModelWithProjection` in `image_encoder/` plus `ip-adapter.safetensors`
  with `image_proj.*` (ImageProjection) and `ip_adapter.*` (to_k_ip / to_v_ip per cross-attention
  processor, numbered as diffusers' `create_ip_adapter_state_dict` does).

Each folder's README names its family (tiny widths say nothing about it).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    ControlNetModel,
    SD3ControlNetModel,
    SD3Transformer2DModel,
    T2IAdapter,
    UNet2DConditionModel,
)
from safetensors.torch import save_file

from genserve.engine.models.registry import Family


def _card(path: Path, family: Family) -> None:
    (path / "README.md").write_text(f"---\ngenserve:\n  family: {family}\n---\nA tiny random test model.\n")


def _unet(base: Path) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(base / "unet", local_files_only=True)


def write_tiny_controlnet(base: Path, path: Path, family: Family, *, seed: int = 0) -> Path:
    """A ControlNet for the tiny pipeline at `base` whose residuals are not zero."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controlnet = ControlNetModel.from_unet(_unet(base), conditioning_embedding_out_channels=(8, 16))
        for module in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            torch.nn.init.normal_(module.weight, std=0.5)
            torch.nn.init.normal_(module.bias, std=0.5)
        conv_out = controlnet.controlnet_cond_embedding.conv_out
        torch.nn.init.normal_(conv_out.weight, std=0.2)
        torch.nn.init.normal_(conv_out.bias, std=0.2)
    controlnet.save_pretrained(path, safe_serialization=True)
    _card(path, family)
    return path


def write_tiny_sd3_controlnet(
    base: Path,
    path: Path,
    *,
    seed: int = 0,
    num_layers: int = 1,
    force_zeros_for_pooled_projection: bool = True,
    sd35: bool = False,
) -> Path:
    """An SD3ControlNetModel for the tiny SD3 pipeline at `base` whose residuals are not zero.

    `force_zeros_for_pooled_projection` (InstantX's checkpoints: True) also decides whether the
    control latents are shifted by the VAE's shift factor; `num_layers` other than the
    transformer's spreads each residual over several transformer blocks. `sd35`: the layout of
    Stability's SD3.5 ControlNets (no patch embedding of its own, no text: single blocks)."""
    transformer = SD3Transformer2DModel.from_pretrained(base / "transformer", local_files_only=True)
    config = {
        **dict(transformer.config),
        "num_layers": num_layers,
        "extra_conditioning_channels": 0,
        "force_zeros_for_pooled_projection": force_zeros_for_pooled_projection,
    }
    if sd35:
        config.update(use_pos_embed=False, joint_attention_dim=None, pos_embed_max_size=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controlnet = SD3ControlNetModel.from_config(config)
        for module in [*controlnet.controlnet_blocks, controlnet.pos_embed_input.proj]:
            torch.nn.init.normal_(module.weight, std=0.5)
            torch.nn.init.normal_(module.bias, std=0.5)
    controlnet.save_pretrained(path, safe_serialization=True)
    _card(path, "sd3")
    return path


def write_tiny_t2i_adapter(base: Path, path: Path, family: Family, *, seed: int = 0) -> Path:
    unet = _unet(base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = T2IAdapter(
            in_channels=3,
            channels=list(unet.config.block_out_channels),
            num_res_blocks=2,
            downscale_factor=2,
            adapter_type="full_adapter",
        )
    adapter.save_pretrained(path, safe_serialization=True)
    _card(path, family)
    return path


def write_tiny_ip_adapter(base: Path, path: Path, family: Family, *, seed: int = 0) -> Path:
    from diffusers.models.attention_processor import IPAdapterAttnProcessor
    from diffusers.models.embeddings import ImageProjection
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    unet = _unet(base)
    cross = unet.config.cross_attention_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                image_size=32,
                patch_size=2,
                hidden_size=32,
                projection_dim=cross,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=37,
            )
        )
        state: dict[str, torch.Tensor] = {}
        key_id = 1  # diffusers numbers the cross-attention processors 1, 3, 5, ... (loaders/unet.py)
        for name in unet.attn_processors:
            if name.endswith("attn1.processor"):
                continue
            if name.startswith("mid_block"):
                hidden = unet.config.block_out_channels[-1]
            elif name.startswith("up_blocks"):
                hidden = list(reversed(unet.config.block_out_channels))[int(name[len("up_blocks.")])]
            else:
                hidden = unet.config.block_out_channels[int(name[len("down_blocks.")])]
            processor = IPAdapterAttnProcessor(hidden_size=hidden, cross_attention_dim=cross, num_tokens=(4,))
            for weight_name, weight in processor.state_dict().items():  # to_k_ip.0.weight -> to_k_ip.weight
                state[f"ip_adapter.{key_id}.{weight_name.replace('.0.', '.')}"] = weight
            key_id += 2
        projection = ImageProjection(
            cross_attention_dim=cross, image_embed_dim=cross, num_image_text_embeds=4
        )
        for weight_name, weight in projection.state_dict().items():  # the original checkpoints' "proj"
            state[f"image_proj.{weight_name.replace('image_embeds.', 'proj.')}"] = weight
    path.mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(path / "image_encoder", safe_serialization=True)
    save_file({k: v.contiguous() for k, v in state.items()}, path / "ip-adapter.safetensors")
    _card(path, family)
    return path

"""Tiny random-weight video pipelines, written as real diffusers folders with model cards.

The video counterpart of `fixtures.py`: every kind is a folder that loads through the same path as
a real checkpoint (`from_pretrained(path, local_files_only=True)`), with no download. Text encoders
get a code-built word-level tokenizer (`genserve.toymodel.tokenizer`), the CLIP-based ones reuse
`fixtures.py`'s byte-level CLIP tokenizer. Configurations follow diffusers' own pipeline tests
(shared research video.md §1.3); a 2-step clip takes well under a second on a CPU.

Kinds (`write_tiny_video_pipeline(kind, path)`):

- "wan": `WanPipeline` (text to video), 16x16, 4N+1 frames.
- "wan_i2v": `WanImageToVideoPipeline` laid out as Wan2.1-FLF2V: the image embedding has a position
  embedding for two pictures (`pos_embed_seq_len`), so `last_image=` works; plain i2v passes the
  first picture twice (see `engine/video/pipelines.py`).
- "ltx": `LTXPipeline`, 32x32; the same folder runs `LTXConditionPipeline` (keyframes, extension).
- "svd": `StableVideoDiffusionPipeline` (one picture in, no text), 64x64.
- "animatediff": `AnimateDiffPipeline` on an SD1.5-layout model, motion adapter included, 64x64.
- "animatediff_sdxl": `AnimateDiffSDXLPipeline`, 64x64.
- "motion_adapter": a bare `MotionAdapter` folder whose card names its base image model
  (`genserve: {base_model: ...}`), for an SD1.5 folder from `fixtures.write_tiny_pipeline("sd15", ...)`;
  this is how the shipped genserve-shapes-motion model is stored.

`write_tiny_sparsectrl(path)` writes a SparseCtrl model (`SparseControlNetModel`) for the tiny
SD1.5 AnimateDiff UNet above: "rgb" (keyframes VAE-encoded, the simplified condition embedding, as
guoyww/animatediff-sparsectrl-rgb) or "scribble" (pixels through a conditioning embedding, as
animatediff-sparsectrl-scribble). It belongs in `<models_dir>/controlnet/<name>/`.

The same kind and seed always give identical weights; the global torch RNG is left untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from diffusers import (
    AnimateDiffPipeline,
    AnimateDiffSDXLPipeline,
    AutoencoderKLLTXVideo,
    AutoencoderKLTemporalDecoder,
    AutoencoderKLWan,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LTXPipeline,
    LTXVideoTransformer3DModel,
    MotionAdapter,
    SparseControlNetModel,
    StableVideoDiffusionPipeline,
    UNetSpatioTemporalConditionModel,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

from genserve.engine.models import fixtures
from genserve.toymodel.tokenizer import build_tokenizer

VIDEO_FIXTURE_KINDS = ("wan", "wan_i2v", "ltx", "svd", "animatediff", "animatediff_sdxl", "motion_adapter")

# Words of the code-built T5 tokenizer; anything else is [UNK], which is fine for random weights.
_WORDS = "a the red green blue circle square star moving on black white background left right".split()
_T5_VOCAB = 1103  # as hf-internal-testing/tiny-random-t5
_T5_MAX_TOKENS = 16


def write_tiny_video_pipeline(kind: str, path: Path, *, seed: int = 0, base_model: str = "tiny-sd15") -> Path:
    """Write a tiny video model folder of `kind` (see the module docstring) to `path`; return `path`.

    `base_model` is the base image model a "motion_adapter" card names (ignored by other kinds).
    """
    if kind not in _BUILDERS:
        raise ValueError(
            f"unknown video fixture kind {kind!r}; expected one of {', '.join(VIDEO_FIXTURE_KINDS)}"
        )
    path = Path(path)
    builder, card = _BUILDERS[kind]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = builder()
    model.save_pretrained(path, safe_serialization=True)
    front = dict(card)
    if kind == "motion_adapter":
        front["genserve"] = {**front["genserve"], "base_model": base_model}
    _write_card(path / "README.md", kind, front)
    return path


def write_tiny_sparsectrl(path: Path, *, kind: str = "rgb", seed: int = 0) -> Path:
    """Write a tiny SparseCtrl model ("rgb" or "scribble") for the tiny SD1.5 AnimateDiff; return `path`.

    diffusers zero-initialises the condition embedding and the residual projections, so a fresh
    SparseCtrl changes nothing; here they get random weights, so the keyframes steer the clip.
    """
    if kind not in ("rgb", "scribble"):
        raise ValueError(f"unknown SparseCtrl kind {kind!r}; expected rgb or scribble")
    path = Path(path)
    rgb = kind == "rgb"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SparseControlNetModel(
            in_channels=4,
            conditioning_channels=4 if rgb else 3,  # rgb: VAE latents; scribble: pixels
            down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            attention_head_dim=(2, 4),
            cross_attention_dim=32,
            norm_num_groups=8,
            conditioning_embedding_out_channels=(8, 16),
            motion_max_seq_length=32,
            motion_num_attention_heads=2,
            use_simplified_condition_embedding=rgb,
        )
        zeroed = [*model.controlnet_down_blocks, model.controlnet_mid_block]
        embedding = model.controlnet_cond_embedding
        zeroed.append(embedding if rgb else embedding.conv_out)
        for module in zeroed:
            torch.nn.init.normal_(module.weight, std=0.5)
            torch.nn.init.normal_(module.bias, std=0.5)
    model.save_pretrained(path, safe_serialization=True)
    front = {
        "library_name": "diffusers",
        "license": "apache-2.0",
        "genserve": {"family": "animatediff", "conditioning": kind},
        "tags": _SHARED_TAGS,
    }
    body = (
        f"# tiny SparseCtrl {kind}\n\nA tiny random-weight SparseCtrl ({kind}) model written by "
        "genserve.engine.models.video_fixtures for tests.\n"
    )
    (path / "README.md").write_text(f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n{body}")
    return path


# 1. Pipelines, one per kind


def _tiny_wan() -> WanPipeline:
    return WanPipeline(
        transformer=WanTransformer3DModel(**_wan_transformer_kwargs()),
        vae=_wan_vae(),
        text_encoder=_umt5(),
        tokenizer=_t5_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )


def _tiny_wan_i2v() -> WanImageToVideoPipeline:
    # The CLIP picture is 4x4 patches of 1 pixel: 16 tokens + the class token. FLF2V embeds two pictures
    # with a learned position embedding, so pos_embed_seq_len = 2 * (16 + 1) (research §1.3).
    image_tokens = 4 * 4 + 1
    transformer = WanTransformer3DModel(
        **{**_wan_transformer_kwargs(), "in_channels": 36},  # noise 16 + mask 4 + picture latents 16
        image_dim=4,
        pos_embed_seq_len=2 * image_tokens,
    )
    vision = CLIPVisionConfig(
        hidden_size=4,
        projection_dim=4,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=4,
        intermediate_size=16,
        patch_size=1,
    )
    return WanImageToVideoPipeline(
        transformer=transformer,
        vae=_wan_vae(),
        text_encoder=_umt5(),
        tokenizer=_t5_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        image_encoder=CLIPVisionModel(vision),
        image_processor=CLIPImageProcessor(crop_size=4, size=4),
    )


def _tiny_ltx() -> LTXPipeline:
    transformer = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=4,
        attention_head_dim=8,
        cross_attention_dim=32,
        num_layers=1,
        caption_channels=32,
    )
    vae = AutoencoderKLLTXVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1),
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    return LTXPipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=_t5(),
        tokenizer=_t5_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )


def _tiny_svd() -> StableVideoDiffusionPipeline:
    unet = UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32,
        num_attention_heads=8,
        projection_class_embeddings_input_dim=96,
        addition_time_embed_dim=32,
    )
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        latent_channels=4,
    )
    # The pipeline resizes a PIL picture to 224 for CLIP whatever the processor says (research §1.3).
    vision = CLIPVisionConfig(
        hidden_size=32,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=224,
        intermediate_size=37,
        patch_size=32,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        interpolation_type="linear",
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        sigma_max=700.0,
        sigma_min=0.002,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
        use_karras_sigmas=True,
    )
    return StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=CLIPVisionModelWithProjection(vision),
        unet=unet,
        scheduler=scheduler,
        feature_extractor=CLIPImageProcessor(crop_size=224, size=224),
    )


def _tiny_motion_adapter() -> MotionAdapter:
    # Matches the tiny SD1.5/SDXL UNets of fixtures.py: two levels of 16 and 32 channels, one layer each.
    return MotionAdapter(
        block_out_channels=(16, 32),
        motion_layers_per_block=1,
        motion_norm_num_groups=8,
        motion_num_attention_heads=2,
        motion_max_seq_length=32,
        use_motion_mid_block=True,  # FreeNoise patches the mid block's motion modules too
    )


def _tiny_animatediff() -> AnimateDiffPipeline:
    sd15 = fixtures._tiny_sd15()
    return AnimateDiffPipeline(
        vae=sd15.vae,
        text_encoder=sd15.text_encoder,
        tokenizer=sd15.tokenizer,
        unet=sd15.unet,
        motion_adapter=_tiny_motion_adapter(),
        scheduler=sd15.scheduler,
    )


def _tiny_animatediff_sdxl() -> AnimateDiffSDXLPipeline:
    sdxl = fixtures._tiny_sdxl()
    return AnimateDiffSDXLPipeline(
        vae=sdxl.vae,
        text_encoder=sdxl.text_encoder,
        text_encoder_2=sdxl.text_encoder_2,
        tokenizer=sdxl.tokenizer,
        tokenizer_2=sdxl.tokenizer_2,
        unet=sdxl.unet,
        motion_adapter=_tiny_motion_adapter(),
        scheduler=sdxl.scheduler,
    )


# 2. Shared components


def _wan_transformer_kwargs() -> dict[str, Any]:
    return dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def _wan_vae() -> AutoencoderKLWan:
    return AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )


def _t5_config(config_class: type) -> Any:
    return config_class(
        vocab_size=_T5_VOCAB, d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=5, dropout_rate=0.0
    )


def _t5() -> T5EncoderModel:
    return T5EncoderModel(_t5_config(T5Config)).eval()


def _umt5() -> UMT5EncoderModel:
    return UMT5EncoderModel(_t5_config(UMT5Config)).eval()


def _t5_tokenizer() -> Any:
    return build_tokenizer(_WORDS, max_length=_T5_MAX_TOKENS)


# 3. Model cards

_SHARED_TAGS = ["toy-model", "random-weights"]

_BUILDERS: dict[str, tuple[Callable[[], Any], dict[str, Any]]] = {
    "wan": (
        _tiny_wan,
        {
            "license": "apache-2.0",
            "pipeline_tag": "text-to-video",
            "genserve": {"native_size": 16, "default_frames": 9, "default_fps": 16, "default_steps": 2},
        },
    ),
    "wan_i2v": (
        _tiny_wan_i2v,
        {
            "license": "apache-2.0",
            "pipeline_tag": "image-to-video",
            "genserve": {"native_size": 16, "default_frames": 9, "default_fps": 16, "default_steps": 2},
        },
    ),
    "ltx": (
        _tiny_ltx,
        {
            "license": "openrail-m",
            "pipeline_tag": "text-to-video",
            "genserve": {"native_size": 32, "default_frames": 9, "default_fps": 24, "default_steps": 2},
        },
    ),
    "svd": (
        _tiny_svd,
        {
            "license": "other",
            "license_name": "stable-video-diffusion-nc-community",
            "pipeline_tag": "image-to-video",
            "genserve": {"default_frames": 4, "default_fps": 7, "default_steps": 2},
        },
    ),
    "animatediff": (
        _tiny_animatediff,
        {
            "license": "apache-2.0",
            "pipeline_tag": "text-to-video",
            "genserve": {"default_frames": 8, "default_fps": 8, "default_steps": 2, "default_cfg_scale": 7.5},
        },
    ),
    "animatediff_sdxl": (
        _tiny_animatediff_sdxl,
        {
            "license": "apache-2.0",
            "pipeline_tag": "text-to-video",
            "genserve": {"default_frames": 8, "default_fps": 8, "default_steps": 2},
        },
    ),
    "motion_adapter": (
        _tiny_motion_adapter,
        {
            "license": "apache-2.0",
            "pipeline_tag": "text-to-video",
            "genserve": {
                "family": "animatediff",
                "native_size": 64,
                "default_frames": 8,
                "default_fps": 8,
                "default_steps": 2,
                "default_cfg_scale": 4.0,
                "default_sampler": "euler",
            },
        },
    ),
}


def _write_card(card: Path, kind: str, front: dict[str, Any]) -> None:
    front = {"library_name": "diffusers", **front, "tags": _SHARED_TAGS}
    body = (
        f"# tiny {kind}\n\nA tiny random-weight `{kind}` video model written by "
        "genserve.engine.models.video_fixtures for tests. Its output is noise.\n"
    )
    card.write_text(f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n{body}")

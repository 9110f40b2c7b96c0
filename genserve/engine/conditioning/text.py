"""Text conditioning: each request's prompts encoded as it would be alone, repeated per image (row).

SD1.5 and SDXL prompts may carry A1111 weights, `BREAK` and more tokens than one CLIP window
(`weighting.py`); such a request's prompt and negative prompt are padded to each other with
empty-prompt chunks (as A1111 does). Rows of a batch whose sequences still differ in length are
padded the same way and carry an attention mask that hides the padding from cross-attention, so
each row sees exactly the tokens it would see alone. SD3 prompts are encoded as they are (its T5
and CLIP windows are not weighted yet).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline

from genserve.engine.conditioning.weighting import (
    chunk_tokens,
    emphasize,
    is_plain,
    pad_to_length,
    parse_weights,
)
from genserve.engine.models.registry import Family
from genserve.schemas.generation import GenerationParams


@dataclass
class Conditioning:
    """Per-row text conditioning; every tensor's first dimension is the row."""

    cond: torch.Tensor
    uncond: torch.Tensor
    pooled: torch.Tensor | None = None  # SDXL text_embeds / SD3 pooled_projections
    uncond_pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None  # SDXL micro-conditioning
    # An SDXL refiner's unconditional time ids carry another aesthetic score; None: the same as time_ids
    uncond_time_ids: torch.Tensor | None = None
    # (rows, tokens) True where a token is the row's own, False where a batch padded it; None: no padding
    mask: torch.Tensor | None = None

    def select(self, keep: torch.Tensor) -> Conditioning:
        pick = lambda tensor: None if tensor is None else tensor.index_select(0, keep)  # noqa: E731
        return Conditioning(*(pick(getattr(self, name)) for name in self.__dataclass_fields__))


def encode_conditioning(
    pipe: DiffusionPipeline, family: Family, params: list[GenerationParams], device: str
) -> Conditioning:
    """Phase 1: each request encoded on its own (as it would be alone), repeated per image."""
    parts = []
    for p in params:
        negative = p.negative_prompt or None
        common = {
            "device": device,
            "num_images_per_prompt": p.num_images,
            "do_classifier_free_guidance": True,
        }
        if family in ("sd15", "sdxl") and (weighted := encode_weighted(pipe, family, p, device)) is not None:
            cond, uncond, pooled, uncond_pooled = weighted
            if family == "sd15":
                cond, uncond = pipe.encode_prompt(
                    None, prompt_embeds=cond, negative_prompt_embeds=uncond, **common
                )
                parts.append((cond, uncond, None, None))
            else:
                parts.append(
                    pipe.encode_prompt(
                        None,
                        prompt_embeds=cond,
                        negative_prompt_embeds=uncond,
                        pooled_prompt_embeds=pooled,
                        negative_pooled_prompt_embeds=uncond_pooled,
                        **common,
                    )
                )
        elif family == "sd15":
            cond, uncond = pipe.encode_prompt(p.prompt, negative_prompt=negative, **common)
            parts.append((cond, uncond, None, None))
        elif family == "sdxl":
            cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
                p.prompt, negative_prompt=negative, **common
            )
            parts.append((cond, uncond, pooled, uncond_pooled))
        else:
            cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
                p.prompt, None, None, negative_prompt=negative, **common
            )
            parts.append((cond, uncond, pooled, uncond_pooled))
    parts, mask = _pad_rows(pipe, family, parts, device)
    columns = list(zip(*parts, strict=True))
    cat = lambda tensors: None if tensors[0] is None else torch.cat(tensors)  # noqa: E731
    conditioning = Conditioning(cat(columns[0]), cat(columns[1]), cat(columns[2]), cat(columns[3]))
    conditioning.mask = mask
    rows = len(conditioning.cond)
    if family == "sdxl" and is_refiner(pipe):
        cond_ids, uncond_ids = refiner_time_ids(pipe, params[0], conditioning.cond.dtype, conditioning.pooled)
        conditioning.time_ids = cond_ids.to(device).repeat(rows, 1)
        conditioning.uncond_time_ids = uncond_ids.to(device).repeat(rows, 1)
    elif family == "sdxl":
        conditioning.time_ids = sdxl_time_ids(pipe, params[0], conditioning.cond.dtype, conditioning.pooled)
        conditioning.time_ids = conditioning.time_ids.to(device).repeat(rows, 1)
    return conditioning


def sdxl_time_ids(
    pipe: DiffusionPipeline, params: GenerationParams, dtype: torch.dtype, pooled: torch.Tensor
) -> torch.Tensor:
    """SDXL's size micro-conditioning: original = target = requested size, no crop."""
    size = (params.height, params.width)
    projection_dim = (
        int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
    )
    return pipe._get_add_time_ids(size, (0, 0), size, dtype=dtype, text_encoder_projection_dim=projection_dim)


# The aesthetic scores diffusers' SDXL img2img pipeline conditions a refiner on by default.
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5


def is_refiner(pipe: DiffusionPipeline) -> bool:
    """An SDXL refiner pipeline: its time ids carry an aesthetic score instead of the target size."""
    return bool(pipe.config.get("requires_aesthetics_score", False))


def refiner_time_ids(
    pipe: DiffusionPipeline, params: GenerationParams, dtype: torch.dtype, pooled: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(conditional, unconditional) refiner time ids: original size and crop, then the aesthetic
    score, 6.0 for the prompt and 2.5 for the negative (they differ, unlike the base's)."""
    size = (params.height, params.width)
    return pipe._get_add_time_ids(
        size,
        (0, 0),
        size,
        AESTHETIC_SCORE,
        NEGATIVE_AESTHETIC_SCORE,
        size,
        (0, 0),
        size,
        dtype=dtype,
        text_encoder_projection_dim=int(pooled.shape[-1]),
    )


# Weighted and long prompts (SD1.5, SDXL)

Encoded = tuple[torch.Tensor, torch.Tensor | None]  # (1, tokens, width) embeddings, pooled (SDXL)


def encode_weighted(
    pipe: DiffusionPipeline, family: Family, params: GenerationParams, device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
    """(cond, uncond, pooled, uncond_pooled) of a request whose prompt or negative prompt has weights,
    BREAK or more than one window; None when both are plain (diffusers' own encoding is used).

    Cond and uncond are padded to each other with empty-prompt chunks. An SDXL model that zeroes an
    empty negative prompt (force_zeros_for_empty_prompt) gets zeros here too, as in diffusers.
    """
    prompts = (params.prompt, params.negative_prompt)
    chunked = [_chunks(pipe, family, text) for text in prompts]
    unchanged = all("".join(f.text for f in parse_weights(text)) == text for text in prompts)
    if unchanged and all(is_plain(chunks[0]) for chunks in chunked):
        return None  # no syntax, one window: diffusers' own encoding is the same
    cond, pooled = _encode_chunks(pipe, family, chunked[0], device)
    if family == "sdxl" and not params.negative_prompt and pipe.config.get("force_zeros_for_empty_prompt"):
        uncond, uncond_pooled = torch.zeros_like(cond), None if pooled is None else torch.zeros_like(pooled)
    else:
        uncond, uncond_pooled = _encode_chunks(pipe, family, chunked[1], device)
    length = max(cond.shape[1], uncond.shape[1])
    empty = empty_chunk(pipe, family, device)
    return pad_to_length(cond, length, empty), pad_to_length(uncond, length, empty), pooled, uncond_pooled


def empty_chunk(pipe: DiffusionPipeline, family: Family, device: str) -> torch.Tensor:
    """The empty prompt's encoding, one window long: what shorter sequences are padded with."""
    return _encode_chunks(pipe, family, _chunks(pipe, family, ""), device)[0]


def _text_models(pipe: DiffusionPipeline, family: Family) -> list[tuple]:
    if family == "sd15":
        return [(pipe.tokenizer, pipe.text_encoder)]
    pairs = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
    return [(tokenizer, encoder) for tokenizer, encoder in pairs if encoder is not None]


def _chunks(pipe: DiffusionPipeline, family: Family, text: str) -> list:
    fragments = parse_weights(text)
    chunked = []
    for tokenizer, _ in _text_models(pipe, family):
        chunked.append(
            chunk_tokens(
                fragments,
                lambda part, tokenizer=tokenizer: tokenizer(part, add_special_tokens=False).input_ids,
                tokenizer.model_max_length,
                tokenizer.bos_token_id,
                tokenizer.eos_token_id,
                tokenizer.pad_token_id,
            )
        )
    if len({len(chunks.ids) for chunks in chunked}) > 1:
        raise ValueError("the SDXL tokenizers cut this prompt into different numbers of chunks")
    return chunked


def _encode_chunks(pipe: DiffusionPipeline, family: Family, chunked: list, device: str) -> Encoded:
    """Each chunk encoded as diffusers encodes one prompt, emphasised, then concatenated along the
    sequence; SDXL's pooled output comes from the first chunk (as A1111's)."""
    models = _text_models(pipe, family)
    embeds, pooled = [], None
    for index in range(len(chunked[0].ids)):
        hidden = []
        for (_, encoder), chunks in zip(models, chunked, strict=True):
            ids = torch.tensor([chunks.ids[index]], device=device)
            if family == "sd15":  # CLIP text encoders of SD1.x/2.x use no attention mask
                hidden.append(encoder(ids)[0])
            else:
                out = encoder(ids, output_hidden_states=True)
                if index == 0 and out[0].ndim == 2:
                    pooled = out[0]
                hidden.append(out.hidden_states[-2])
        z = torch.cat(hidden, dim=-1) if len(hidden) > 1 else hidden[0]
        weights = torch.tensor(chunked[0].weights[index], device=z.device)
        embeds.append(emphasize(z, weights))  # bitwise z where every weight is 1
    return (torch.cat(embeds, dim=1) if len(embeds) > 1 else embeds[0]), pooled


def _pad_rows(
    pipe: DiffusionPipeline, family: Family, parts: list, device: str
) -> tuple[list, torch.Tensor | None]:
    """Requests whose sequences differ in length padded to the longest with empty-prompt chunks, and
    the mask (per row) that hides the padding from cross-attention."""
    lengths = [part[0].shape[1] for part in parts]
    if len(set(lengths)) == 1 or family == "sd3":
        return parts, None
    longest, empty = max(lengths), empty_chunk(pipe, family, device)
    padded, masks = [], []
    for part, length in zip(parts, lengths, strict=True):
        cond, uncond, *rest = part
        padded.append((pad_to_length(cond, longest, empty), pad_to_length(uncond, longest, empty), *rest))
        mask = torch.zeros(cond.shape[0], longest, dtype=torch.bool, device=cond.device)
        mask[:, :length] = True
        masks.append(mask)
    return padded, torch.cat(masks)

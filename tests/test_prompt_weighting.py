"""Prompt weighting in A1111 syntax and long prompts (issue 18): the parser, chunking, A1111's
emphasis on tiny tensors, bitwise equality at weight 1, and weighted/long rows in shared batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from genserve.engine.conditioning.text import encode_conditioning, encode_weighted
from genserve.engine.conditioning.weighting import (
    Fragment,
    chunk_tokens,
    emphasize,
    pad_to_length,
    parse_weights,
)
from genserve.engine.engine import Engine
from genserve.engine.loop.denoise import BatchItem
from genserve.engine.models.registry import scan_models
from genserve.schemas.generation import GenerationParams

# 1. The parser


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("((word))", [("word", 1.21)]),
        ("[word]", [("word", 1 / 1.1)]),
        ("a (word:1.5) b", [("a ", 1.0), ("word", 1.5), (" b", 1.0)]),
        ("(a (b:2))", [("a ", 1.1), ("b", 2.2)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        ("stray) close]", [("stray close", 1.0)]),
        ("ratio 16:9 (x:0.5)", [("ratio 16:9 ", 1.0), ("x", 0.5)]),
        ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("", [("", 1.0)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.573),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641),
                (".", 1.1),
            ],
        ),  # fmt: skip
    ],
)
def test_a1111_attention_syntax(prompt: str, expected: list[tuple[str, float]]) -> None:
    got = [(f.text, f.weight) for f in parse_weights(prompt)]
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


# 2. Chunks


def words(text: str) -> list[int]:
    return [int(w) for w in text.split()]


def test_chunks_hold_window_minus_two_tokens_framed_by_bos_eos_and_padding() -> None:
    fragments = [Fragment("1 2 3", 1.0), Fragment("4 5", 2.0)]
    chunks = chunk_tokens(fragments, words, window=5, bos=90, eos=91, pad=0)
    assert chunks.ids == [[90, 1, 2, 3, 91], [90, 4, 5, 91, 0]]
    assert chunks.weights == [[1, 1, 1, 1, 1], [1, 2, 2, 1, 1]]


def test_break_starts_a_new_chunk_and_an_empty_prompt_is_one_chunk() -> None:
    chunks = chunk_tokens(parse_weights("1 BREAK 2"), words, window=5, bos=90, eos=91, pad=0)
    assert chunks.ids == [[90, 1, 91, 0, 0], [90, 2, 91, 0, 0]]
    assert chunk_tokens(parse_weights(""), words, 5, 90, 91, 0).ids == [[90, 91, 0, 0, 0]]


# 3. Emphasis (A1111 "Original"): z*w, then back to the original mean


def test_emphasis_scales_tokens_and_restores_the_mean() -> None:
    z = torch.arange(1.0, 13.0).reshape(1, 3, 4)
    w = torch.tensor([1.0, 2.0, 0.5])
    out = emphasize(z, w)
    assert out.mean().item() == pytest.approx(z.mean().item())
    ratio = z.mean() / (z * w.reshape(3, 1)).mean()
    assert torch.allclose(out, z * w.reshape(1, 3, 1) * ratio)
    assert torch.equal(emphasize(z, torch.ones(3)), z)  # bitwise at weight 1


def test_padding_appends_empty_chunks() -> None:
    empty = torch.full((1, 2, 3), 7.0)
    padded = pad_to_length(torch.zeros(2, 2, 3), 6, empty)
    assert padded.shape == (2, 6, 3) and (padded[:, 2:] == 7).all() and (padded[:, :2] == 0).all()
    with pytest.raises(ValueError):
        pad_to_length(torch.zeros(1, 2, 3), 5, empty)


# 4. Through the encoders of the tiny models


@pytest.fixture(scope="module")
def engine(tiny_models_dir: Path) -> Engine:
    return Engine(scan_models(tiny_models_dir), device="cpu", dtype="float32")


def params(prompt: str, model: str = "tiny-sd15", **kwargs: object) -> GenerationParams:
    base = dict(model=model, seed=3, steps=4, width=64, height=64, cfg_scale=5.0)
    return GenerationParams(prompt=prompt, **{**base, **kwargs})


LONG = ", ".join(["a red circle on a blue square"] * 4)  # 95 tokens of the tiny vocabulary: two chunks


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_weight_one_in_one_chunk_is_bitwise_the_unweighted_encoding(engine: Engine, family: str) -> None:
    pipe = engine.pipeline(f"tiny-{family}")
    plain = encode_conditioning(pipe, family, [params("a red circle", f"tiny-{family}")], "cpu")
    with torch.inference_mode():
        weighted = encode_conditioning(pipe, family, [params("a (red:1.0) circle", f"tiny-{family}")], "cpu")
        # the weighted path itself (forced), on the plain prompt
        from genserve.engine.conditioning import text

        cond, pooled = text._encode_chunks(pipe, family, text._chunks(pipe, family, "a red circle"), "cpu")
    assert torch.equal(weighted.cond, plain.cond) and torch.equal(weighted.uncond, plain.uncond)
    assert torch.equal(cond, plain.cond)
    if family == "sdxl":
        assert torch.equal(pooled, plain.pooled) and torch.equal(weighted.pooled, plain.pooled)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_a_weight_changes_only_its_tokens_before_the_mean_fix(engine: Engine, family: str) -> None:
    pipe = engine.pipeline(f"tiny-{family}")
    with torch.inference_mode():
        plain = encode_conditioning(pipe, family, [params("a red circle", f"tiny-{family}")], "cpu").cond
        heavy = encode_weighted(pipe, family, params("a (red:1.5) circle", f"tiny-{family}"), "cpu")
    assert heavy is not None
    per_token = (heavy[0] * plain).sum(-1) / (plain * plain).sum(-1)  # heavy = c·w·plain, token by token
    tokens = lambda text: len(pipe.tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    start = 1 + tokens("a")  # after BOS and "a": the tokens of "red"
    expected = torch.ones_like(per_token[0])
    expected[start : start + tokens("red")] = 1.5
    assert torch.allclose(per_token[0] / per_token[0, 0], expected, rtol=1e-4)  # one mean fix c for all


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_long_prompts_are_chunks_of_the_window_along_the_sequence(engine: Engine, family: str) -> None:
    pipe = engine.pipeline(f"tiny-{family}")
    with torch.inference_mode():
        cond = encode_conditioning(
            pipe, family, [params(LONG, f"tiny-{family}", negative_prompt="blurry")], "cpu"
        )
        broken = encode_conditioning(pipe, family, [params("a red BREAK circle", f"tiny-{family}")], "cpu")
    assert 75 < len(pipe.tokenizer(LONG, add_special_tokens=False).input_ids) <= 150
    assert cond.cond.shape[1] == 2 * 77 and cond.uncond.shape == cond.cond.shape  # uncond padded to cond
    assert broken.cond.shape[1] == 2 * 77


def pixels(image: PIL.Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_weighted_and_long_rows_share_a_batch_and_each_equals_itself_alone(
    engine: Engine, family: str
) -> None:
    model = f"tiny-{family}"
    items = [
        BatchItem(params("a red circle", model, seed=1)),
        BatchItem(params("a (red:1.4) [circle]", model, seed=2)),
        BatchItem(params(LONG, model, seed=3)),
    ]
    outcomes = engine.generate_batch(items)
    for item, outcome in zip(items, outcomes, strict=True):
        [alone] = engine.generate(item.params)
        assert np.abs(pixels(outcome.images[0]) - pixels(alone)).max() <= 1
    [unweighted] = engine.generate(params("a red circle", model, seed=2))
    assert np.abs(pixels(outcomes[1].images[0]) - pixels(unweighted)).max() > 0  # the weights did something


def test_the_shapes_tokenizer_chunks_at_its_own_window() -> None:
    """genserve-shapes' word-level tokenizer has model_max_length 24: chunks of 22 words."""
    from transformers import AutoTokenizer

    folder = Path(__file__).resolve().parents[1] / "genserve" / "builtin_models" / "genserve-shapes"
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    prompt = " ".join(["red"] * 30)
    chunks = chunk_tokens(
        parse_weights(prompt),
        lambda t: tokenizer(t, add_special_tokens=False).input_ids,
        tokenizer.model_max_length,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert [len(ids) for ids in chunks.ids] == [24, 24]
    assert chunks.ids[1][1:9] == [tokenizer.convert_tokens_to_ids("red")] * 8
    single = chunk_tokens(parse_weights("a red circle"), lambda t: tokenizer(t, add_special_tokens=False).input_ids,
                          24, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)  # fmt: skip
    assert single.ids == [tokenizer("a red circle", padding="max_length", max_length=24).input_ids]

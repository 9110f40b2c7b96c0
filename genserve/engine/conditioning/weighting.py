"""Prompt weighting in AUTOMATIC1111's syntax, and prompts longer than one CLIP window.

Pure functions on strings, token ids and small tensors (k-diffusion style); `text.py` runs the
encoders. Written from A1111's documented behaviour (wiki "Features: Attention/emphasis",
"Infinite prompt length", "BREAK"), not from its code:

- `(text)` multiplies the attention to `text` by 1.1, `((text))` by 1.1², `[text]` divides by 1.1,
  `(text:1.3)` multiplies by 1.3; brackets nest and multiply. `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are
  literal characters. A bracket left open applies to the end of the prompt; a closing bracket
  without an opening one is ignored. A `:` not followed by a number and `)` is plain text.
- `BREAK` (upper case, a word of its own) ends the current chunk: the rest starts a new one.
- A prompt is cut into chunks of `model_max_length - 2` tokens (75 for CLIP; 22 for genserve-shapes'
  word-level tokenizer), each encoded on its own as `[BOS] tokens [EOS] pad…`; the chunks'
  embeddings are concatenated along the sequence axis (77·n tokens for CLIP).
- Weights multiply each token's embedding, then the chunk is rescaled to its original mean
  (A1111's "Original" emphasis, `modules/sd_emphasis.py`): z ← z·w; z ← z · mean(z₀)/mean(z·w).
  A1111 takes both means over a batch of prompts; here they are per prompt and chunk (A1111 at
  batch size 1). Its option of moving words after the last comma to the next chunk ("comma padding
  backtrack") is not reproduced: chunks split at exactly `model_max_length - 2` tokens.

With every weight 1.0 and one chunk, the result is bitwise the unweighted encoding (z·1 = z and the
mean ratio is exactly 1).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

ROUND = 1.1  # (text)
SQUARE = 1 / 1.1  # [text]
BREAK = "BREAK"

# One token of the syntax: an escape, a bracket, a ":number)" closing, plain text, or a lone ':'.
_SYNTAX = re.compile(
    r"""
    \\[()\[\]\\]               # escaped bracket or backslash
    | \\                       # a lone backslash: literal
    | [(\[]                    # opening brackets
    | :\s*([+-]?[.\d]+)\s*\)   # ":1.3)" closes a round bracket with an explicit weight
    | [)\]]                    # closing brackets
    | [^\\()\[\]:]+            # plain text
    | :                        # a colon that is not a weight
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


@dataclass(frozen=True)
class Fragment:
    text: str
    weight: float  # 1.0 plain; BREAK fragments have weight -1 and text "BREAK"

    @property
    def is_break(self) -> bool:
        return self.weight == -1 and self.text == BREAK


def parse_weights(prompt: str) -> list[Fragment]:
    """The prompt as (text, weight) fragments, neighbours of equal weight merged.

    >>> parse_weights("an (important) word")
    [Fragment(text='an ', weight=1.0), Fragment(text='important', weight=1.1), Fragment(text=' word', weight=1.0)]
    """
    texts: list[str] = []
    weights: list[float] = []
    open_round: list[int] = []  # index into texts where each open bracket started
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for i in range(start, len(weights)):
            if weights[i] != -1:
                weights[i] *= factor

    for match in _SYNTAX.finditer(prompt):
        token, explicit = match.group(0), match.group(1)
        if token.startswith("\\") and len(token) == 2:
            texts.append(token[1])
            weights.append(1.0)
        elif token == "(":
            open_round.append(len(texts))
        elif token == "[":
            open_square.append(len(texts))
        elif explicit is not None and open_round:
            scale(open_round.pop(), _number(explicit))
        elif token == ")" and open_round:
            scale(open_round.pop(), ROUND)
        elif token == "]" and open_square:
            scale(open_square.pop(), SQUARE)
        elif token in (")", "]"):
            continue  # nothing open to close
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i > 0:
                    texts.append(BREAK)
                    weights.append(-1.0)
                texts.append(part)
                weights.append(1.0)
    for start in open_round:  # left open: to the end
        scale(start, ROUND)
    for start in open_square:
        scale(start, SQUARE)
    return _merged(texts, weights)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 1.0


def _merged(texts: list[str], weights: list[float]) -> list[Fragment]:
    fragments: list[Fragment] = []
    for text, weight in zip(texts, weights, strict=True):
        if weight != -1 and not text:
            continue
        if fragments and weight != -1 and fragments[-1].weight == weight:
            fragments[-1] = Fragment(fragments[-1].text + text, weight)
        else:
            fragments.append(Fragment(text, weight))
    return fragments or [Fragment("", 1.0)]


@dataclass(frozen=True)
class Chunks:
    """Token ids and weights per chunk, each `[BOS] tokens [EOS] pad…` of the window's length."""

    ids: list[list[int]]
    weights: list[list[float]]


def chunk_tokens(
    fragments: list[Fragment],
    tokenize: Callable[[str], list[int]],
    window: int,
    bos: int,
    eos: int,
    pad: int,
) -> Chunks:
    """Fragments tokenized (without special tokens) and cut into chunks of `window - 2` tokens.

    A BREAK ends the current chunk; an empty prompt is one chunk of `[BOS] [EOS] pad…`.
    """
    size = window - 2
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []

    def close() -> None:
        chunks.append((ids.copy(), weights.copy()))
        ids.clear()
        weights.clear()

    for fragment in fragments:
        if fragment.is_break:
            close()
            continue
        for token in tokenize(fragment.text):
            if len(ids) == size:
                close()
            ids.append(token)
            weights.append(fragment.weight)
    if ids or not chunks:
        close()
    framed = Chunks([], [])
    for chunk_ids, chunk_weights in chunks:
        padding = size - len(chunk_ids)
        framed.ids.append([bos, *chunk_ids, eos] + [pad] * padding)
        framed.weights.append([1.0, *chunk_weights, 1.0] + [1.0] * padding)
    return framed


def is_plain(chunks: Chunks) -> bool:
    """One chunk, every weight 1: the unweighted encoding is the same."""
    return len(chunks.ids) == 1 and all(w == 1.0 for w in chunks.weights[0])


def emphasize(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis on one chunk: z·w, rescaled to z's original mean.

    `z` is (B, T, D) token embeddings, `weights` (B, T) or (T,). Weights 1 return z bitwise. An
    embedding whose mean is 0 (a final LayerNorm without bias, as in the tiny test encoders) is
    left unrescaled: the rescale would divide by zero or zero everything.
    """
    original_mean = z.mean()
    weighted = z * weights.to(z.dtype).reshape(*weights.shape, 1)
    new_mean = weighted.mean()
    if new_mean == 0 or original_mean == 0:
        return weighted
    return weighted * (original_mean / new_mean)


def pad_to_length(embeds: torch.Tensor, length: int, empty: torch.Tensor) -> torch.Tensor:
    """(B, T, D) embeddings extended to `length` tokens with chunks of the empty prompt's encoding
    (`empty`: (1, W, D)), as A1111 pads cond and uncond of different lengths to each other."""
    missing = length - embeds.shape[1]
    if missing <= 0:
        return embeds
    window = empty.shape[1]
    if missing % window:
        raise ValueError(f"cannot pad {embeds.shape[1]} tokens to {length} with chunks of {window}")
    filler = empty.to(embeds.dtype).expand(embeds.shape[0], -1, -1).repeat(1, missing // window, 1)
    return torch.cat([embeds, filler], dim=1)

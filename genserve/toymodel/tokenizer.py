"""A word-level tokenizer for the shapes grammar, loadable by transformers like any other tokenizer.

It is a `PreTrainedTokenizerFast` around a `tokenizers` WordLevel model, so diffusers loads it from
the pipeline folder through `model_index.json` with no custom code. Text is lower-cased and split
on whitespace and punctuation; a word outside the vocabulary becomes `[UNK]` (never an error).
Every prompt is wrapped as `[BOS] words... [EOS]` and padded with `[PAD]`, like CLIP's layout.
"""

from __future__ import annotations

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
MAX_LENGTH = 24  # longest grammar caption is ~16 words; longer prompts are truncated


def build_tokenizer(words: list[str], max_length: int = MAX_LENGTH) -> PreTrainedTokenizerFast:
    """A tokenizer whose ids are: the special tokens first, then `words` in the given order."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]",
        special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        model_max_length=max_length,
        padding_side="right",
        truncation_side="right",
    )

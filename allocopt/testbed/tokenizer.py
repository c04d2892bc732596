"""Train the testbed's byte-level BPE tokenizer and wrap it as a ``PreTrainedTokenizerFast``.

Digits are split one per token before BPE runs, so ``37+45=82`` is learnt digit by digit (arithmetic that a tiny
model can pick up); byte-level pre-tokenization means any input string encodes, with no unknown token.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from allocopt.testbed import corpus

EOS = "<|endoftext|>"
PAD = "<|pad|>"
VOCAB_SIZE = 2048


def _training_texts() -> Iterator[str]:
    yield from (d.text for d in corpus.documents("code", "train"))
    yield from (d.text for d in corpus.documents("prose", "train"))
    rng = random.Random("testbed-tokenizer")
    yield from (corpus.math_worksheet(rng, "train").text for _ in range(200))


def train_tokenizer(vocab_size: int = VOCAB_SIZE, texts: Iterator[str] | None = None) -> PreTrainedTokenizerFast:
    """Deterministic for a fixed corpus (BPE merges are ranked by count, ties broken by the trainer's order).
    ``texts``: what to learn the merges from (default: the first testbed's training texts)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_training_texts() if texts is None else texts, trainer=trainer)
    return _wrap(tok)


def tokenizer_from_json(text: str) -> PreTrainedTokenizerFast:
    """The tokenizer a training state saved (``Tokenizer.to_str()``): a resumed run keeps the vocabulary its weights
    were trained with even where this machine's texts would train different merges."""
    return _wrap(Tokenizer.from_str(text))


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=EOS,
                                   model_max_length=1024)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out: str | Path) -> None:
    """Writes tokenizer.json + tokenizer_config.json, which ``AutoTokenizer.from_pretrained`` reads."""
    tokenizer.save_pretrained(str(out))

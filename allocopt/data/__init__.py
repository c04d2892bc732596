"""Text data for calibration, search and evaluation, addressed by one spec string.

Specs: ``testbed:code|prose|math|mix`` (the shipped corpus), ``PATH.txt`` (one token stream),
``PATH.jsonl`` (documents or prompt/response pairs), or a local Hugging Face dataset directory.

    tokens = load_tokens("testbed:mix", tokenizer, seq_len=256, num_seqs=16, split="search")
"""
from allocopt.data.tokens import TokenSet, load_tokens

__all__ = ["TokenSet", "load_tokens"]

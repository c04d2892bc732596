"""Text data for calibration, search and evaluation, addressed by one spec string.

Specs: ``testbed:code|prose|math|mix`` (the shipped corpus), ``PATH.txt`` (one token stream),
``PATH.jsonl`` (documents, prompt/response pairs or chats), or a local Hugging Face dataset directory.
Chats (``messages``) are rendered with the tokenizer's chat template and every assistant turn is scored; a
tokenizer without a chat template gets ``role: content`` lines instead (see ``tokens.chat_tokens``).
A dataset directory without ``calibration``/``search`` splits gives calibration and search disjoint halves of
all its rows (see ``tokens.dataset_rows``).

    tokens = load_tokens("testbed:mix", tokenizer, seq_len=256, num_seqs=16, split="search")
"""
from allocopt.data.tokens import TokenSet, load_tokens

__all__ = ["TokenSet", "load_tokens"]

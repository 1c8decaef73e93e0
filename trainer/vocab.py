"""The GPT-2 vocabulary as byte strings, for the parts of training that look inside tokens: the prefix-token loss
(record-88, 2026-07-13: an auxiliary target, for next token T the longest proper byte prefix of T that is itself
a token).

The vocabulary comes from tiktoken's "gpt2" encoding (its cache: TIKTOKEN_CACHE_DIR, which `speedrun prefetch`
fills for offline nodes) or from a local file: an r50k_base.tiktoken, or a folder with GPT-2's vocab.bpe and
encoder.json. `speedrun data prepare --encoding-file` reads the same files through load_ranks.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

OFFLINE_HINT = ("set vocab_file to a local r50k_base.tiktoken or a folder with vocab.bpe and encoder.json, or point "
                "TIKTOKEN_CACHE_DIR at a tiktoken cache that has gpt2 (`speedrun prefetch` fills one)")


def load_ranks(path: str | Path) -> dict[bytes, int]:
    """Token bytes -> id from an r50k_base.tiktoken file or a vocab.bpe + encoder.json folder; OSError or
    ValueError (tiktoken's own) on a missing or malformed one."""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks, load_tiktoken_bpe

    path = Path(path).expanduser()
    if path.is_dir():
        return data_gym_to_mergeable_bpe_ranks(str(path / "vocab.bpe"), str(path / "encoder.json"))
    if path.is_file():
        return load_tiktoken_bpe(str(path))
    raise FileNotFoundError(f"{path}: no such file or folder")


def gpt2_ranks(vocab_file: str = "") -> dict[bytes, int]:
    """The GPT-2 BPE's ordinary tokens (no <|endoftext|>) as bytes -> id; ValueError naming vocab_file and what
    to do when they cannot be read (an offline node without tiktoken's cache, a bad file)."""
    try:
        if vocab_file:
            return load_ranks(vocab_file)
        import tiktoken

        enc = tiktoken.get_encoding("gpt2")
        special = {enc.encode_single_token(s) for s in enc.special_tokens_set}
        return {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab) if i not in special}
    except Exception as e:  # noqa: BLE001 - tiktoken surfaces a failed download as whatever requests raised
        where = vocab_file or "tiktoken's gpt2 encoding"
        raise ValueError(f"vocab_file: the GPT-2 vocabulary could not be read from {where} "
                         f"({type(e).__name__}); {OFFLINE_HINT}") from None


def prefix_table(ranks: dict[bytes, int], vocab_size: int) -> np.ndarray:
    """(vocab_size,) int64: for each token id, the id of the longest proper prefix of its bytes that is a token
    too, else -1 (single bytes, <|endoftext|>, ids past the vocabulary)."""
    table = np.full(vocab_size, -1, dtype=np.int64)
    for token, i in ranks.items():
        if i >= vocab_size:
            continue
        for cut in range(len(token) - 1, 0, -1):   # longest first
            j = ranks.get(token[:cut])
            if j is not None:
                table[i] = j
                break
    return table

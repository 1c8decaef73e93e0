"""The FineWeb shard format of the speedrun, implemented once: the trainer reads it, and the orchestrator's
staging, preparation and verification (orchestrator/data/shards.py) build on these functions.

A shard is a header of 256 little-endian int32 (magic 20240520, version 1, token count, then zeros)
followed by the tokens as little-endian uint16 (GPT-2 ids, < 50257).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
VOCAB_SIZE = 50257
BOS = 50256  # <|endoftext|>, which opens every document


class ShardError(ValueError):
    """A shard is missing or malformed; the message names the file and the cause."""


def shard_size(tokens: int) -> int:
    return HEADER_BYTES + 2 * tokens


def encode_header(tokens: int) -> bytes:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, tokens
    return header.tobytes()


def decode_header(raw: bytes, where: str) -> int:
    """Token count from the first 1024 bytes of a shard; ShardError naming `where` when they are not a header."""
    if len(raw) < HEADER_BYTES:
        raise ShardError(f"{where}: truncated header ({len(raw)} of {HEADER_BYTES} bytes); fetch or prepare it again")
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    if header[0] != MAGIC:
        raise ShardError(f"{where}: bad magic {int(header[0])} (expected {MAGIC}); this is not a FineWeb shard")
    if header[1] != VERSION:
        raise ShardError(f"{where}: unsupported shard version {int(header[1])} (expected {VERSION}); "
                         f"re-create the shard with version {VERSION}")
    if header[2] < 0:
        raise ShardError(f"{where}: negative token count {int(header[2])} in the header; the shard is corrupted")
    return int(header[2])


def read_header(path: str | os.PathLike, where: str | None = None, check_size: bool = True) -> int:
    """The token count of the shard at path, its header (and, with check_size, its length) checked."""
    where = where or str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise ShardError(f"{where}: no such shard at {path}") from None
    tokens = decode_header(raw, where)
    size = os.path.getsize(path)
    if check_size and size != shard_size(tokens):
        kind = "truncated" if size < shard_size(tokens) else "too long"
        raise ShardError(f"{where}: {kind}: {size} bytes but the header declares {tokens} tokens "
                         f"({shard_size(tokens)} bytes); re-stage it")
    return tokens


def load_tokens(path: str | os.PathLike) -> np.ndarray:
    """The shard's tokens as a read-only uint16 memory map (no copy of a 200 MB shard)."""
    tokens = read_header(path)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(tokens,))


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> tuple[int, int, str]:
    """Write tokens as a shard atomically (temporary name, fsync, rename); (tokens, bytes, sha256)."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= VOCAB_SIZE):
        raise ShardError(f"{path.name}: token ids must lie in [0, {VOCAB_SIZE}); got {tokens.min()}..{tokens.max()}")
    header = encode_header(int(tokens.size))
    body = tokens.astype("<u2", copy=False).tobytes()
    h = hashlib.sha256(header)
    h.update(body)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return int(tokens.size), len(header) + len(body), h.hexdigest()

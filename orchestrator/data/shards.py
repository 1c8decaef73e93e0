"""The FineWeb shard format of the speedrun, and the checks every staged or prepared shard passes.

A shard is a header of 256 little-endian int32 (magic 20240520, version 1, token count, then zeros)
followed by the tokens as little-endian uint16. Files are named fineweb_{train,val}_NNNNNN.bin.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
VOCAB_SIZE = 50257
BOS = 50256  # <|endoftext|>, which opens every document
SPLITS = ("train", "val")
SHARD_NAME_RE = re.compile(r"^fineweb_(train|val)_(\d{6})\.bin$")


class DataError(Exception):
    """One sentence naming the shard (or source) and the cause; the CLI prints it and exits non-zero."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    tokens: int
    size: int
    sha256: str | None = None


def shard_name(split: str, index: int) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    return f"fineweb_{split}_{index:06d}.bin"


def parse_shard_name(name: str) -> tuple[str, int] | None:
    """('train', 3) for fineweb_train_000003.bin; None for any other name."""
    m = SHARD_NAME_RE.match(name)
    return (m.group(1), int(m.group(2))) if m else None


def shard_size(tokens: int) -> int:
    return HEADER_BYTES + 2 * tokens


def encode_header(tokens: int) -> bytes:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, tokens
    return header.tobytes()


def decode_header(raw: bytes, name: str) -> int:
    """Token count from the first 1024 bytes of a shard; DataError when they are not a shard header."""
    if len(raw) < HEADER_BYTES:
        raise DataError(f"{name}: truncated header ({len(raw)} of {HEADER_BYTES} bytes); fetch or prepare it again")
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    if header[0] != MAGIC:
        raise DataError(f"{name}: bad magic {int(header[0])} (expected {MAGIC}); this is not a FineWeb shard")
    if header[1] != VERSION:
        raise DataError(f"{name}: unsupported shard version {int(header[1])} (expected {VERSION})")
    if header[2] < 0:
        raise DataError(f"{name}: negative token count {int(header[2])} in the header; the shard is corrupted")
    return int(header[2])


def read_header(path: str | os.PathLike, name: str | None = None) -> int:
    """Token count of the shard at path (`name`: its real name when path is a temporary file)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise DataError(f"{name or path.name}: no such shard at {path}") from None
    return decode_header(raw, name or path.name)


def file_sha256(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_shard(path: str | os.PathLike, sha256: str | None = None, name: str | None = None) -> ShardInfo:
    """Check header, size (1024 + 2 x tokens) and, when a digest is known, sha256; raise DataError on a mismatch.

    `name` is the shard's real name when path is a temporary file.
    """
    path = Path(path)
    name = name or path.name
    tokens = read_header(path, name)
    size = path.stat().st_size
    if size != shard_size(tokens):
        kind = "truncated" if size < shard_size(tokens) else "too long"
        raise DataError(f"{name}: {kind}: {size} bytes on disk, but its header promises {tokens} tokens "
                        f"({shard_size(tokens)} bytes)")
    digest = None
    if sha256 is not None:
        digest = file_sha256(path)
        if digest != sha256:
            raise DataError(f"{name}: corrupted: sha256 {digest[:12]}… does not match the expected {sha256[:12]}…")
    return ShardInfo(name=name, tokens=tokens, size=size, sha256=digest)


def read_tokens(path: str | os.PathLike) -> np.ndarray:
    """The tokens of a verified shard as a read-only uint16 memmap."""
    tokens = read_header(path)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(tokens,))


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> ShardInfo:
    """Write tokens as a shard atomically (temporary name, fsync, rename) and return its size and sha256."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= VOCAB_SIZE):
        raise DataError(f"{path.name}: token ids must lie in [0, {VOCAB_SIZE}); got {tokens.min()}..{tokens.max()}")
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
    return ShardInfo(name=path.name, tokens=int(tokens.size), size=len(header) + len(body), sha256=h.hexdigest())

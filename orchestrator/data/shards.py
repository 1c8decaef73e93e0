"""Shard names and the checks every staged or prepared shard passes, on the one implementation of the
shard format (trainer/shard_format.py), with its errors as DataError. Files are named
fineweb_{train,val}_NNNNNN.bin.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer import shard_format as fmt
from trainer.shard_format import (BOS, HEADER_BYTES, HEADER_INTS, MAGIC, VERSION, VOCAB_SIZE,  # noqa: F401
                                  encode_header, shard_size)

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


def decode_header(raw: bytes, name: str) -> int:
    """Token count from the first 1024 bytes of a shard; DataError when they are not a shard header."""
    try:
        return fmt.decode_header(raw, name)
    except fmt.ShardError as e:
        raise DataError(str(e)) from None


def read_header(path: str | os.PathLike, name: str | None = None) -> int:
    """Token count of the shard at path (`name`: its real name when path is a temporary file)."""
    try:
        return fmt.read_header(path, name or Path(path).name, check_size=False)
    except fmt.ShardError as e:
        raise DataError(str(e)) from None


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
    try:
        tokens = fmt.read_header(path, name)
    except fmt.ShardError as e:
        raise DataError(str(e)) from None
    digest = None
    if sha256 is not None:
        digest = file_sha256(path)
        if digest != sha256:
            raise DataError(f"{name}: corrupted: sha256 {digest[:12]}… does not match the expected {sha256[:12]}…")
    return ShardInfo(name=name, tokens=tokens, size=path.stat().st_size, sha256=digest)


def read_tokens(path: str | os.PathLike) -> np.ndarray:
    """The tokens of a verified shard as a read-only uint16 memmap."""
    tokens = read_header(path)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(tokens,))


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> ShardInfo:
    """Write tokens as a shard atomically (temporary name, fsync, rename) and return its size and sha256."""
    try:
        count, size, digest = fmt.write_shard(path, tokens)
    except fmt.ShardError as e:
        raise DataError(str(e)) from None
    return ShardInfo(name=Path(path).name, tokens=count, size=size, sha256=digest)

"""Tokenize parquet or jsonl documents into FineWeb shards (GPT-2 BPE via tiktoken), and verify a shard directory.

Every document becomes BOS + its tokens. The first documents go to validation (by default whole documents
until the record's 10,485,760-token validation budget is covered), the rest to train shards numbered
from 1, as on the hub. Encoding runs on all cores: tiktoken releases the GIL, so threads scale.
Shards are written into a hidden folder inside `out` and moved into place only when every input was
read, so a bad line half-way leaves nothing behind.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from orchestrator.data.shards import (BOS, VOCAB_SIZE, DataError, ShardInfo, parse_shard_name, read_tokens,
                                      shard_name, verify_shard, write_shard)
from orchestrator.data.stage import StageState

log = logging.getLogger(__name__)
VAL_TOKENS = 10_485_760  # the record's validation budget
BATCH_DOCS = 512
NO_NETWORK_HINT = ("pass --encoding-file with a local r50k_base.tiktoken (the same ranks as GPT-2) or a folder "
                   "holding vocab.bpe and encoder.json, or point TIKTOKEN_CACHE_DIR at a cache that has them")


@dataclass
class PrepareResult:
    out: Path
    train_files: list[Path]
    val_files: list[Path]
    documents: int
    tokens: int
    seconds: float


@dataclass
class ShardCheck:
    name: str
    ok: bool
    tokens: int | None = None
    size: int | None = None
    sha256: str | None = None
    error: str | None = None


# ------------------------------------------------------------------------------------ encoding


def load_encoding(encoding_file: str | os.PathLike | None = None):
    """The GPT-2 BPE: tiktoken's (downloaded once, then cached) or one from a local file or folder."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenizer regex

    from trainer.vocab import load_ranks

    if encoding_file is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken surfaces network failures as whatever requests raised
            raise DataError(f"tiktoken could not download the GPT-2 BPE ({type(e).__name__}); "
                            f"{NO_NETWORK_HINT}") from None
    path = Path(encoding_file).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such encoding file; {NO_NETWORK_HINT}")
    try:
        ranks = load_ranks(path)
    except (OSError, ValueError, KeyError, AssertionError) as e:
        raise DataError(f"{path}: not a tiktoken BPE file or a vocab.bpe/encoder.json folder ({e})") from None
    if not ranks or max(ranks.values()) >= BOS:
        raise DataError(f"{path}: token ranks must lie below {BOS}, the id of <|endoftext|>")
    return tiktoken.Encoding(name=f"gpt2:{path.name}", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": BOS})


def _encode_batch(enc, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """BOS + tokens for each document, concatenated, and each document's length."""
    docs = [enc.encode_ordinary(t) for t in texts]
    lengths = np.array([len(d) + 1 for d in docs], dtype=np.int64)
    out = np.empty(int(lengths.sum()), dtype=np.uint16)
    pos = 0
    for d in docs:
        out[pos] = BOS
        out[pos + 1: pos + 1 + len(d)] = d
        pos += len(d) + 1
    return out, lengths


# -------------------------------------------------------------------------------------- inputs


def _input_files(inputs: list[str | os.PathLike]) -> list[Path]:
    files: list[Path] = []
    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            found = sorted([*p.glob("*.parquet"), *p.glob("*.jsonl")])
            if not found:
                raise DataError(f"{p}: no *.parquet or *.jsonl files in this folder")
            files += found
        elif not p.is_file():
            raise DataError(f"{p}: no such input file; check the path")
        elif p.suffix not in (".parquet", ".jsonl"):
            raise DataError(f"{p}: unknown input format {p.suffix!r}; use .parquet or .jsonl files")
        else:
            files.append(p)
    if not files:
        raise DataError("no input files given; pass parquet or jsonl files with --input")
    return files


def _check_text_field(path: Path, text_field: str) -> None:
    """Fail before any work when a file lacks the text field."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(path).names
        except Exception as e:
            raise DataError(f"{path}: not a readable parquet file ({e})") from None
        if text_field not in names:
            raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(names)}); pass --text-field")


def _documents(path: Path, text_field: str) -> Iterator[list[str]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_DOCS, columns=[text_field]):
            yield [t for t in batch.column(0).to_pylist() if t is not None]
        return
    batch = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove the line") from None
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: no string field {text_field!r}; pass --text-field")
            batch.append(text)
            if len(batch) == BATCH_DOCS:
                yield batch
                batch = []
    if batch:
        yield batch


# ------------------------------------------------------------------------------------- writing


class _ShardWriter:
    """Fills shards of exactly shard_tokens tokens (the last one shorter); documents may span two shards."""

    def __init__(self, folder: Path, split: str, first_index: int, shard_tokens: int):
        self.folder, self.split, self.index = folder, split, first_index
        self.buf = np.empty(shard_tokens, dtype=np.uint16)
        self.fill = 0
        self.written: list[ShardInfo] = []

    def add(self, tokens: np.ndarray) -> None:
        while tokens.size:
            take = min(tokens.size, self.buf.size - self.fill)
            self.buf[self.fill: self.fill + take] = tokens[:take]
            self.fill += take
            tokens = tokens[take:]
            if self.fill == self.buf.size:
                self.flush()

    def flush(self) -> None:
        if self.fill:
            self.written.append(write_shard(self.folder / shard_name(self.split, self.index), self.buf[: self.fill]))
            self.index += 1
            self.fill = 0


def prepare_shards(inputs: list[str | os.PathLike], out: str | os.PathLike, encoding_file: str | None = None,
                   val_docs: int | None = None, shard_tokens: int = 100_000_000, workers: int | None = None,
                   text_field: str = "text", val_tokens: int = VAL_TOKENS) -> PrepareResult:
    """Tokenize documents into val shard(s) then train shards in `out`; DataError on any bad input."""
    t0 = time.perf_counter()
    files = _input_files(list(inputs))
    for f in files:
        _check_text_field(f, text_field)
    if shard_tokens < 1 or (val_docs is not None and val_docs < 0):
        raise DataError(f"shard_tokens must be >= 1 and val_docs >= 0 (got {shard_tokens}, {val_docs})")
    enc = load_encoding(encoding_file)
    out = Path(out).expanduser()
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        work = out / f".prepare.{os.getpid()}"
        work.mkdir()
    except OSError as e:
        raise DataError(f"{out}: cannot create the output folder ({e.strerror}); choose a writable --out") from None
    val = _ShardWriter(work, "val", 0, shard_tokens)
    train = _ShardWriter(work, "train", 1, shard_tokens)
    docs = val_count = val_filled = 0
    try:
        with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
            pending: deque = deque()
            batches = (b for f in files for b in _documents(f, text_field))
            for batch in batches:
                pending.append(pool.submit(_encode_batch, enc, batch))
                if len(pending) >= 4 * pool._max_workers:
                    docs, val_count, val_filled = _route(pending.popleft().result(), val, train, docs,
                                                         val_count, val_filled, val_docs, val_tokens)
            while pending:
                docs, val_count, val_filled = _route(pending.popleft().result(), val, train, docs,
                                                     val_count, val_filled, val_docs, val_tokens)
        val.flush()
        train.flush()
        if not train.written:
            raise DataError(f"the inputs hold only {docs} documents and all went to validation; "
                            "lower --val-docs or add input")
        state = StageState(out)
        source = "prepare:" + ",".join(str(f) for f in files)
        for info in val.written + train.written:
            target = out / info.name
            os.replace(work / info.name, target)
            st = target.stat()
            state.record(info.name, {"source": source, "size": info.size, "sha256": info.sha256,
                                     "tokens": info.tokens, "mtime_ns": st.st_mtime_ns, "staged_at": time.time()})
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    total = sum(i.tokens for i in val.written + train.written)
    log.info("prepared %d documents, %d tokens into %s", docs, total, out)
    return PrepareResult(out=out, train_files=[out / i.name for i in train.written],
                         val_files=[out / i.name for i in val.written], documents=docs, tokens=total,
                         seconds=time.perf_counter() - t0)


def _route(encoded, val, train, docs, val_count, val_filled, val_docs, val_tokens):
    """Send whole documents to validation until its quota is met, the rest to train."""
    tokens, lengths = encoded
    ends = np.cumsum(lengths)
    if val_docs is not None:
        n_val = max(0, min(len(lengths), val_docs - val_count))
    else:  # whole documents until val_tokens (+1 for the shifted targets) are covered
        need = val_tokens + 1 - val_filled
        n_val = 0 if need <= 0 else min(len(lengths), int(np.searchsorted(ends, need)) + 1)
    split = int(ends[n_val - 1]) if n_val else 0
    val.add(tokens[:split])
    train.add(tokens[split:])
    return docs + len(lengths), val_count + n_val, val_filled + split


# ------------------------------------------------------------------------------------ verifying


def verify_dir(path: str | os.PathLike, workers: int = 4) -> list[ShardCheck]:
    """Check every shard in a folder: header, size, token ids, and sha256 where a stage or prepare recorded one."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DataError(f"{path}: no such directory of shards; check the path")
    names = sorted(p.name for p in path.iterdir() if parse_shard_name(p.name))
    if not names:
        raise DataError(f"{path}: holds no fineweb_train_*.bin or fineweb_val_*.bin shards")
    recorded = StageState(path).load()

    def check(name: str) -> ShardCheck:
        try:
            info = verify_shard(path / name, sha256=(recorded.get(name) or {}).get("sha256"))
            tokens = read_tokens(path / name)
            if tokens.size and int(tokens.max()) >= VOCAB_SIZE:
                raise DataError(f"{name}: holds token id {int(tokens.max())}, outside the GPT-2 vocabulary")
            return ShardCheck(name, True, info.tokens, info.size, info.sha256)
        except DataError as e:
            return ShardCheck(name, False, error=str(e))

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(check, names))

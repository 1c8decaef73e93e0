"""Shard reader and batches: FineWeb-format shards, BOS-aligned training micro-batches, fixed validation.

Shard format: 256 little-endian int32 (magic 20240520, version 1, token count), then uint16 tokens.
Every rank walks the same global stream of micro-batches and keeps the ones it owns, so 1, 2, 4 or 8
ranks see exactly the same tokens in every optimizer step.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import numpy as np

# the format itself lives in trainer/shard_format.py (the orchestrator's staging uses the same code)
from trainer.shard_format import BOS, ShardError, load_tokens, read_header, write_shard  # noqa: F401


def find_shards(data_dir: str, pattern: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(data_dir, pattern)))
    if not files:
        raise ShardError(f"{data_dir}: no file matches {pattern!r}; stage the shards or fix train_files/val_files")
    return files


@dataclass
class LoaderState:
    shard: int = 0      # index into the sorted shard list
    cursor: int = 0     # next token position to search for a BOS from
    epoch: int = 0


class TrainBatches:
    """BOS-aligned micro-batches of seq_len+1 tokens (inputs and shifted targets).

    Micro-batch k of a step belongs to rank k % world. A micro-batch starts at a document start; the tail
    of the document that does not fit is skipped, so no sequence begins mid-document. With a document-length
    cap (doc_len_schedule, the record's train_max_seq_len) a micro-batch is documents' first `cap` tokens back to
    back: the rest of a longer document is skipped and the next document starts there.
    """

    def __init__(self, files: list[str], seq_len: int, rank: int, world: int, grad_accum_total: int):
        if grad_accum_total % world:
            raise ValueError(f"grad_accum_total={grad_accum_total} is not divisible by {world} ranks; "
                             "use 1, 2, 4 or 8 ranks or change grad_accum_total")
        self.files, self.seq_len, self.rank, self.world = files, seq_len, rank, world
        self.grad_accum_total = grad_accum_total
        self.state = LoaderState()
        self._tokens: np.ndarray | None = None
        self._bos: np.ndarray | None = None
        self._loaded = -1
        for f in files:
            if read_header(f) < seq_len + 1:
                raise ShardError(f"{f}: fewer tokens than seq_len+1={seq_len + 1}; lower seq_len or use bigger shards")

    def _load(self, i: int) -> None:
        if self._loaded != i:
            self._tokens = load_tokens(self.files[i])
            self._bos = np.flatnonzero(self._tokens == BOS)
            self._loaded = i

    def _next_shard(self) -> None:
        """This shard is used up: the next one from its start, the first again after the last (a new epoch)."""
        st = self.state
        st.shard, st.cursor = st.shard + 1, 0
        if st.shard == len(self.files):
            st.shard, st.epoch = 0, st.epoch + 1

    def _next_capped_sequence(self, length: int, cap: int) -> np.ndarray:
        """length+1 tokens from consecutive documents, each cut after `cap` tokens (its BOS included), the last
        cut where the micro-batch is full; a shard that runs out of documents part-way is left for the next."""
        need = length + 1
        for _ in range(2 * len(self.files) + 1):
            st = self.state
            self._load(st.shard)
            j = int(np.searchsorted(self._bos, st.cursor))
            pieces, have, cursor = [], 0, st.cursor
            while have < need and j < len(self._bos):
                start = int(self._bos[j])
                doc_end = int(self._bos[j + 1]) if j + 1 < len(self._bos) else len(self._tokens)
                end = min(doc_end, start + cap, start + need - have)
                pieces.append(self._tokens[start:end])
                have, cursor, j = have + end - start, end, j + 1
            if have == need:
                st.cursor = cursor   # the next micro-batch starts at the next document
                return np.concatenate(pieces)
            self._next_shard()
        raise ShardError(f"{self.files[0]}: not enough BOS-delimited documents for a micro-batch of {need} tokens")

    def _next_sequence(self, length: int) -> np.ndarray:
        n = length + 1
        for _ in range(2 * len(self.files) + 1):
            st = self.state
            self._load(st.shard)
            j = np.searchsorted(self._bos, st.cursor)
            if j < len(self._bos) and self._bos[j] + n <= len(self._tokens):
                start = int(self._bos[j])
                st.cursor = start + length   # as record-28: a BOS that is this one's last target starts the next
                return np.asarray(self._tokens[start:start + n])
            self._next_shard()
        raise ShardError(f"{self.files[0]}: no document start (token {BOS}) leaves room for {n} tokens; "
                         "the shards need BOS-delimited documents")

    def next_step(self, count: int | None = None, length: int | None = None, cap: int = 0) -> list[np.ndarray]:
        """This rank's micro-batches for the next optimizer step of `count` micro-batches over all ranks
        (grad_accum_total when None; a batch_schedule's phase count otherwise), each of `length` tokens (seq_len
        when None; a seq_len_schedule's otherwise), documents cut after `cap` tokens (0: whole): count / world of
        them. The stream advances by exactly count sequences, so the state after it is where the next step starts."""
        count = self.grad_accum_total if count is None else count
        length = self.seq_len if length is None else length
        if not 0 < length <= self.seq_len:
            raise ValueError(f"seq_len_schedule: a micro-batch of {length} tokens is not within "
                             f"1..seq_len={self.seq_len}")
        if count <= 0 or count % self.world:
            raise ValueError(f"batch_schedule: a step of {count} micro-batches does not split over {self.world} ranks")
        mine = []
        for k in range(count):
            seq = self._next_capped_sequence(length, cap) if cap else self._next_sequence(length)
            if k % self.world == self.rank:
                mine.append(seq)
        return mine

    def state_dict(self) -> dict:
        return dict(vars(self.state))

    def load_state_dict(self, d: dict) -> None:
        self.state = LoaderState(**d)


def validation_chunks(files: list[str], val_tokens: int, val_seq_len: int, rank: int, world: int) -> list[np.ndarray]:
    """This rank's share of the first val_tokens tokens (plus one target), in chunks of <= val_seq_len+1."""
    need = val_tokens + 1
    parts, have = [], 0
    for f in files:
        if have >= need:
            break
        t = load_tokens(f)
        parts.append(np.asarray(t[: need - have]))
        have += parts[-1].size
    if have < need:
        raise ShardError(f"{files[0]}: validation shards hold {have} tokens, fewer than val_tokens+1={need}; "
                         "lower val_tokens or stage more validation shards")
    stream = np.concatenate(parts)
    starts = list(range(0, val_tokens, val_seq_len))
    return [stream[s:min(s + val_seq_len, val_tokens) + 1] for i, s in enumerate(starts) if i % world == rank]


def one_chunk_per_shape(chunks: list[np.ndarray]) -> list[np.ndarray]:
    """The first chunk of each length: what the warm-up validates, so that every validation graph compiles
    without a pass over all the validation tokens (that pass is the step-0 validation's, later)."""
    seen: dict[int, np.ndarray] = {}
    for c in chunks:
        seen.setdefault(len(c), c)
    return list(seen.values())

"""`synthetic://markov?...`: deterministic FineWeb-format shards with a known entropy rate.

Tokens come from a seeded first-order Markov chain over `states` GPT-2 token ids (< 50256). Token 50256
(BOS) opens every document; from BOS the first token is uniform over the states; from a state the
document ends (the next token is BOS) with probability q = 1/doc_len, otherwise the chain moves to one
of `branch` random successors with random probabilities. Documents thus have geometric lengths with
mean doc_len (BOS not counted), and since BOS is itself a state of the chain the entropy rate is exact:

    H = sum_x pi(x) * H(P(. | x))   over the augmented chain {BOS} + states,

with pi the stationary distribution. A model that sees the previous token can reach H and no model can
go below it, which is what the smoke job's loss is checked against.

Only raw uniform doubles, multiplications, comparisons and sums feed the generator (no log/exp, whose
SIMD implementations differ between CPUs), so the same URL gives the same bytes on every machine.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import numpy as np

from orchestrator.data.shards import BOS, DataError, shard_name, write_shard

_SPLIT_CODE = {"train": 0, "val": 1}
_DOC_CHUNK = 1 << 16  # documents generated side by side; bounds memory for 100M-token shards


@dataclass(frozen=True)
class MarkovParams:
    seed: int = 0
    states: int = 512          # distinct token ids the chain visits
    branch: int = 8            # successors per state
    doc_len: int = 256         # mean document length in tokens, BOS not counted
    train_shards: int = 2
    val_shards: int = 1
    shard_tokens: int = 1 << 20

    _LIMITS = {"seed": (0, 2**63 - 1), "states": (2, BOS), "branch": (1, BOS), "doc_len": (1, 10**9),
               "train_shards": (1, 999_999), "val_shards": (0, 999_999), "shard_tokens": (1, 2**31 - 1)}

    @classmethod
    def from_url(cls, url: str) -> "MarkovParams":
        parts = urlsplit(url)
        if parts.scheme != "synthetic" or parts.netloc != "markov" or parts.path not in ("", "/"):
            raise DataError(f"{url}: unknown synthetic source; use synthetic://markov?seed=0&states=512&...")
        known = [f.name for f in fields(cls)]
        values: dict[str, int] = {}
        for key, raw in parse_qsl(parts.query, keep_blank_values=True):
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
                raise DataError(f"{url}: unknown query key {key!r}; {hint}")
            try:
                value = int(raw.replace("_", ""))
            except ValueError:
                raise DataError(f"{url}: {key}={raw!r} is not an integer") from None
            lo, hi = cls._LIMITS[key]
            if not lo <= value <= hi:
                raise DataError(f"{url}: {key}={value} is out of range; it must lie in [{lo}, {hi}]")
            values[key] = value
        params = cls(**values)
        if params.branch > params.states:
            raise DataError(f"{url}: branch={params.branch} exceeds states={params.states}; lower branch")
        return params

    def url(self) -> str:
        query = "&".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))
        return f"synthetic://markov?{query}"


class MarkovSource:
    """The chain (built once from the seed) and the shards it generates."""

    def __init__(self, params: MarkovParams):
        self.params = params
        p = params
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(p.seed, spawn_key=(0,))))
        # which token ids the chain uses: the first `states` of a random permutation of 0..50255
        self.token_ids = np.argsort(rng.random(BOS), kind="stable")[: p.states].astype(np.uint16)
        # successors may repeat; the entropy computation merges repeats, so H stays exact
        self.successors = (rng.random((p.states, p.branch)) * p.states).astype(np.int64)
        w = rng.random((p.states, p.branch))
        w = w * w * w  # skewed weights: some successors are much likelier, as in text
        self.probs = w / w.sum(axis=1, keepdims=True)
        self.cumprobs = np.cumsum(self.probs, axis=1)
        self.cumprobs[:, -1] = 1.0
        self.end_prob = 1.0 / p.doc_len

    @classmethod
    def from_url(cls, url: str) -> "MarkovSource":
        return cls(MarkovParams.from_url(url))

    # ------------------------------------------------------------------ the chain and its entropy

    def transition_matrix(self):
        """Sparse (states+1)^2 matrix of the augmented chain; row/column 0 is BOS, 1+i is state i."""
        from scipy import sparse

        n, b, q = self.params.states, self.params.branch, self.end_prob
        rows = np.concatenate([np.zeros(n, np.int64), 1 + np.arange(n), 1 + np.repeat(np.arange(n), b)])
        cols = np.concatenate([1 + np.arange(n), np.zeros(n, np.int64), 1 + self.successors.ravel()])
        vals = np.concatenate([np.full(n, 1.0 / n), np.full(n, q), (1 - q) * self.probs.ravel()])
        # csr sums duplicate (row, col) entries, i.e. repeated successors
        P = sparse.csr_matrix((vals, (rows, cols)), shape=(n + 1, n + 1))
        P.eliminate_zeros()  # doc_len=1 makes every successor weight 0; 0 log 0 counts as 0
        return P

    def stationary(self) -> np.ndarray:
        """pi with pi P = pi, by one sparse linear solve.

        Every document starts at BOS, so pi(i) = pi(BOS) * (expected visits to i per document), and the
        visits v solve v (I - (1-q) W) = start, W being the successor matrix among states.
        """
        from scipy import sparse
        from scipy.sparse.linalg import spsolve

        P = self.transition_matrix()
        n = self.params.states
        W = P[1:, 1:]  # already scaled by (1 - q)
        start = np.asarray(P[0, 1:].todense()).ravel()
        visits = spsolve((sparse.identity(n, format="csc") - W).T.tocsc(), start)
        pi = np.concatenate([[1.0], visits])
        return pi / pi.sum()

    @cached_property
    def entropy_rate_nats(self) -> float:
        P = self.transition_matrix()
        pi = self.stationary()
        plogp = P.copy()
        plogp.data = -P.data * np.log(P.data)
        row_entropy = np.asarray(plogp.sum(axis=1)).ravel()
        return float(pi @ row_entropy)

    def info(self) -> dict:
        return {"entropy_rate_nats": self.entropy_rate_nats, "entropy_rate_bits": float(self.entropy_rate_nats / np.log(2)),
                "url": self.params.url(), "mean_doc_tokens": self.params.doc_len + 1}

    # ------------------------------------------------------------------------------ the shards

    def shard_names(self) -> list[tuple[str, int, str]]:
        """(split, index, file name) of every shard; train shards count from 1, val from 0, as on the hub."""
        p = self.params
        train = [("train", i, shard_name("train", i)) for i in range(1, p.train_shards + 1)]
        val = [("val", i, shard_name("val", i)) for i in range(p.val_shards)]
        return train + val

    def generate(self, split: str, index: int) -> np.ndarray:
        """The tokens of one shard (uint16): whole documents, the last one cut at shard_tokens."""
        n_tokens = self.params.shard_tokens
        seq = np.random.SeedSequence(self.params.seed, spawn_key=(1, _SPLIT_CODE[split], index))
        rng = np.random.Generator(np.random.PCG64(seq))
        out = np.empty(n_tokens, dtype=np.uint16)
        filled = 0
        survival = self._survival()
        mean_doc = self.params.doc_len + 1
        while filled < n_tokens:
            n_docs = min(_DOC_CHUNK, (n_tokens - filled) // mean_doc + 16)
            # content length n >= 1 with P(n > k) = (1-q)^k: count the survival values above a uniform
            lengths = 1 + survival.size - np.searchsorted(survival[::-1], rng.random(n_docs), side="right")
            docs = self._documents(rng, lengths)
            take = min(docs.size, n_tokens - filled)
            out[filled: filled + take] = docs[:take]
            filled += take
        return out

    def _survival(self) -> np.ndarray:
        """(1-q)^k for k = 1.. until it drops below 2^-54, where a 53-bit uniform can no longer land."""
        if self.end_prob >= 1.0:
            return np.zeros(0)
        k = 64
        while True:
            s = np.cumprod(np.full(k, 1.0 - self.end_prob))
            if s[-1] < 2.0**-54:
                return s[s >= 2.0**-54]
            k *= 2

    def _documents(self, rng: np.random.Generator, lengths: np.ndarray) -> np.ndarray:
        """Generate documents of the given content lengths side by side, one position at a time."""
        n_states = self.params.states
        starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])
        out = np.empty(int((lengths + 1).sum()), dtype=np.uint16)
        out[starts] = BOS
        # longest first, so the documents still growing at position t are always a prefix
        order = np.argsort(-lengths, kind="stable")
        starts, lengths = starts[order], lengths[order]
        alive = np.searchsorted(-lengths, -np.arange(int(lengths[0])), side="left")  # alive[t]: docs with n > t
        state = (rng.random(lengths.size) * n_states).astype(np.int64)
        out[starts + 1] = self.token_ids[state]
        for t in range(1, int(lengths[0])):
            k = alive[t]
            state = state[:k]
            u = rng.random(k)
            pick = (u[:, None] >= self.cumprobs[state]).sum(axis=1)
            state = self.successors[state, pick]
            out[starts[:k] + 1 + t] = self.token_ids[state]
        return out


def markov_shards(dest: Path, url: str = "synthetic://markov?seed=0&states=64&branch=4&shard_tokens=262144") -> float:
    """Write the synthetic source's train and val shards into dest (for tests and benchmarks of the
    trainer); return its entropy rate in nats."""
    source = MarkovSource.from_url(url)
    dest.mkdir(parents=True, exist_ok=True)
    for split, index, name in source.shard_names():
        write_shard(dest / name, source.generate(split, index))
    return source.entropy_rate_nats

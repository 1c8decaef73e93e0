"""Extra token inputs of later records, each behind a TrainConfig switch (off in the record-28 recipe).

Smear (record-34, 2025-09-18 "Smear"): each token's embedding gets a gated share of the previous token's.
Like the record, it reaches across document boundaries: a document's BOS takes in the last token of the one
before (the record found masking that no better).

Bigram hash embedding (record-62, 2026-01-19 "BigramHashEmbedding"; its sign trick and 1/4-width table are
record-83's, 2026-05-20 "BigramsSignTrick"): a table indexed by a hash of (previous token, token), added to
the first dims of every block's input with a per-layer weight. Hash collisions are rare where it matters (the
token distribution is skewed); the sign trick multiplies each row by a +-1 pattern chosen by a second hash, so
bigrams sharing a row pull it in different directions per dim instead of averaging into one vector.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Smear(nn.Module):
    """e_t += lam * sigmoid(w . e_t[:dims]) * e_{t-1} on the raw embeddings, e_0 unchanged.

    lam starts at 0 (the model starts without it) and trains with the scalar gains; w (1, dims) starts at 0 and
    trains by Adam at a hundredth of the base lr (record-52 on; record-34 trained it with Muon)."""

    def __init__(self, dims: int):
        super().__init__()
        self.dims = dims
        self.gate = nn.Parameter(torch.zeros(1, dims))
        self.lam = nn.Parameter(torch.zeros(1))

    def forward(self, e: torch.Tensor) -> torch.Tensor:   # (T, D) embeddings of one packed sequence
        share = self.lam.to(e.dtype) * torch.sigmoid(F.linear(e[1:, :self.dims], self.gate.to(e.dtype)))   # (T-1, 1)
        return torch.cat([e[:1], e[1:] + share * e[:-1]])


HASH_A, HASH_B = 36313, 27191   # the record's multipliers: spread (token, previous) over the int32 range


def bigram_hash(tokens: torch.Tensor, rows: int) -> torch.Tensor:
    """Row of each position's (previous token, token) pair in a table of `rows`: (A*t xor B*prev) mod (rows - 1);
    position 0, with no previous token, gets the reserved last row. A*t and B*prev stay below 2^31 for GPT-2's
    vocabulary, so this is the record's int32 arithmetic exactly."""
    h = torch.bitwise_xor(HASH_A * tokens[1:], HASH_B * tokens[:-1]) % (rows - 1)
    return torch.cat([tokens.new_full((1,), rows - 1), h])


class BigramHash(nn.Module):
    """The (T, dim) bigram embedding of a packed sequence: table[hash] times a +-1 sign row per (prev xor token).

    The table starts at 0 and trains with the token embeddings (Adam, 75x the base lr in the records); the sign
    table is a fixed buffer (kept in checkpoints)."""

    def __init__(self, rows: int, dim: int, sign_rows: int):
        super().__init__()
        self.table = nn.Embedding(rows, dim)
        nn.init.zeros_(self.table.weight)
        self.register_buffer("signs", torch.randn(sign_rows, dim).sign())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        which = torch.bitwise_xor(tokens[1:], tokens[:-1]) % self.signs.size(0)
        signs = self.signs[torch.cat([tokens.new_zeros(1), which])]   # position 0 takes sign row 0
        return self.table(bigram_hash(tokens, self.table.num_embeddings)) * signs

"""Extra token inputs of later records, each behind a TrainConfig switch (off in the record-28 recipe).

Smear (record-34, 2025-09-18 "Smear"): each token's embedding gets a gated share of the previous token's.
Like the record, it reaches across document boundaries: a document's BOS takes in the last token of the one
before (the record found masking that no better).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Smear(nn.Module):
    """e_t += lam * sigmoid(w . e_t[:dims]) * e_{t-1} on the raw embeddings, e_0 unchanged.

    lam starts at 0 (the model starts without it) and trains with the scalar gains; w (1, dims) starts at 0
    and trains with Muon, as in record-34."""

    def __init__(self, dims: int):
        super().__init__()
        self.dims = dims
        self.gate = nn.Parameter(torch.zeros(1, dims))
        self.lam = nn.Parameter(torch.zeros(1))

    def forward(self, e: torch.Tensor) -> torch.Tensor:   # (T, D) embeddings of one packed sequence
        share = self.lam.to(e.dtype) * torch.sigmoid(F.linear(e[1:, :self.dims], self.gate.to(e.dtype)))   # (T-1, 1)
        return torch.cat([e[:1], e[1:] + share * e[:-1]])

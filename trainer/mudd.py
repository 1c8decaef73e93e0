"""Multiway dynamic dense connections (MUDD, Xiao et al. 2025) as the records trim them (record-81, 2026-04-22
"MuddFormer", in the form the current record keeps): a small net on the residual stream gives each token its own
coefficients over earlier hidden states, and the weighted sums go back into the model at two places only.

- Before the last layer, six coefficients over (x0, the saved late layer's output, the residual x itself): three
  make a tensor added into the last layer's attention values (beside its value embedding), three recombine the
  residual as (1 + m) x + m' x0 + m'' late.
- After the last layer, five coefficients over (x0, the late layer's output, the last layer's input, the first
  value embedding, the saved early layer's output) are added to the residual before the head.

The net is gelu(x W1^T) W2^T + b, times 0.1, with W1 (64, dim), W2 zero: every coefficient starts at its bias, all 0
but the last one on the late layer's output, `backout` (the record's -0.5). That one is record-40's backout (the final
residual minus half a mid-network state), which record-81 absorbed into MUDD's bias so it became per-token and
learnable. The saved layers
are L/3 and 2L/3 (4 and 8 of our 12: the record's 3 and 7 of its 11, whose first layer is our second).

What the current record adds on the same net and leaves out here: coefficient lanes that replace the last layer's
value-embedding gate and its residual and bigram lambdas (scalars our blocks hold in another form), and record-85's
second, gate-producing nets for earlier layers.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

HIDDEN = 64        # the net's width (the record's mudd_dim)
SCALE = 0.1        # coefficients = (net output + bias) x SCALE: the record's _mudd_scale
BEFORE, AFTER = 6, 5   # coefficients of the two places


def saved_layers(num_layers: int) -> tuple[int, int]:
    """(early, late): the layers whose outputs the connections read, L/3 and 2L/3 (12 layers: 4 and 8)."""
    return num_layers // 3, 2 * num_layers // 3


class DenseConnections(nn.Module):
    """The two coefficient nets (one per place) in three parameters, as the record stacks them."""

    def __init__(self, dim: int, backout: float = -0.5):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(2, HIDDEN, dim))
        for w in self.w1.data:   # nn.Linear's default init, U(-1/sqrt(dim), 1/sqrt(dim)), as the record's
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        self.w2 = nn.Parameter(torch.zeros(2, BEFORE, HIDDEN))
        bias = torch.zeros(2, BEFORE)
        bias[1, 1] = backout / SCALE
        self.b2 = nn.Parameter(bias)

    def coefficients(self, x: torch.Tensor, place: int, n: int) -> list[torch.Tensor]:
        """n per-token coefficients of net `place` on x (..., dim), each (..., 1)."""
        h = F.gelu(F.linear(x, self.w1[place].to(x.dtype)))
        m = (F.linear(h, self.w2[place, :n].to(x.dtype)) + self.b2[place, :n].to(x.dtype)) * SCALE
        return list(m.split(1, dim=-1))

    def before_last(self, x: torch.Tensor, x0: torch.Tensor, late: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the recombined residual, the tensor added into the last layer's values), both like x."""
        m = self.coefficients(x, 0, BEFORE)
        values = m[0] * x0 + m[1] * late + m[2] * x
        return (1 + m[5]) * x + m[3] * x0 + m[4] * late, values

    def after_last(self, x: torch.Tensor, x0: torch.Tensor, late: torch.Tensor, last_in: torch.Tensor,
                   value_embed: torch.Tensor | None, early: torch.Tensor) -> torch.Tensor:
        """The residual with the after-the-last-layer connections added (no value embedding: its term dropped)."""
        m = self.coefficients(x, 1, AFTER)
        x = x + m[0] * x0 + m[1] * late + m[2] * last_in + m[4] * early
        return x if value_embed is None else x + m[3] * value_embed

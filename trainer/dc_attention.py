"""Record-85's lightweight dynamically composable attention (DCMHA, Xiao et al. 2024, in its "post-only" form).

In one layer, each head's output gains a term made of every head's attention pattern over a short band of keys:

    A[t]    = sum over heads g of  w1[t, g] * P_g[t]          (P_g: head g's softmax over the last `window` keys)
    y_h[t] += w2[t, h] * (A[t] @ V_h)

so a token can route what one head found through another head's values. w1 and w2 are per token: a small net on
the residual a few layers earlier gives them (DCGate), w1 rms-normalised across the heads, w2 zero at start (the
layer starts as it was). The record: layer 10 of its 11 (ours 11 of 12), the net on the input of its layer 4
(ours 5), a band of 112 tokens, the net trained by Adam at 0.1x its base lr 0.008 with betas (0.9, 0.99).

The record fuses this into one Triton kernel. Here it is FlexAttention on the GPU: P_g @ V_h for every pair is
num_heads attentions of num_heads heads (q and k of head g, the value of head h) over the band, a mask of at most
two 128-blocks per query block, then the sum over g; and a dense masked version on CPU, the reference for tests.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from trainer import attention as attn_impl

HIDDEN = 64          # the record's gate net width
OUT_SCALE = 0.1      # the record's output scale (a parameter), at which w1's bias 10 gives 1.0 at start


class DCGate(nn.Module):
    """The per-token composition weights: (w2 . gelu(w1 . x) + b) * scale, split into w1 (rms-normed across
    heads) and w2. At start w2's half is zero and w1's is one for every head."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.w1 = nn.Parameter(torch.empty(HIDDEN, dim))
        nn.init.kaiming_uniform_(self.w1, a=math.sqrt(5))   # nn.Linear's default, as the record's
        self.w2 = nn.Parameter(torch.zeros(2 * num_heads, HIDDEN))
        self.b2 = nn.Parameter(torch.cat([torch.full((num_heads,), 1 / OUT_SCALE), torch.zeros(num_heads)]))
        self.scale = nn.Parameter(torch.tensor(OUT_SCALE))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, dim), the residual -> (w1, w2), each (B, T, H) in x's dtype."""
        h = F.gelu(F.linear(x, self.w1.to(x.dtype)))
        out = (F.linear(h, self.w2.to(x.dtype)) + self.b2.to(x.dtype)) * self.scale.to(x.dtype)
        w1, w2 = out.split(self.num_heads, dim=-1)
        return F.rms_norm(w1.float(), (self.num_heads,), eps=1e-6).to(x.dtype), w2


def band_mask(docs: torch.Tensor, window: int) -> torch.Tensor:
    """Boolean (T, T): query i sees key j when 0 <= i - j < window, in the same document."""
    t = torch.arange(docs.numel(), device=docs.device)
    rel = t[:, None] - t[None, :]
    return (rel >= 0) & (rel < window) & (docs[:, None] == docs[None, :])


def flex_band_mask(docs: torch.Tensor, window: int, block_size: int) -> BlockMask:
    """The band as a BlockMask: with window <= block_size, query block q meets key blocks q - 1 and q only, both
    partly, so the lists are written down directly (no full blocks)."""
    if window > block_size:
        raise ValueError(f"dc_window: must be <= block_size={block_size} (got {window})")
    T = docs.numel()
    nb = T // block_size
    blk = torch.arange(nb, device=docs.device)
    slot = blk[None, :]

    def run(start, count):   # per row, count blocks from start; padded to nb with valid indices, as attention.py's
        idx = torch.where(slot < count[:, None], start[:, None] + slot, start[:, None]).clamp(0, nb - 1)
        return count.to(torch.int32)[None, None].contiguous(), idx.to(torch.int32)[None, None].contiguous()

    kv_num, kv_list = run((blk - 1).clamp(min=0), torch.where(blk > 0, 2, 1))   # key blocks q - 1, q
    q_num, q_list = run(blk, torch.where(blk < nb - 1, 2, 1))                   # query blocks k, k + 1

    def mask_mod(b, h, q_idx, kv_idx):
        rel = q_idx - kv_idx
        return (rel >= 0) & (rel < window) & (docs[q_idx] == docs[kv_idx])

    return BlockMask(seq_lengths=(T, T), kv_num_blocks=kv_num, kv_indices=kv_list, full_kv_num_blocks=None,
                     full_kv_indices=None, q_num_blocks=q_num, q_indices=q_list, full_q_num_blocks=None,
                     full_q_indices=None, BLOCK_SIZE=(block_size, block_size), mask_mod=mask_mod)


def composed(y_per_value: list[torch.Tensor], w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """y_per_value[h] (B, G, T, D): every head g's pattern applied to head h's values; w1, w2 (B, T, H).
    Returns the correction (B, H, T, D): w2[h] * sum_g w1[g] * y_per_value[h][g]."""
    mix = w1.transpose(1, 2)[..., None]   # (B, G, T, 1)
    out = torch.stack([(mix * y).sum(1) for y in y_per_value], dim=1)   # (B, H, T, D)
    return w2.transpose(1, 2)[..., None] * out


def dense_correction(q, k, v, w1, w2, docs, window: int, scale: float) -> torch.Tensor:
    """(B, H, T, D) q, k, v as the layer attends with them; the CPU path and the GPU path's reference."""
    P = torch.softmax((q @ k.transpose(-1, -2) * scale).float().masked_fill(~band_mask(docs, window), -math.inf),
                      dim=-1)   # (B, G, T, T)
    A = (w1.transpose(1, 2)[..., None].float() * P).sum(1)   # (B, T, T)
    return (w2.transpose(1, 2)[..., None].float() * (A[:, None] @ v.float())).to(q.dtype)


def flex_correction(q, k, v, w1, w2, block_mask: BlockMask, scale: float) -> torch.Tensor:
    """The same with FlexAttention: for each head h, one attention of all heads' q and k with h's values."""
    H = q.size(1)
    ys = [attn_impl.flex_attention(q, k, v[:, h:h + 1].expand_as(v).contiguous(), block_mask, scale)
          for h in range(H)]
    return composed(ys, w1, w2)


def correction(q, k, v, dc, docs, scale: float) -> torch.Tensor:
    """dc = (w1, w2, mask, window): mask a BlockMask (flex) or None (dense)."""
    w1, w2, mask, window = dc
    if isinstance(mask, BlockMask):
        return flex_correction(q, k, v, w1, w2, mask, scale)
    return dense_correction(q, k, v, w1, w2, docs, window, scale)

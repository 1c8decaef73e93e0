"""Causal, document-masked, sliding-window attention: FlexAttention on the GPU, a dense masked version on CPU.

The window is counted in blocks of block_size tokens: query block qb sees key block kb when
0 <= qb - kb < window_blocks (and the key is causal and in the same document). Counting in blocks lets
the GPU path drop whole blocks from the BlockMask, and the dense path applies the very same rule per
token, so the two agree exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask
from torch.nn.attention.flex_attention import flex_attention as _flex

from trainer.data import BOS


def document_ids(tokens: torch.Tensor) -> torch.Tensor:
    """Document index of every position: a new document starts at each BOS token."""
    return (tokens == BOS).cumsum(0)


def dense_mask(docs: torch.Tensor, window_blocks: int, block_size: int) -> torch.Tensor:
    """Boolean (T, T) mask, True where query i may attend to key j."""
    t = torch.arange(docs.numel(), device=docs.device)
    q, k = t[:, None], t[None, :]
    return (k <= q) & (docs[:, None] == docs[None, :]) & ((q // block_size - k // block_size) < window_blocks)


def dense_attention(q, k, v, docs, window_blocks: int, block_size: int, scale: float) -> torch.Tensor:
    """(B, H, T, D) inputs; the CPU path and the reference the GPU path is tested against."""
    mask = dense_mask(docs, window_blocks, block_size)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def flex_block_mask(docs: torch.Tensor, window_blocks: torch.Tensor, block_size: int):
    """BlockMask built from per-block document ranges, without evaluating the mask per token.

    Blocks wholly causal, in one document and inside the window are 'full' (no mask_mod at all);
    blocks that only partly qualify run the mask_mod. window_blocks is a tensor so a growing window
    never triggers a recompile.
    """
    T = docs.numel()
    nb = T // block_size
    per_block = docs.view(nb, block_size)
    lo, hi = per_block[:, 0], per_block[:, -1]        # documents ids are non-decreasing along the sequence
    blk = torch.arange(nb, device=docs.device)
    qb, kb = blk[:, None], blk[None, :]
    in_window = (qb - kb) < window_blocks
    doc_any = (lo[:, None] <= hi[None, :]) & (hi[:, None] >= lo[None, :])
    doc_all = (lo[:, None] == hi[None, :]) & (hi[:, None] == lo[None, :])
    any_ = (qb >= kb) & doc_any & in_window
    full = (qb > kb) & doc_all & in_window
    partial = any_ & ~full

    def to_indices(m: torch.Tensor):
        counts = m.sum(-1, dtype=torch.int32)
        idx = torch.argsort(m.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return counts[None, None].contiguous(), idx[None, None].contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        same_doc = docs[q_idx] == docs[kv_idx]
        near = (q_idx // block_size - kv_idx // block_size) < window_blocks
        return (q_idx >= kv_idx) & same_doc & near

    p_num, p_idx = to_indices(partial)
    f_num, f_idx = to_indices(full)
    return BlockMask.from_kv_blocks(p_num, p_idx, f_num, f_idx, BLOCK_SIZE=block_size, mask_mod=mask_mod)


def implementation(requested: str, cuda: bool) -> str:
    """The config's attention (auto | flex | dense) for this device: auto is flex on CUDA and dense on CPU."""
    if requested == "auto":
        return "flex" if cuda else "dense"
    return requested


def flex_attention(q, k, v, block_mask, scale: float) -> torch.Tensor:
    return _flex(q, k, v, block_mask=block_mask, scale=scale)


def attend(q, k, v, mask, docs, window_blocks, block_size: int, scale: float) -> torch.Tensor:
    """(B, H, T, D) attention under the rule above, by whichever implementation `mask` is built for: a
    BlockMask (FlexAttention) or None (dense, CPU)."""
    if isinstance(mask, BlockMask):
        return flex_attention(q, k, v, mask, scale)
    return dense_attention(q, k, v, docs, window_blocks, block_size, scale)

"""Causal, document-masked, sliding-window attention: FlexAttention on the GPU, a dense masked version on CPU.

The window is counted in blocks of block_size tokens: query block qb sees key block kb when
0 <= qb - kb < window_blocks (and the key is causal and in the same document), record-28's rule. With
exact=True it is counted in tokens, as the records from record-29 on (FlashAttention-3's window_size): query i
sees key j when 0 <= i - j <= window_blocks * block_size, so one more key block, partly, per query block. Either
way the GPU path drops whole blocks from the BlockMask, and the dense path applies the very same rule per
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


def near(q, k, window_blocks, block_size: int, exact: bool):
    """Whether key position k is inside query position q's window (causality apart): the module's rule."""
    if exact:
        return (q - k) <= window_blocks * block_size
    return (q // block_size - k // block_size) < window_blocks


def dense_mask(docs: torch.Tensor, window_blocks: int | torch.Tensor, block_size: int,
               exact: bool = False) -> torch.Tensor:
    """Boolean (T, T) mask, True where query i may attend to key j."""
    t = torch.arange(docs.numel(), device=docs.device)
    q, k = t[:, None], t[None, :]
    return (k <= q) & (docs[:, None] == docs[None, :]) & near(q, k, window_blocks, block_size, exact)


def dense_attention(q, k, v, docs, window_blocks: int | torch.Tensor, block_size: int, scale: float,
                    exact: bool = False) -> torch.Tensor:
    """(B, H, T, D) inputs; the CPU path and the reference the GPU path is tested against."""
    mask = dense_mask(docs, window_blocks, block_size, exact)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def flex_block_mask(docs: torch.Tensor, window_blocks: torch.Tensor, block_size: int, exact: bool = False):
    """BlockMask built from per-block document ranges, without evaluating the mask per token.

    Blocks wholly causal, in one document and inside the window are 'full' (no mask_mod at all);
    blocks that only partly qualify run the mask_mod. window_blocks is a tensor so a growing window
    never triggers a recompile.

    Documents are contiguous, so every list is a run of consecutive blocks and is written down by
    arithmetic: query block q sees key blocks [first, q], of which [full_from, q-1] are full (possibly none),
    so its partial ones are [first, full_from-1] and q itself; the lists of query blocks per key block (what the
    backward walks) follow the same way. The generic route, (nb, nb) masks sorted into index lists and
    sorted again for the transposes, took 2.7 ms of sort kernels per 8-micro-batch step on an H200.
    With an exact window, key block q - window_blocks is partly in the window too (reach, below): the partial
    runs start one block earlier, and the backward's end one block later.
    """
    T = docs.numel()
    nb = T // block_size
    per_block = docs.view(nb, block_size)
    lo, hi = per_block[:, 0], per_block[:, -1]        # document ids are non-decreasing along the sequence
    blk = torch.arange(nb, device=docs.device)
    single = lo == hi                                  # the block lies inside one document
    w = window_blocks
    reach = w + 1 if exact else w                      # key blocks a query block's window touches, its own included

    def count(m: torch.Tensor) -> torch.Tensor:   # True entries per row
        return m.sum(-1)

    # per query block q: the key blocks that share a document with it start at the first block ending
    # at or after q's first document; the full ones at the first block starting in q's (single) document
    first = torch.maximum(count(hi[None, :] < lo[:, None]), blk - reach + 1)
    full_from = torch.where(single, torch.maximum(count(lo[None, :] < lo[:, None]), blk - w + 1), blk)
    # per key block k: query blocks up to the last one starting in or before k's last document see it;
    # those up to the last one ending in k's (single) document see all of it
    last = torch.minimum(count(lo[None, :] <= hi[:, None]) - 1, blk + reach - 1)
    full_to = torch.where(single, torch.minimum(count(hi[None, :] <= hi[:, None]) - 1, blk + w - 1), blk)

    slot = blk[None, :]

    def lists(a_start, a_len, b_start, b_len):
        """Per row, the run a_start.. (a_len blocks) then the run b_start.. (b_len blocks): the count (1, 1, nb)
        and the index list (1, 1, nb, nb), padded with valid indices (FlexAttention reads only count entries)."""
        a_len, b_len = a_len[:, None], b_len[:, None]
        idx = torch.where(slot < a_len, a_start[:, None] + slot, b_start[:, None] + slot - a_len)
        n = (a_len + b_len).squeeze(1)
        return n.to(torch.int32)[None, None].contiguous(), idx.clamp(0, nb - 1).to(torch.int32)[None, None].contiguous()

    one, none = torch.ones_like(blk), torch.zeros_like(blk)
    kv_num, kv_list = lists(first, full_from - first, blk, one)          # partial: [first, full_from), then q
    full_kv_num, full_kv_list = lists(full_from, blk - full_from, blk, none)   # full: [full_from, q)
    q_num, q_list = lists(blk, one, full_to + 1, last - full_to)         # partial: k, then (full_to, last]
    full_q_num, full_q_list = lists(blk + 1, full_to - blk, blk, none)   # full: (k, full_to]

    def mask_mod(b, h, q_idx, kv_idx):
        same_doc = docs[q_idx] == docs[kv_idx]
        return (q_idx >= kv_idx) & same_doc & near(q_idx, kv_idx, window_blocks, block_size, exact)

    return BlockMask(seq_lengths=(T, T), kv_num_blocks=kv_num, kv_indices=kv_list, full_kv_num_blocks=full_kv_num,
                     full_kv_indices=full_kv_list, q_num_blocks=q_num, q_indices=q_list, full_q_num_blocks=full_q_num,
                     full_q_indices=full_q_list, BLOCK_SIZE=(block_size, block_size), mask_mod=mask_mod)


def implementation(requested: str, cuda: bool) -> str:
    """The config's attention (auto | flex | dense) for this device: auto is flex on CUDA and dense on CPU."""
    if requested == "auto":
        return "flex" if cuda else "dense"
    return requested


def flex_attention(q, k, v, block_mask, scale: float) -> torch.Tensor:
    return _flex(q, k, v, block_mask=block_mask, scale=scale)


def attend(q, k, v, mask, docs, window_blocks, block_size: int, scale: float, exact: bool = False) -> torch.Tensor:
    """(B, H, T, D) attention under the rule above, by whichever implementation `mask` is built for: a
    BlockMask (FlexAttention, which holds its rule) or None (dense, CPU)."""
    if isinstance(mask, BlockMask):
        return flex_attention(q, k, v, mask, scale)
    return dense_attention(q, k, v, docs, window_blocks, block_size, scale, exact)

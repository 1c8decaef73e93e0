"""Soft-capped cross-entropy, forward and backward in one Triton kernel over the logits.

Fuses: soft cap (s = cap * tanh((z + offset) / div), div = cap and offset = 0 by default), log-sum-exp, the
target's log-probability, and the gradient dL/dz = (softmax - onehot) * (cap / div) * (1 - tanh^2), written as
the lm-head backward wants it (bf16 in place of the logits, or FP8 e5m2); `transpose` below then lays the FP8
gradient out for the weight-gradient matmul.
What it saves: compiled torch runs the cap, the log-softmax and its backward as three to four passes over
a (tokens x vocab) tensor, partly in fp32 (about 145 ms per 393K-token step on an H100, plus ~170 ms of
FP8 casts and torch's strided transpose of the gradient); this kernel reads the bf16 logits twice and
writes the gradient once (bench/kernels.py, an H200: 3.3 ms with the FP8 gradient against 17.4 ms for
compiled torch per 48K-token micro-batch; the 12.4 GB it must move take 2.9 ms at 4.3 TB/s).

The soft cap bounds every capped logit to [-cap, cap], so the softmax needs no running maximum: exp(s - cap)
lies in [e^-2cap, 1] and a plain sum in fp32 cannot overflow. The gradient is computed for a loss of 1 per
row (the caller scales by dL/dloss in the matmuls that consume it, on small tensors).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# e5m2 keeps values down to 2^-16; scaling the unit gradient (|g| <= 1) by 2^15 keeps probabilities
# down to 2^-31 and stays under e5m2's maximum 57344. A power of two, so the scaling is exact.
FP8_GRAD_SCALE = 2.0 ** 15


@triton.jit
def _tanh(y, FAST_TANH: tl.constexpr):
    if FAST_TANH:
        # the GPU's one-instruction tanh (max relative error ~2^-11, far below bf16 logits' own rounding),
        # where a software tanh costs a dozen instructions per element in a kernel bound by instruction issue
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [y], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        # tanh(y) = 1 - 2 / (1 + e^(2y)), exact in the limits (e^(2y) = inf gives 1); the interpreter's path
        return 1.0 - 2.0 / (1.0 + tl.exp(2.0 * y))


@triton.jit
def _exp_terms(logits_ptr, row_off, cols, m, inv_div, off, cap2, shift2, FAST_TANH: tl.constexpr,
               MASKED: tl.constexpr):
    """One tile's t = tanh(z / div + off) and exp(s - shift) = 2^(t cap2 - shift2), s = cap t; where ~m, e = 0."""
    if MASKED:
        z = tl.load(logits_ptr + row_off + cols[None, :], mask=m, other=0.0).to(tl.float32)
    else:
        z = tl.load(logits_ptr + row_off + cols[None, :]).to(tl.float32)
    t = _tanh(z * inv_div + off, FAST_TANH)   # one FMA, as the plain z / cap was one multiply
    e = tl.exp2(t * cap2 - shift2)
    if MASKED:
        e = tl.where(m, e, 0.0)
    return t, e


@triton.jit
def _weighted_targets(logits_ptr, targets_ptr, weights_ptr, rows, row_ok, stride_m, inv_div, off,
                      K: tl.constexpr, FAST_TANH: tl.constexpr):
    """Over a row's K weighted targets: S, the sum of the valid ones' weights, and sum w_k t_k, t_k = tanh of the
    k-th target's scaled logit (the loss is then S lse - cap sum w_k t_k)."""
    s_w = tl.zeros([rows.shape[0]], dtype=tl.float32)
    wt = tl.zeros([rows.shape[0]], dtype=tl.float32)
    for k in tl.static_range(K):
        tgt = tl.load(targets_ptr + rows * K + k, mask=row_ok, other=-1)
        ok = row_ok & (tgt >= 0)
        w = tl.load(weights_ptr + k)
        z = tl.load(logits_ptr + rows.to(tl.int64) * stride_m + tgt, mask=ok, other=0.0).to(tl.float32)
        s_w += tl.where(ok, w, 0.0)
        wt += tl.where(ok, w * _tanh(z * inv_div + off, FAST_TANH), 0.0)
    return s_w, wt


@triton.jit
def _softcap_ce_kernel(logits_ptr, targets_ptr, weights_ptr, loss_ptr, grad_ptr, M, stride_m, grad_stride_m, cap, div,
                       offset, grad_mult,
                       N: tl.constexpr, N_TOTAL: tl.constexpr, FAST_TANH: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, WRITE_GRAD: tl.constexpr, K: tl.constexpr,
                       WEIGHTED: tl.constexpr):
    # WEIGHTED (multi-token prediction, record-53): each row has K targets with weights w_k, its loss is
    # sum_k w_k (lse - s[t_k]) over the valid ones, and its gradient S softmax - sum_k w_k onehot(t_k), S = sum w_k.
    # The kernel is bound by instruction issue, not by its two special-function instructions per element and
    # pass (tanh, exp2), so the loops keep each element's work to those and a handful of FP32 operations:
    # 1/cap is a multiply, exp is exp2 of a pre-scaled argument, tanh stays t for the cap's derivative
    # 1 - t^2, the sums accumulate per element and reduce across threads once per row, the target's logit
    # is one load per row rather than a compare in every tile, and only the last column tile (and, when
    # BLOCK_M does not divide M, every tile of the last rows) is masked.
    LOG2E: tl.constexpr = 1.4426950408889634
    N_FULL: tl.constexpr = (N // BLOCK_N) * BLOCK_N       # columns in whole tiles
    inv_div = 1.0 / div
    off = offset * inv_div
    cap2 = cap * LOG2E
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols0 = tl.arange(0, BLOCK_N)
    row_off = rows.to(tl.int64)[:, None] * stride_m
    if WEIGHTED:
        s_w, wt = _weighted_targets(logits_ptr, targets_ptr, weights_ptr, rows, row_ok, stride_m, inv_div, off, K,
                                    FAST_TANH)
        valid = row_ok & (s_w != 0.0)
    else:
        tgt = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
        valid = row_ok & (tgt >= 0)
        z_tgt = tl.load(logits_ptr + rows.to(tl.int64) * stride_m + tgt, mask=valid, other=0.0).to(tl.float32)
        t_tgt = _tanh(z_tgt * inv_div + off, FAST_TANH)
    # pass 1: the sum of exp(s - cap), in [e^-2cap, 1] per element
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in tl.range(0, N_FULL, BLOCK_N):
        cols = start + cols0
        _, e = _exp_terms(logits_ptr, row_off, cols, row_ok[:, None], inv_div, off, cap2, cap2, FAST_TANH, not EVEN_M)
        acc += e
    if N_FULL < N:
        cols = N_FULL + cols0
        _, e = _exp_terms(logits_ptr, row_off, cols, row_ok[:, None] & (cols < N)[None, :], inv_div, off, cap2, cap2,
                          FAST_TANH, True)
        acc += e
    lse = cap + tl.log(tl.where(row_ok, tl.sum(acc, axis=1), 1.0))   # rows past M: keep the masked math finite
    if WEIGHTED:
        tl.store(loss_ptr + rows, tl.where(valid, s_w * lse - cap * wt, 0.0), mask=row_ok)
    else:
        tl.store(loss_ptr + rows, tl.where(valid, lse - cap * t_tgt, 0.0), mask=row_ok)
    if WRITE_GRAD:
        # pass 2: softmax * (1 - t^2) everywhere, the target's -1 patched in after; ignored rows and padded
        # vocabulary columns get exactly 0
        row_mult = tl.where(valid, grad_mult * cap * inv_div, 0.0)[:, None]   # ds/dz = cap / div * (1 - t^2)
        if WEIGHTED:
            row_mult = row_mult * s_w[:, None]
        lse2 = lse * LOG2E
        g_off = rows.to(tl.int64)[:, None] * grad_stride_m
        for start in tl.range(0, N_FULL, BLOCK_N):
            cols = start + cols0
            t, p = _exp_terms(logits_ptr, row_off, cols, row_ok[:, None], inv_div, off, cap2, lse2[:, None],
                              FAST_TANH, not EVEN_M)
            g = (p * row_mult) * (1.0 - t * t)
            if EVEN_M:
                tl.store(grad_ptr + g_off + cols[None, :], g.to(grad_ptr.dtype.element_ty))
            else:
                tl.store(grad_ptr + g_off + cols[None, :], g.to(grad_ptr.dtype.element_ty), mask=row_ok[:, None])
        for start in tl.range(N_FULL, N_TOTAL, BLOCK_N):   # the tail: the last real columns, then the padding
            cols = start + cols0
            t, p = _exp_terms(logits_ptr, row_off, cols, row_ok[:, None] & (cols < N)[None, :], inv_div, off, cap2,
                              lse2[:, None], FAST_TANH, True)
            g = (p * row_mult) * (1.0 - t * t)
            tl.store(grad_ptr + g_off + cols[None, :], g.to(grad_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & (cols < N_TOTAL)[None, :])
        # every thread's stores above land before the patch overwrites the target's element (a block-wide
        # barrier orders its threads' global writes)
        tl.debug_barrier()
        if WEIGHTED:
            # each target's column: S p - (the weights of every target on that column); two targets on one
            # column write the same value
            for k in tl.static_range(K):
                tgt = tl.load(targets_ptr + rows * K + k, mask=row_ok, other=-1)
                ok = row_ok & (tgt >= 0)
                w_col = tl.zeros([BLOCK_M], dtype=tl.float32)
                for j in tl.static_range(K):
                    other = tl.load(targets_ptr + rows * K + j, mask=row_ok, other=-1)
                    w_col += tl.where(ok & (other == tgt), tl.load(weights_ptr + j), 0.0)
                z_k = tl.load(logits_ptr + rows.to(tl.int64) * stride_m + tgt, mask=ok, other=0.0).to(tl.float32)
                t_k = _tanh(z_k * inv_div + off, FAST_TANH)
                g_k = (s_w * tl.exp2(t_k * cap2 - lse2) - w_col) * (1.0 - t_k * t_k) * (grad_mult * cap * inv_div)
                tl.store(grad_ptr + rows.to(tl.int64) * grad_stride_m + tgt, g_k.to(grad_ptr.dtype.element_ty),
                         mask=ok)
        else:
            p_tgt = tl.exp2(t_tgt * cap2 - lse2)
            g_tgt = (p_tgt - 1.0) * (1.0 - t_tgt * t_tgt) * (grad_mult * cap * inv_div)
            tl.store(grad_ptr + rows.to(tl.int64) * grad_stride_m + tgt, g_tgt.to(grad_ptr.dtype.element_ty),
                     mask=valid)


# (BLOCK_M, BLOCK_N, num_warps) on Hopper: on an H200 (2026-11-29, loss + FP8 gradient at 49152 x 50304),
# 4 x 256 with 4 warps took 3.12 ms and 8 x 256 with 8 warps 3.13 ms against 3.30 ms for 8 x 128 with 4 warps,
# the previous default (an H100 sweep of the kernel before it lost its per-tile masks and reductions)
GPU_CONFIG = (4, 256, 4)


def softcap_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab: int, cap: float,
                          grad: torch.Tensor | None = None, grad_mult: float = 1.0, block_m: int = GPU_CONFIG[0],
                          block_n: int = GPU_CONFIG[1], num_warps: int = GPU_CONFIG[2],
                          fast_tanh: bool | None = None, div: float | None = None,
                          offset: float = 0.0, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row losses (fp32, 0 where target < 0) of s = cap*tanh((logits + offset)/div) over the first `vocab`
    columns (div None: cap). |ds/dz| <= cap/div, so an FP8 gradient's scaling holds while cap <= div.
    With weights (K,) (float32, on the logits' device) targets is (M, K): a row's loss is the weighted sum of
    its K targets' losses (targets < 0 skipped), its gradient the weighted sum of theirs (multi-token
    prediction). Weights >= 0; |g| <= grad_mult x their sum, and e5m2's largest value is 1.75 x 2^15 (the
    head op halves FP8_GRAD_SCALE for weighted targets: trainer/head.py fp8_grad_scale).

    logits: (M, N_padded) with unit column stride. grad: optional (M, N_padded) output for
    grad_mult * dL_row/dz (may be `logits` itself without weights: each tile is read before it is overwritten);
    columns from `vocab` on are written as 0. Block sizes: GPU_CONFIG above. Blocks of 1-2 rows with 1024-8192
    columns and 8-32 warps, fewer rows in flight so that the second pass might find them in L2, took
    6.4-9.5 ms against 5.7 ms in a later same-run sweep.
    """
    M, n_cols = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("logits must have unit column stride")
    if grad is not None and (grad.shape != logits.shape or grad.stride(1) != 1):
        raise ValueError("grad must have the logits' shape and unit column stride")
    if weights is not None and (targets.shape != (M, weights.numel()) or not targets.is_contiguous()
                                or weights.dtype != torch.float32):
        raise ValueError("weights: (K,) float32 with targets a contiguous (M, K)")
    if weights is not None and grad is not None and grad.data_ptr() == logits.data_ptr():
        raise ValueError("grad: with weights it cannot replace the logits (the patch re-reads the targets' logits)")
    loss = torch.empty(M, dtype=torch.float32, device=logits.device)
    if M == 0:
        return loss
    _softcap_ce_kernel[(triton.cdiv(M, block_m),)](
        logits, targets, weights if weights is not None else loss, loss, grad if grad is not None else logits, M,
        logits.stride(0),
        grad.stride(0) if grad is not None else 0, float(cap), float(cap if div is None else div), float(offset),
        float(grad_mult), N=vocab, N_TOTAL=n_cols,
        FAST_TANH=logits.is_cuda if fast_tanh is None else fast_tanh, BLOCK_M=block_m, BLOCK_N=block_n,
        EVEN_M=M % block_m == 0, WRITE_GRAD=grad is not None, K=1 if weights is None else weights.numel(),
        WEIGHTED=weights is not None, num_warps=num_warps)
    return loss


def softcap_cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor, vocab: int, cap: float,
                                    div: float | None = None, offset: float = 0.0,
                                    weights: torch.Tensor | None = None):
    """Per-row losses and the unit gradient (M, N_padded) in float32 torch, for tests and the bench."""
    z = logits.float().detach().requires_grad_()
    s = cap * torch.tanh((z[:, :vocab] + offset) / (cap if div is None else div))
    if weights is None:
        loss = torch.nn.functional.cross_entropy(s, targets, ignore_index=-1, reduction="none")
    else:
        loss = sum(w * torch.nn.functional.cross_entropy(s, targets[:, k], ignore_index=-1, reduction="none")
                   for k, w in enumerate(weights.tolist()))
    loss.sum().backward()
    return loss.detach(), z.grad


@triton.jit
def _transpose_kernel(src_ptr, dst_ptr, R, C, BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = (r < R)[:, None] & (c < C)[None, :]
    tile = tl.load(src_ptr + r.to(tl.int64)[:, None] * C + c[None, :], mask=m)
    tl.store(dst_ptr + c.to(tl.int64)[:, None] * R + r[None, :], tl.trans(tile), mask=tl.trans(m))


def transpose(src: torch.Tensor, dst: torch.Tensor, block: int = 128, num_warps: int = 4) -> None:
    """dst (C, R) = src (R, C)^T, both contiguous: 1.8 ms for the 49152 x 50304 FP8 gradient on an H100
    (torch's strided copy: 18.4 ms). A separate kernel because writing G^T from inside the loss kernel lost
    on an H100 with triton 3.6, three ways: a plain store of the transposed tile miscompiles (a few bytes
    per tile left unwritten); a TMA store of it (16-64 row blocks) also wrote wrong bytes and took 8.8-16 ms
    against 7.4 ms for loss kernel + this pass; a second, 2-D tiled gradient kernel writing G and G^T took
    10.6-14 ms against the loss kernel's 3.1 ms gradient pass + this pass's 1.8 ms. Tried again on an H200
    (2026-12-03, triton 3.6): the loss kernel storing G^T beside G, at 16-64 rows by 64-256 columns and three
    ways of storing (the tile transposed before or after the e5m2 cast, or as it lies through transposed
    addresses), took 5.09-11.74 ms against 4.42 ms for loss kernel + this pass, and about a quarter of G^T's
    bytes differed from G's transpose in every way."""
    R, C = src.shape
    if dst.shape != (C, R) or not (src.is_contiguous() and dst.is_contiguous()):
        raise ValueError("transpose: dst must be contiguous with src's shape reversed")
    _transpose_kernel[(triton.cdiv(R, block), triton.cdiv(C, block))](src, dst, R, C, BLOCK=block, num_warps=num_warps)

"""Symmetric matmul for the Newton-Schulz / Polar Express iterations: alpha * X X^T (+ beta * C, C symmetric).

Each iteration of Muon's orthogonalisation (trainer/optim.py) computes A = X X^T and B = b A + c A A. Both
products are symmetric (A A = A A^T since A is), so this kernel computes only the tiles on and below the
diagonal and writes each off-diagonal tile twice, as itself and transposed. What it saves: of an m x m
output in T x T tiles, T(T+1)/2 are computed instead of T^2 (78 of 144 at m = 768 with the default 64-row
tiles: 46% fewer FLOPs in those two products), and the b A + c A A epilogue adds no pass over memory. X B then
stays a cuBLAS matmul (baddbmm, with a X folded in as its beta term).

Plain pointer loads with masks, not TMA: the first iteration reads X as a transposed view (a tall matrix is
iterated on its short side), and ragged sizes need no padding.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# (block_m, block_k, num_warps, num_stages). Not yet timed on a GPU (bench/kernels.py has the sweep rows); chosen
# from the sm_90 compiler's report (bench/kernel_resources.py): with the + beta C epilogue the 128-row tiles
# spilled 8-16 bytes a thread (triton 3.6, the GPU machines', and 3.9), 64x64 with 8 warps keeps 116-128
# registers and spills nothing.
GPU_CONFIG = (64, 64, 8, 4)
INTERPRET_CONFIG = (32, 32, 4, 1)


@triton.jit
def _gram_kernel(x_ptr, c_ptr, out_ptr, M, K, sxb, sxm, sxk, scb, scm, scn, sob, som, son, alpha, beta,
                 ADD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    t = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    # tile t of the lower triangle, counted row by row: row i holds tiles i(i+1)/2 .. i(i+1)/2 + i.
    # The float square root can land one row off near a row's edge; the two corrections put it back.
    i = ((tl.sqrt(8.0 * t + 1.0) - 1.0) * 0.5).to(tl.int32)
    i = tl.where((i + 1) * (i + 2) // 2 <= t, i + 1, i)
    i = tl.where(i * (i + 1) // 2 > t, i - 1, i)
    j = t - i * (i + 1) // 2
    rows = i * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = j * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    x = x_ptr + batch * sxb
    acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        a = tl.load(x + rows[:, None] * sxm + kk[None, :] * sxk, mask=(rows[:, None] < M) & (kk[None, :] < K),
                    other=0.0)
        b = tl.load(x + cols[None, :] * sxm + kk[:, None] * sxk, mask=(cols[None, :] < M) & (kk[:, None] < K),
                    other=0.0)
        if UPCAST:   # the interpreter's dot multiplies bf16 as raw bits; compiled code never takes this
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc)
    inside = (rows[:, None] < M) & (cols[None, :] < M)
    acc = acc * alpha
    if ADD:
        c = tl.load(c_ptr + batch * scb + rows[:, None] * scm + cols[None, :] * scn, mask=inside, other=0.0)
        acc += beta * c.to(tl.float32)
    out = acc.to(out_ptr.dtype.element_ty)
    o = out_ptr + batch * sob
    tl.store(o + rows[:, None] * som + cols[None, :] * son, out, mask=inside)
    if i != j:   # the mirror tile above the diagonal; a diagonal tile is its own mirror and is written once
        tl.store(o + cols[:, None] * som + rows[None, :] * son, tl.trans(out),
                 mask=(cols[:, None] < M) & (rows[None, :] < M))


def gram(x: torch.Tensor, add: torch.Tensor | None = None, alpha: float = 1.0, beta: float = 0.0,
         out: torch.Tensor | None = None, config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """alpha * x @ x^T + beta * add for x (..., m, k) in any strides; add (..., m, m) must be symmetric (only
    its lower tiles are read). Returns (..., m, m) in x's dtype, or writes into `out`. fp32 accumulation."""
    if x.dim() < 2:
        raise ValueError(f"gram: x must have at least 2 dims (got shape {tuple(x.shape)})")
    m, k = x.shape[-2:]
    lead = x.shape[:-2]
    if add is not None and (add.shape != (*lead, m, m)):
        raise ValueError(f"gram: add is {tuple(add.shape)}, the output {(*lead, m, m)}")
    if out is None:
        out = torch.empty((*lead, m, m), dtype=x.dtype, device=x.device)
    elif out.shape != (*lead, m, m) or out.dtype != x.dtype:
        raise ValueError(f"gram: out is {tuple(out.shape)} {out.dtype}, the output {(*lead, m, m)} {x.dtype}")
    if m == 0 or out.numel() == 0:
        return out
    block_m, block_k, warps, stages = config or (INTERPRET_CONFIG if INTERPRET else GPU_CONFIG)
    x3 = x.reshape(-1, m, k)              # a view for the stacks Muon passes (contiguous or one transpose)
    o3 = out.view(-1, m, m)
    c3 = add.reshape(-1, m, m) if add is not None else o3
    tiles = triton.cdiv(m, block_m)
    grid = (tiles * (tiles + 1) // 2, x3.size(0))
    _gram_kernel[grid](x3, c3, o3, m, k, *x3.stride(), *c3.stride(), *o3.stride(), float(alpha), float(beta),
                       ADD=add is not None, BLOCK_M=block_m, BLOCK_K=block_k, UPCAST=INTERPRET, num_warps=warps,
                       num_stages=stages)
    return out


def gram_reference(x: torch.Tensor, add: torch.Tensor | None = None, alpha: float = 1.0,
                   beta: float = 0.0) -> torch.Tensor:
    """The same math in plain torch, the two full products Muon ran before this kernel."""
    p = alpha * (x @ x.mT)
    return p if add is None else p + beta * add

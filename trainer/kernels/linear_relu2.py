"""The ReLU^2 MLP with relu^2 folded into matmul epilogues: y = relu(x @ w_fc.T)^2 @ w_proj.T.

Forward: one Triton matmul computes x @ w_fc.T and writes h = relu(pre)^2 straight from its fp32
accumulator, so the (tokens x hidden) pre-activation is never written, read back and squared by a
separate pointwise kernel. Backward: the matmul that produces grad_h = grad_y @ w_proj multiplies by
the relu^2 derivative 2*relu(pre) in its epilogue, so grad_h never reaches memory either. The other
four matmuls (y = h @ w_proj.T, grad_x, both weight grads) stay in cuBLAS.
Measured on an H100 (bench/kernels.py, 49152 tokens x 768 -> 3072 -> 768, per call, against the same math
under torch.compile): the MLP forward 0.850 -> 0.719 ms, 12.5 ms per optimizer step (12 layers x 8
micro-batches); forward+backward 2.549 -> 2.413 ms, 13.1 ms per step, so the backward only breaks even: the
fused backward matmul (~0.53 ms) costs what cuBLAS (0.33 ms) plus inductor's pointwise pass take, because
its epilogue's read of h is not hidden behind the main loop. The forward matmul runs at 0.85x cuBLAS (0.384
vs 0.325 ms without relu^2). Those figures predate the 128x128 backward tile (0-5% faster in sweeps).

`mlp_relu2` is a torch.library custom op (namespace `speedrun`) with its own backward op, so
torch.compile keeps both as opaque calls instead of tracing into the Triton launches.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _matmul_relu2_kernel(a_ptr, b_ptr, c_ptr, h_ptr, M, N, K: tl.constexpr,
                         stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_hm, stride_hn,
                         BACKWARD: tl.constexpr, INTERPRET: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """c = epilogue(a @ b) for a (M, K), b (K, N) given by strides, fp32 accumulation.

    BACKWARD=False: c = relu(acc)^2.  BACKWARD=True: c = acc * 2*sqrt(h), h = relu(pre)^2 of the forward.
    """
    # grouped ordering: GROUP_M row-blocks sweep the column-blocks together, so their b tiles stay in L2
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # rows/cols past the edge wrap onto valid ones, so the main loop's loads need no M/N mask; the store masks
    rows_in = rows % M
    cols_in = cols % N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows_in[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + ks[:, None] * stride_bk + cols_in[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k0
            a = tl.load(a_ptrs, mask=ks[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=ks[:, None] < k_left, other=0.0)
        if INTERPRET:   # the interpreter's dot multiplies bf16 as raw uint16 bits; compiled code never takes this
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # int64 offsets in the epilogue: tokens x hidden passes 2^31 elements at a few micro-batches' worth of rows
    rows64 = rows.to(tl.int64)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    if BACKWARD:
        h = tl.load(h_ptr + rows64[:, None] * stride_hm + cols[None, :] * stride_hn, mask=mask, other=0.0)
        out = acc * (2.0 * tl.sqrt(h.to(tl.float32)))
    else:
        r = tl.maximum(acc, 0.0)
        out = r * r
    tl.store(c_ptr + rows64[:, None] * stride_cm + cols[None, :] * stride_cn, out.to(c_ptr.dtype.element_ty),
             mask=mask)


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages), picked by a sweep on an H100 at the record's
# shapes (K = 768). Forward: a 128x256 tile, 8 warps (two warpgroups issuing wgmma), 3 stages of 64-deep K
# tiles (147 KB of shared memory, one program per SM). Backward: 128x128 with 4 warps, two programs per SM
# so one's epilogue (it reads an h tile) may overlap the other's main loop: 3-5% faster than 128x256 in one
# sweep, within 1% in a repeat; loading h before the main loop was slower (registers). The interpreter gets
# small tiles so the tests' small shapes still cover several programs, the grouped ordering and ragged edges.
GPU_FWD_CONFIG = (128, 256, 64, 8, 8, 3)
GPU_BWD_CONFIG = (128, 128, 64, 8, 4, 3)
INTERPRET_CONFIG = (32, 64, 32, 2, 4, 1)


def matmul_relu2(a: torch.Tensor, b: torch.Tensor, h: torch.Tensor | None = None,
                 config: tuple | None = None) -> torch.Tensor:
    """relu(a @ b)^2, or with h given, (a @ b) * 2*sqrt(h). a (M, K), b (K, N) any strides; out (M, N) in a's dtype."""
    M, K = a.shape
    K2, N = b.shape
    assert K == K2 and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
    bm, bn, bk, group, warps, stages = config or (
        INTERPRET_CONFIG if INTERPRET else GPU_FWD_CONFIG if h is None else GPU_BWD_CONFIG)
    c = torch.empty((M, N), device=a.device, dtype=a.dtype)
    if M == 0 or N == 0:
        return c
    aux = h if h is not None else c   # unread in the forward; any pointer will do
    if h is not None:
        assert h.shape == (M, N), (h.shape, (M, N))
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _matmul_relu2_kernel[grid](a, b, c, aux, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                               c.stride(0), c.stride(1), aux.stride(0), aux.stride(1),
                               BACKWARD=h is not None, INTERPRET=INTERPRET, EVEN_K=K % bk == 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                               GROUP_M=group, num_warps=warps, num_stages=stages)
    return c


# The forward keeps h (needed anyway: grad_w_proj = grad_y.T @ h) and the backward reads relu(pre) back as
# sqrt(h): no pre tensor is written (tokens x hidden bf16, ~300 MB per layer at the record's shapes), no
# matmul is recomputed, and sqrt of a bf16 h is as accurate as a bf16 pre (half of h's relative error).
@torch.library.custom_op("speedrun::mlp_relu2_fwd", mutates_args=())
def _mlp_fwd(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x2 = x.reshape(-1, x.size(-1))
    h = matmul_relu2(x2, w_fc.to(x.dtype).t())
    y = h @ w_proj.to(x.dtype).t()
    return y.view(*x.shape[:-1], -1), h.view(*x.shape[:-1], -1)


@_mlp_fwd.register_fake
def _(x, w_fc, w_proj):
    lead = x.shape[:-1]
    return x.new_empty((*lead, w_proj.size(0))), x.new_empty((*lead, w_fc.size(0)))


@torch.library.custom_op("speedrun::mlp_relu2_bwd", mutates_args=())
def _mlp_bwd(grad_y: torch.Tensor, x: torch.Tensor, h: torch.Tensor, w_fc: torch.Tensor,
             w_proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dt = x.dtype
    x2, h2 = x.reshape(-1, x.size(-1)), h.reshape(-1, h.size(-1))
    g2 = grad_y.reshape(-1, grad_y.size(-1)).to(dt)
    w_fc_c, w_proj_c = w_fc.to(dt), w_proj.to(dt)
    grad_pre = matmul_relu2(g2, w_proj_c, h=h2)   # grad_y @ w_proj, times 2*relu(pre)
    grad_x = grad_pre @ w_fc_c
    grad_w_fc = (grad_pre.t() @ x2).to(w_fc.dtype)     # bf16 matmul like the unfused path, then the param dtype
    grad_w_proj = (g2.t() @ h2).to(w_proj.dtype)
    return grad_x.view(x.shape), grad_w_fc, grad_w_proj


@_mlp_bwd.register_fake
def _(grad_y, x, h, w_fc, w_proj):
    return torch.empty_like(x), torch.empty_like(w_fc), torch.empty_like(w_proj)


def _setup_context(ctx, inputs, output):
    x, w_fc, w_proj = inputs
    ctx.save_for_backward(x, output[1], w_fc, w_proj)


def _backward(ctx, grad_y, grad_h):
    # grad_h is always None/zero: mlp_relu2 below hands out y only, h is the backward's saved activation
    x, h, w_fc, w_proj = ctx.saved_tensors
    return _mlp_bwd(grad_y, x, h, w_fc, w_proj)


_mlp_fwd.register_autograd(_backward, setup_context=_setup_context)


def mlp_relu2(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor) -> torch.Tensor:
    """relu(x @ w_fc.T)^2 @ w_proj.T with x (..., dim) bf16 and the weights in any float dtype (cast at use);
    weight gradients come back in the weights' dtype."""
    return _mlp_fwd(x, w_fc, w_proj)[0]


def mlp_relu2_reference(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor) -> torch.Tensor:
    """The same math in plain torch (the model's unfused MLP)."""
    return F.linear(F.relu(F.linear(x, w_fc.to(x.dtype))).square(), w_proj.to(x.dtype))

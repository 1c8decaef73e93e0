"""The ReLU^2 MLP with relu^2 folded into matmul epilogues: y = relu(x @ w_fc.T)^2 @ w_proj.T.

Forward: one Triton matmul computes x @ w_fc.T and writes h = relu(pre)^2 straight from its fp32
accumulator, so the (tokens x hidden) pre-activation is never written, read back and squared by a
separate pointwise kernel. Backward: the matmul that produces grad_h = grad_y @ w_proj multiplies by
the relu^2 derivative 2*relu(pre) in its epilogue, so grad_h never reaches memory either. The other
four matmuls (y = h @ w_proj.T, grad_x, both weight grads) stay in cuBLAS.

The kernel is persistent (one program per SM walks the output tiles), loads its operands with the
Hopper tensor-copy engine (TMA descriptors) and lets Triton warp-specialise the loop, so one tile's
epilogue overlaps the next tile's loads. That matters here: K is only 768, a tile's main loop is 12
steps long, and the epilogue (writing h, or reading h back) is a large part of each tile.

FP8 (`fp8="forward"`, `"grad_h"` or `"all"`): the same kernel takes e4m3/e5m2 operands and a scale. The
forward's x is rms-normed (|x| <= sqrt(dim), a fixed e4m3 scale) and w_fc is scaled by its amax; the
up-projection's epilogue also writes h in e4m3 (scaled by a bound, see mlp_relu2) for cuBLAS's FP8
down-projection. Under "grad_h" the backward's grad_y is scaled by its amax into e5m2 and w_proj into e4m3.
Under "all" the grad_h kernel's epilogue also writes grad_pre in e5m2 (scaled by a bound, see _backward)
for cuBLAS's FP8 grad_x = grad_pre @ w_fc. The casts run in the caller's compiled graph (fused into the
kernels that produce x and grad_y), not here. Weight gradients stay bf16: their operands would need
transposed FP8 copies.
bench/kernels.py has the timings against cuBLAS and the torch code.

`mlp_relu2` is a torch.library custom op (namespace `speedrun`) with its own backward op, so
torch.compile keeps both as opaque calls instead of tracing into the Triton launches.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from trainer.config_rules import MLP_FP8_MODES
from trainer.fp8 import E4M3, E4M3_MAX, E5M2, E5M2_MAX, activation_to_fp8, to_fp8, weight_to_fp8

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _tile(tile, a_desc, b_desc, c_desc, h_desc, o8_desc, scale, out8_inv, num_m, num_n, K: tl.constexpr,
          BACKWARD: tl.constexpr, OUT8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SPLIT: tl.constexpr, H_EARLY: tl.constexpr,
          UPCAST: tl.constexpr):
    """One output tile: acc = scale * a[rows] @ b[cols].T over all of K, then the epilogue and the store.
    H_EARLY (backward): when h is loaded, 0 just before each epilogue half uses it, 1 both halves at the
    epilogue's start (their loads overlap), 2 before the main loop (its latency hides behind the matmul, at
    the price of h's registers held through it)."""
    # grouped ordering: GROUP_M row-blocks sweep the column-blocks together, so their b tiles stay in L2
    in_group = GROUP_M * num_n
    first_m = (tile // in_group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    off_m = (first_m + (tile % in_group) % group_m) * BLOCK_M
    off_n = ((tile % in_group) // group_m) * BLOCK_N
    HALF: tl.constexpr = BLOCK_N // 2 if SPLIT else BLOCK_N
    h0 = None
    h1 = None
    if BACKWARD and H_EARLY == 2:
        h0 = h_desc.load([off_m, off_n])
        if SPLIT:
            h1 = h_desc.load([off_m, off_n + HALF])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):   # TMA zero-fills reads past M, N and K: no masks
        a = a_desc.load([off_m, k0])
        b = b_desc.load([off_n, k0])
        if UPCAST:   # the interpreter's dot multiplies bf16 as raw bits; compiled code never takes this
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b.T, acc)
    acc = acc * scale
    if BACKWARD and H_EARLY == 1:
        h0 = h_desc.load([off_m, off_n])
        if SPLIT:
            h1 = h_desc.load([off_m, off_n + HALF])
    # SPLIT: the epilogue in two column halves, so a 128x256 tile's h and output buffers fit beside the
    # pipeline's shared memory (stores past M or N are dropped by TMA)
    if SPLIT:
        acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))
        if BACKWARD and H_EARLY == 0:
            h0 = h_desc.load([off_m, off_n])
        _epilogue(acc0, h0, c_desc, o8_desc, out8_inv, off_m, off_n, BACKWARD, OUT8)
        if BACKWARD and H_EARLY == 0:
            h1 = h_desc.load([off_m, off_n + HALF])
        _epilogue(acc1, h1, c_desc, o8_desc, out8_inv, off_m, off_n + HALF, BACKWARD, OUT8)
    else:
        if BACKWARD and H_EARLY == 0:
            h0 = h_desc.load([off_m, off_n])
        _epilogue(acc, h0, c_desc, o8_desc, out8_inv, off_m, off_n, BACKWARD, OUT8)


@triton.jit
def _epilogue(acc, h, c_desc, o8_desc, out8_inv, off_m, off_n, BACKWARD: tl.constexpr, OUT8: tl.constexpr):
    """The forward writes h = relu(acc)^2, the backward (given h's tile) writes acc * 2*sqrt(h).
    OUT8: the output also goes to o8_desc times out8_inv, saturating: the forward's h in e4m3 (>= 0), the
    backward's grad_pre in e5m2."""
    if BACKWARD:   # grad_pre = grad_h * 2*relu(pre), and relu(pre) = sqrt(h)
        out = acc * (2.0 * tl.sqrt(h.to(tl.float32)))
        if OUT8:
            o8_desc.store([off_m, off_n], tl.clamp(out * out8_inv, -57344.0, 57344.0).to(o8_desc.dtype))
    else:
        r = tl.maximum(acc, 0.0)
        out = r * r
        if OUT8:
            o8_desc.store([off_m, off_n], tl.minimum(out * out8_inv, 448.0).to(o8_desc.dtype))
    c_desc.store([off_m, off_n], out.to(c_desc.dtype))


@triton.jit
def _matmul_relu2_kernel(a_desc, b_desc, c_desc, h_desc, o8_desc, scale_ptr, M, N, num_tiles, K: tl.constexpr,
                         BACKWARD: tl.constexpr, SCALED: tl.constexpr, OUT8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SPLIT: tl.constexpr, H_EARLY: tl.constexpr,
                         WARP_SPECIALIZE: tl.constexpr, PROGRAMS: tl.constexpr, INTERPRET: tl.constexpr,
                         TILES_PER_PROGRAM: tl.constexpr):
    """c = epilogue(scale * a @ b.T), a (M, K) and b (N, K) K-contiguous; program p takes tiles p, p+PROGRAMS, ...

    BACKWARD=False: c = relu(acc)^2.  BACKWARD=True: c = acc * 2*sqrt(h), h = relu(pre)^2 of the forward.
    h_desc (backward only) and o8_desc (OUT8 only) are None otherwise.
    """
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    scale = 1.0
    out8_inv = 1.0
    if SCALED:   # scale_ptr[0]: the product of a's and b's scales; scale_ptr[1]: 1 / the FP8 output's scale
        scale = tl.load(scale_ptr)
        if OUT8:
            out8_inv = tl.load(scale_ptr + 1)
    if INTERPRET:   # the interpreter takes no run-time loop bounds
        for i in range(TILES_PER_PROGRAM):
            tile = tl.program_id(0) + i * PROGRAMS
            if tile < num_tiles:
                _tile(tile, a_desc, b_desc, c_desc, h_desc, o8_desc, scale, out8_inv, num_m, num_n, K, BACKWARD, OUT8,
                      BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SPLIT, H_EARLY, True)
    else:
        for tile in tl.range(tl.program_id(0), num_tiles, PROGRAMS, flatten=True, warp_specialize=WARP_SPECIALIZE):
            _tile(tile, a_desc, b_desc, c_desc, h_desc, o8_desc, scale, out8_inv, num_m, num_n, K, BACKWARD, OUT8,
                  BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SPLIT, H_EARLY, False)


class Tiles(NamedTuple):
    """A launch configuration of _matmul_relu2_kernel."""
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    warps: int
    stages: int
    split: bool               # the epilogue in two column halves
    warp_specialize: bool
    h_early: int = 0          # the backward's H_EARLY (see _tile)
    per_sm: int = 1           # persistent programs per SM (2: one program's epilogue beside another's matmul)


# Tiles by (backward, FP8, FP8 second output), the fastest of one-off sweeps on an H100 at the record's
# shapes (49152 x 768 -> 3072; those sweep scripts were not kept, bench/kernels.py times the chosen configs):
# 128x256 tiles with two warpgroups; FP8 takes 128-deep K steps (same bytes). An unsplit 128x256 backward
# epilogue does not fit in shared memory beside 3 stages. The FP8 kernels with both outputs, as the trainer
# runs them, were swept again on an H200 by bench/tile_sweep.py (2026-11-29): loading both halves of h at
# the backward epilogue's start took 0.348 ms against 0.372; warp specialisation added nothing (0.348 with
# it too); 128x128 tiles (two programs per SM or 4 stages) and h loaded before the main loop were 1.00-1.27x
# slower than the old order.
GPU_CONFIGS = {k: Tiles(*v) for k, v in {
    (False, False, False): (128, 256, 64, 8, 8, 3, False, True),    # bf16 forward: 0.357 ms (cuBLAS alone 0.330)
    (True, False, False): (128, 256, 64, 8, 8, 3, True, True),      # bf16 backward: 0.461 ms
    (False, True, False): (128, 256, 128, 8, 8, 3, True, True),     # FP8 forward (4 stages: 0.221 ms, but
    (False, True, True): (128, 256, 128, 8, 8, 3, True, True),      # with the e4m3 h, 0.225 ms, its store
                                                                    # buffer leaves no room for them)
    (True, True, False): (128, 256, 128, 8, 8, 3, True, False),     # FP8 backward: 0.333 ms
    (True, True, True): (128, 256, 128, 8, 8, 3, True, False, 1),   # with the e5m2 grad_pre, h loaded late: H100
                                                                    # 0.408 ms (0.344 without that output);
                                                                    # H200 0.372, and 0.348 as set here
}.items()}
# small tiles under the interpreter, so the tests' small shapes still cover several tiles per program,
# the grouped ordering and ragged edges
INTERPRET_CONFIG = Tiles(32, 64, 32, 2, 4, 1, True, False)


def matmul_relu2(a: torch.Tensor, b: torch.Tensor, h: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                 out8: torch.Tensor | None = None, config: tuple | None = None,
                 programs: int | None = None) -> torch.Tensor:
    """relu(s * a @ b.T)^2, or with h given, (s * a @ b.T) * 2*sqrt(h); bf16 (M, N) out.

    a (M, K) and b (N, K), both with K contiguous and 16-byte aligned rows (TMA); bf16, or FP8 with
    `scale`: fp32 [the product of a's and b's scales, 1 / out8's scale]. out8: an (M, N) FP8 tensor the
    output also goes into, divided by its scale and saturated: e4m3 for the forward, e5m2 for the backward.
    programs: the persistent grid's size (default: the GPU's SM count).
    """
    M, K = a.shape
    N, K2 = b.shape
    if K != K2 or (a.dtype == torch.bfloat16) != (b.dtype == torch.bfloat16):
        raise ValueError(f"matmul_relu2: a {tuple(a.shape)} {a.dtype} and b {tuple(b.shape)} {b.dtype} do not "
                         "match (b is (N, K); both bf16 or both FP8)")
    for name, t in (("a", a), ("b", b), ("h", h)):
        if t is not None and (t.stride(-1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16):
            raise ValueError(f"matmul_relu2: {name} needs a unit last stride and 16-byte aligned rows (TMA)")
    fp8 = a.dtype != torch.bfloat16
    if fp8 != (scale is not None):
        raise ValueError("matmul_relu2: FP8 operands take a scale, bf16 ones none")
    if out8 is not None and (not fp8 or out8.shape != (M, N) or out8.dtype != (E4M3 if h is None else E5M2)
                             or scale.numel() < 2):
        raise ValueError("matmul_relu2: out8 is an FP8 kernel's second (M, N) output, e4m3 in the forward and e5m2 "
                         "in the backward, with 1 / its scale in scale[1]")
    chosen = Tiles(*config) if config is not None else (
        INTERPRET_CONFIG if INTERPRET else GPU_CONFIGS[(h is not None, fp8, out8 is not None)])
    bm, bn, bk, group, warps, stages, split, ws, h_early, per_sm = chosen
    c = torch.empty((M, N), device=a.device, dtype=torch.bfloat16)
    if (N * c.element_size()) % 16:
        raise ValueError(f"matmul_relu2: N={N} must be a multiple of 8 (16-byte rows of bf16 output for TMA)")
    if M == 0 or N == 0:
        return c
    if h is not None and h.shape != (M, N):
        raise ValueError(f"matmul_relu2: h is {tuple(h.shape)}, the output {(M, N)}")
    sub_n = bn // 2 if split else bn
    descs = [TensorDescriptor.from_tensor(t, block) if t is not None else None
             for t, block in ((a, [bm, bk]), (b, [bn, bk]), (c, [bm, sub_n]), (h, [bm, sub_n]), (out8, [bm, sub_n]))]
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    if programs is None:
        programs = (4 if INTERPRET else torch.cuda.get_device_properties(a.device).multi_processor_count) * per_sm
    programs = min(programs, tiles)
    _matmul_relu2_kernel[(programs,)](
        *descs, scale if scale is not None else c, M, N, tiles, K, BACKWARD=h is not None, SCALED=fp8,
        OUT8=out8 is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group, SPLIT=split, H_EARLY=h_early,
        WARP_SPECIALIZE=ws, PROGRAMS=programs, INTERPRET=INTERPRET, TILES_PER_PROGRAM=triton.cdiv(tiles, programs),
        num_warps=warps, num_stages=stages)
    return c


# The forward keeps h (needed anyway: grad_w_proj = grad_y.T @ h) and the backward reads relu(pre) back as
# sqrt(h): no pre tensor is written (tokens x hidden bf16, ~300 MB per layer at the record's shapes), no
# matmul is recomputed, and sqrt of a bf16 h is as accurate as a bf16 pre (half of h's relative error).
@torch.library.custom_op("speedrun::mlp_relu2_fwd", mutates_args=())
def _mlp_fwd(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor, x8: torch.Tensor | None,
             w_fc8: torch.Tensor | None, w_proj8: torch.Tensor | None, scales: torch.Tensor | None,
             h_scale: torch.Tensor | None, proj_scale: torch.Tensor | None,
             fp8: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x8, w_fc8, w_proj8 and their scales: the FP8 forward's operands (the caller casts them, see
    mlp_relu2), or all None for bf16. scales: [x's times w_fc's, 1 / h_scale] for the kernel; h_scale and
    proj_scale are separate 0-d tensors since cuBLAS wants its scale pointers aligned. fp8: mlp_relu2's
    mode, read by the autograd formula for the backward's matmuls."""
    x2 = x.reshape(-1, x.size(-1))
    if x8 is not None:
        h8 = torch.empty((x2.size(0), w_fc.size(0)), dtype=E4M3, device=x.device)
        h = matmul_relu2(x8.reshape(-1, x8.size(-1)), w_fc8, scale=scales, out8=h8)
        y = torch._scaled_mm(h8, w_proj8.t(), scale_a=h_scale, scale_b=proj_scale, out_dtype=x.dtype,
                             use_fast_accum=True)
    else:
        h = matmul_relu2(x2, w_fc.to(x.dtype))
        y = h @ w_proj.to(x.dtype).t()
    return y.view(*x.shape[:-1], -1), h.view(*x.shape[:-1], -1)


@_mlp_fwd.register_fake
def _(x, w_fc, w_proj, x8, w_fc8, w_proj8, scales, h_scale, proj_scale, fp8):
    lead = x.shape[:-1]
    return x.new_empty((*lead, w_proj.size(0))), x.new_empty((*lead, w_fc.size(0)))


@torch.library.custom_op("speedrun::mlp_relu2_bwd", mutates_args=())
def _mlp_bwd(grad_y: torch.Tensor, x: torch.Tensor, h: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor,
             g8: torch.Tensor | None, w_proj8_t: torch.Tensor | None, scale: torch.Tensor | None,
             w_fc8_t: torch.Tensor | None, pre_scale: torch.Tensor | None,
             fc_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The FP8 operands, cast by the caller (see _backward), or None for bf16: g8, w_proj8_t for the grad_h
    matmul, with scale [g8's times w_proj8_t's, and with w_fc8_t 1 / pre_scale]; w_fc8_t (w_fc's e4m3
    transpose), pre_scale (the e5m2 grad_pre's) and fc_scale for an FP8 grad_x."""
    dt = x.dtype
    x2, h2 = x.reshape(-1, x.size(-1)), h.reshape(-1, h.size(-1))
    g2 = grad_y.reshape(-1, grad_y.size(-1)).to(dt)
    pre8 = None
    if g8 is not None:
        if w_fc8_t is not None:
            pre8 = torch.empty(h2.shape, dtype=E5M2, device=h.device)
        grad_pre = matmul_relu2(g8.reshape(-1, g8.size(-1)), w_proj8_t, h=h2, scale=scale, out8=pre8)
    else:   # grad_y @ w_proj, times 2*relu(pre)
        grad_pre = matmul_relu2(g2, w_proj.t().to(dt).contiguous(), h=h2)
    if pre8 is not None:   # _scaled_mm wants a row-major first operand and a column-major second one
        grad_x = torch._scaled_mm(pre8, w_fc8_t.t(), scale_a=pre_scale, scale_b=fc_scale, out_dtype=dt)
    else:
        grad_x = grad_pre @ w_fc.to(dt)
    grad_w_fc = (grad_pre.t() @ x2).to(w_fc.dtype)     # bf16 matmul like the unfused path, then the param dtype
    grad_w_proj = (g2.t() @ h2).to(w_proj.dtype)
    return grad_x.view(x.shape), grad_w_fc, grad_w_proj


@_mlp_bwd.register_fake
def _(grad_y, x, h, w_fc, w_proj, g8, w_proj8_t, scale, w_fc8_t, pre_scale, fc_scale):
    return torch.empty_like(x), torch.empty_like(w_fc), torch.empty_like(w_proj)


def _setup_context(ctx, inputs, output):
    x, w_fc, w_proj = inputs[:3]
    ctx.fp8 = inputs[9]
    ctx.save_for_backward(x, output[1], w_fc, w_proj)


def h_scale(w_fc: torch.Tensor) -> torch.Tensor:
    """The e4m3 scale of h = relu(x @ w_fc.T)^2 for rms-normed x, from its bound (see mlp_relu2)."""
    return (w_fc.size(1) * w_fc.detach().float().square().sum(dim=1).amax() / E4M3_MAX).clamp(min=1e-30)


def grad_pre_scale(g_max: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor) -> torch.Tensor:
    """The e5m2 scale of grad_pre from its bound (see _backward), g_max the largest |grad_y|."""
    w_proj_d, w_fc_d = w_proj.detach().float(), w_fc.detach().float()
    bound = (2 * w_fc.size(1) * g_max * w_proj_d.square().sum(dim=0).amax().sqrt()
             * w_fc_d.square().sum(dim=1).amax().sqrt())
    return (bound / E5M2_MAX).clamp(min=1e-30)


def _backward(ctx, grad_y, grad_h):
    # grad_h is always None/zero: mlp_relu2 below hands out y only, h is the backward's saved activation.
    # This function is traced into the compiled backward graph, so the FP8 casts below fuse with the
    # kernel that produces grad_y; the op that follows is opaque.
    x, h, w_fc, w_proj = ctx.saved_tensors
    g8 = w8_t = scale = fc8_t = pre_s = fc_s = None
    if ctx.fp8 in ("grad_h", "all"):
        g = grad_y.detach()
        g_max = g.abs().amax().float()
        g_s = (g_max / E5M2_MAX).clamp(min=1e-30)
        g8 = to_fp8(g, g_s.reciprocal(), E5M2, E5M2_MAX)
        w8, w_s = weight_to_fp8(w_proj)
        w8_t = w8.t().contiguous()
        scale = g_s * w_s
        if ctx.fp8 == "all":
            # grad_pre's e5m2 scale from a bound, like h's in mlp_relu2: |grad_h_ij| = |g_i . w_proj[:, j]|
            # <= sqrt(dim) g_max |w_proj[:, j]| and relu(pre_ij) <= sqrt(dim) |w_fc[j]|, so |grad_pre| =
            # |grad_h * 2 relu(pre)| <= 2 dim g_max max_j |w_proj[:, j]| max_j |w_fc[j]|. Loose by some
            # binades, of e5m2's 32; out-of-bound values (FP8 rounding of g and w_proj) saturate.
            pre_s = grad_pre_scale(g_max, w_fc, w_proj)
            scale = torch.stack([scale, pre_s.reciprocal()])
            fc8, fc_s = weight_to_fp8(w_fc)
            fc8_t = fc8.t().contiguous()
    grads = torch.ops.speedrun.mlp_relu2_bwd(grad_y, x, h, w_fc, w_proj, g8, w8_t, scale, fc8_t, pre_s, fc_s)
    return (*grads, None, None, None, None, None, None, None)


_mlp_fwd.register_autograd(_backward, setup_context=_setup_context)


def mlp_relu2(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor, fp8: str = "none") -> torch.Tensor:
    """relu(x @ w_fc.T)^2 @ w_proj.T with x (..., dim) bf16 and the weights in any float dtype (cast at use);
    weight gradients come back in the weights' dtype. fp8: "none", "forward" (both forward matmuls in FP8;
    x must be rms-normed), "grad_h" (also the backward's grad_h matmul) or "all" (also grad_x); FP8 needs
    a Hopper GPU.

    FP8 scales: x by its fixed bound sqrt(dim), each weight by its amax, and h = relu(pre)^2 by a bound too:
    |pre_j| <= |x| |w_fc[j]| = sqrt(dim) |w_fc[j]| for rms-normed x, so h <= dim * max_j |w_fc[j]|^2. No
    pass over h is needed to scale it; the price is a few of e4m3's 17 binades of range."""
    if fp8 not in MLP_FP8_MODES:
        raise ValueError(f"mlp_relu2: fp8 must be one of {MLP_FP8_MODES} (got {fp8!r})")
    if fp8 == "none":
        return torch.ops.speedrun.mlp_relu2_fwd(x, w_fc, w_proj, None, None, None, None, None, None, fp8)[0]
    with torch.no_grad():   # straight-through: the backward differentiates the bf16 math
        x8, x_s = activation_to_fp8(x)
        w_fc8, fc_s = weight_to_fp8(w_fc)
        w_proj8, proj_s = weight_to_fp8(w_proj)
        h_s = h_scale(w_fc)
        scales = torch.stack([fc_s * x_s, h_s.reciprocal()]).float()
    return torch.ops.speedrun.mlp_relu2_fwd(x, w_fc, w_proj, x8, w_fc8, w_proj8, scales, h_s.float(), proj_s, fp8)[0]


def mlp_relu2_reference(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor) -> torch.Tensor:
    """The same math in plain torch (the model's unfused MLP)."""
    return F.linear(F.relu(F.linear(x, w_fc.to(x.dtype))).square(), w_proj.to(x.dtype))

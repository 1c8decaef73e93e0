"""The attention's work between its q, k, v projection and FlexAttention, forward and backward, one Triton
kernel each way: q and k rms-normed and rotated (rotary on half of each head's dimensions), v mixed with
the value embedding (v = lambdas[0] * v + lambdas[1] * ve).

Why by hand: inductor's kernels for this ran at about half of copy bandwidth in the trainer's H200 profile
(forward 0.151 ms, backward 0.200 ms a call, against ~0.07 and ~0.105 ms for their bytes), the largest
pointwise work of a step after the loss. One pass reads qkv (and ve) once and writes q, k, v; the backward
reads the three gradients as FlexAttention leaves them (any token and head strides), and writes the whole
gradient of qkv, so nothing stacks the three afterwards. In the trainer (H200, same run, 2026-11-30) these two
kernels' 32.9 ms/step replaced 50.2 ms/step of inductor's kernels, with the value mix and the lambdas'
gradient reductions it had spread over others; the step went from 594.0 to 578.5 ms.

The math matches trainer/layers.py's torch path: rms-norm with float32's epsilon (torch's default), the
rotary tables in the activation dtype (the model rounds cos and sin to it), everything else in float32
and rounded once at the store. `attn_prep` is a torch.library custom op with its own backward op, so
torch.compile keeps both as opaque calls.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
EPS = 1.1920928955078125e-07   # torch.finfo(torch.float32).eps: what F.rms_norm uses without eps, bf16 too
BLOCK_T, WARPS = 32, 4   # tokens per program (one head each); H200 (bench/kernels.py): 0.369 ms of GPU
# time fwd+bwd, against 0.375 (16 tokens, 4 warps), 0.383 (64, 4), 0.370 (64, 8), 0.401 (128, 8)


@triton.jit
def _angles(cos, sin, rows, mask, cols, T, D: tl.constexpr):
    """The rotary tables' cos and sin for BLOCK_T rows, token n at position n % T."""
    table = (rows % T)[:, None] * (D // 2) + cols[None, :]
    c = tl.load(cos + table, mask=mask[:, None], other=0.0).to(tl.float32)
    s = tl.load(sin + table, mask=mask[:, None], other=0.0).to(tl.float32)
    return c, s


@triton.jit
def _norm_rotary(src, dst, rows, mask, cols, c, s, src_stride, dst_stride, D: tl.constexpr, EPS: tl.constexpr):
    """rotary(rms_norm(x)) for BLOCK_T rows of one head: x's halves (x1, x2) rotate as pairs by the angles
    whose cos and sin are c and s."""
    ptr = src + rows[:, None] * src_stride + cols[None, :]
    x1 = tl.load(ptr, mask=mask[:, None], other=0.0).to(tl.float32)
    x2 = tl.load(ptr + D // 2, mask=mask[:, None], other=0.0).to(tl.float32)
    r = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / D + EPS)[:, None]
    y1, y2 = x1 * r, x2 * r
    out = dst + rows[:, None] * dst_stride + cols[None, :]
    tl.store(out, (y1 * c + y2 * s).to(dst.dtype.element_ty), mask=mask[:, None])
    tl.store(out + D // 2, (y2 * c - y1 * s).to(dst.dtype.element_ty), mask=mask[:, None])


@triton.jit
def _attn_prep_fwd_kernel(qkv, ve, lambdas, cos, sin, q, k, v, N, T, H: tl.constexpr, D: tl.constexpr,
                          HAS_VE: tl.constexpr, BLOCK_T: tl.constexpr, EPS: tl.constexpr):
    """Program (i, h): tokens [i*BLOCK_T, (i+1)*BLOCK_T) of head h. qkv (N, 3, H, D) contiguous; q, k, v
    (N, H, D) contiguous; cos, sin (T, D/2), token n at position n % T."""
    h = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = rows < N
    cols = tl.arange(0, D // 2)
    c, s = _angles(cos, sin, rows, mask, cols, T, D)
    _norm_rotary(qkv + h * D, q + h * D, rows, mask, cols, c, s, 3 * H * D, H * D, D, EPS)
    _norm_rotary(qkv + (H + h) * D, k + h * D, rows, mask, cols, c, s, 3 * H * D, H * D, D, EPS)
    full = tl.arange(0, D)
    src = qkv + (2 * H + h) * D + rows[:, None] * (3 * H * D) + full[None, :]
    out = rows[:, None] * (H * D) + h * D + full[None, :]
    val = tl.load(lambdas).to(tl.float32) * tl.load(src, mask=mask[:, None], other=0.0).to(tl.float32)
    if HAS_VE:
        e = tl.load(ve + out, mask=mask[:, None], other=0.0).to(tl.float32)
        val += tl.load(lambdas + 1).to(tl.float32) * e
    tl.store(v + out, val.to(v.dtype.element_ty), mask=mask[:, None])


@triton.jit
def _norm_rotary_grad(g, g_stride_t, src, dst, rows, mask, cols, c, s, D: tl.constexpr, EPS: tl.constexpr,
                      qkv_stride):
    """The gradient of x in _norm_rotary from g, the output's: rotated back (the transpose of the rotation),
    then through the rms-norm: dx = r gy - r^3 x mean(gy x)."""
    gp = g + rows[:, None] * g_stride_t + cols[None, :]
    g1 = tl.load(gp, mask=mask[:, None], other=0.0).to(tl.float32)
    g2 = tl.load(gp + D // 2, mask=mask[:, None], other=0.0).to(tl.float32)
    gy1, gy2 = g1 * c - g2 * s, g1 * s + g2 * c
    xp = src + rows[:, None] * qkv_stride + cols[None, :]
    x1 = tl.load(xp, mask=mask[:, None], other=0.0).to(tl.float32)
    x2 = tl.load(xp + D // 2, mask=mask[:, None], other=0.0).to(tl.float32)
    r = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / D + EPS)[:, None]
    dot = (tl.sum(gy1 * x1, 1) + tl.sum(gy2 * x2, 1))[:, None] / D
    out = dst + rows[:, None] * qkv_stride + cols[None, :]
    tl.store(out, (r * gy1 - r * r * r * x1 * dot).to(dst.dtype.element_ty), mask=mask[:, None])
    tl.store(out + D // 2, (r * gy2 - r * r * r * x2 * dot).to(dst.dtype.element_ty), mask=mask[:, None])


@triton.jit
def _attn_prep_bwd_kernel(dq, dk, dv, dq_st, dq_sh, dk_st, dk_sh, dv_st, dv_sh, qkv, ve, lambdas, cos, sin,
                          dqkv, dve, dlam, N, T, H: tl.constexpr, D: tl.constexpr, HAS_VE: tl.constexpr,
                          BLOCK_T: tl.constexpr, EPS: tl.constexpr):
    """Program (i, h) as in the forward. dq, dk, dv: (N, H, D) with token strides *_st and head strides *_sh
    (unit along D). Writes dqkv (N, 3, H, D), dve (N, H, D) and this program's two partial sums of the
    lambdas' gradient, sum(dv * v) and sum(dv * ve), to dlam[i * H + h]."""
    h = tl.program_id(1)
    i = tl.program_id(0)
    rows = i * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = rows < N
    cols = tl.arange(0, D // 2)
    c, s = _angles(cos, sin, rows, mask, cols, T, D)
    _norm_rotary_grad(dq + h * dq_sh, dq_st, qkv + h * D, dqkv + h * D, rows, mask, cols, c, s, D, EPS,
                      3 * H * D)
    _norm_rotary_grad(dk + h * dk_sh, dk_st, qkv + (H + h) * D, dqkv + (H + h) * D, rows, mask, cols, c, s, D,
                      EPS, 3 * H * D)
    full = tl.arange(0, D)
    g = tl.load(dv + h * dv_sh + rows[:, None] * dv_st + full[None, :], mask=mask[:, None], other=0.0)
    g = g.to(tl.float32)
    at = (2 * H + h) * D + rows[:, None] * (3 * H * D) + full[None, :]
    x = tl.load(qkv + at, mask=mask[:, None], other=0.0).to(tl.float32)
    tl.store(dqkv + at, (tl.load(lambdas).to(tl.float32) * g).to(dqkv.dtype.element_ty), mask=mask[:, None])
    tl.store(dlam + (i * H + h) * 2, tl.sum(tl.sum(g * x, 1), 0))
    if HAS_VE:
        e_at = rows[:, None] * (H * D) + h * D + full[None, :]
        e = tl.load(ve + e_at, mask=mask[:, None], other=0.0).to(tl.float32)
        tl.store(dve + e_at, (tl.load(lambdas + 1).to(tl.float32) * g).to(dve.dtype.element_ty), mask=mask[:, None])
        tl.store(dlam + (i * H + h) * 2 + 1, tl.sum(tl.sum(g * e, 1), 0))
    else:
        tl.store(dlam + (i * H + h) * 2 + 1, 0.0)


def _check(qkv: torch.Tensor, ve: torch.Tensor | None, cos: torch.Tensor):
    B, T, three, H, D = qkv.shape
    if three != 3 or D % 2 or D & (D - 1):
        raise ValueError(f"attn_prep: qkv is {tuple(qkv.shape)}; expected (B, T, 3, heads, head_dim), head_dim a "
                         "power of two")
    if cos.shape != (T, D // 2):
        raise ValueError(f"attn_prep: the rotary tables are {tuple(cos.shape)}, expected {(T, D // 2)}")
    if ve is not None and ve.numel() != B * T * H * D:
        raise ValueError(f"attn_prep: ve has {ve.numel()} elements, v {B * T * H * D}")
    return B, T, H, D


def _grid(n: int, H: int):
    return (triton.cdiv(n, BLOCK_T), H)


@torch.library.custom_op("speedrun::attn_prep", mutates_args=())
def attn_prep(qkv: torch.Tensor, ve: torch.Tensor | None, lambdas: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v, each (B, T, H, D) contiguous, from qkv (B, T, 3, H, D): rotary(rms_norm(q)), the same for k,
    and lambdas[0] * v + lambdas[1] * ve (ve any shape of B*T*H*D elements, or None: lambdas[0] * v).
    cos, sin: (T, D/2), the rotary angles' cos and sin for each position (see trainer.layers.Rotary)."""
    B, T, H, D = _check(qkv, ve, cos)
    qkv = qkv.contiguous()
    q, k, v = (torch.empty((B, T, H, D), dtype=qkv.dtype, device=qkv.device) for _ in range(3))
    if q.numel():
        _attn_prep_fwd_kernel[_grid(B * T, H)](
            qkv, ve.contiguous() if ve is not None else qkv, lambdas, cos.contiguous(), sin.contiguous(), q, k, v,
            B * T, T, H=H, D=D, HAS_VE=ve is not None, BLOCK_T=BLOCK_T, EPS=EPS, num_warps=WARPS)
    return q, k, v


@attn_prep.register_fake
def _(qkv, ve, lambdas, cos, sin):
    B, T, _, H, D = qkv.shape
    return tuple(qkv.new_empty((B, T, H, D)) for _ in range(3))


def _tokens_heads(g: torch.Tensor, T: int) -> tuple[torch.Tensor, int, int]:
    """g (B, T, H, D) as the kernel reads it: unit stride along D, and the tokens of all B sequences one
    stride apart; a gradient laid out otherwise is copied first."""
    B = g.size(0)
    if g.stride(3) != 1 or (B > 1 and g.stride(0) != T * g.stride(1)):
        g = g.contiguous()
    return g, g.stride(1), g.stride(2)


@torch.library.custom_op("speedrun::attn_prep_bwd", mutates_args=())
def _attn_prep_bwd(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, qkv: torch.Tensor, ve: torch.Tensor | None,
                   lambdas: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of qkv, of ve (empty when ve is None) and of lambdas (float32, like the parameter)."""
    B, T, H, D = _check(qkv, ve, cos)
    qkv = qkv.contiguous()
    dqkv = torch.empty_like(qkv)
    dve = torch.empty((B, T, H, D) if ve is not None else (0,), dtype=qkv.dtype, device=qkv.device)
    grid = _grid(B * T, H)
    dlam = torch.empty((grid[0] * H, 2), dtype=torch.float32, device=qkv.device)
    if qkv.numel():
        (dq, dq_st, dq_sh), (dk, dk_st, dk_sh), (dv, dv_st, dv_sh) = (_tokens_heads(g, T) for g in (dq, dk, dv))
        _attn_prep_bwd_kernel[grid](
            dq, dk, dv, dq_st, dq_sh, dk_st, dk_sh, dv_st, dv_sh, qkv, ve.contiguous() if ve is not None else qkv,
            lambdas, cos.contiguous(), sin.contiguous(), dqkv, dve if ve is not None else dqkv, dlam, B * T, T,
            H=H, D=D, HAS_VE=ve is not None, BLOCK_T=BLOCK_T, EPS=EPS, num_warps=WARPS)
    d_lambdas = dlam.sum(dim=0).to(lambdas.dtype)
    return dqkv, (dve.view(ve.shape) if ve is not None else dve), d_lambdas


@_attn_prep_bwd.register_fake
def _(dq, dk, dv, qkv, ve, lambdas, cos, sin):
    return torch.empty_like(qkv), (torch.empty_like(ve) if ve is not None else qkv.new_empty((0,))), \
        torch.empty_like(lambdas)


def _setup_context(ctx, inputs, output):
    qkv, ve, lambdas, cos, sin = inputs
    ctx.has_ve = ve is not None
    ctx.save_for_backward(qkv, ve, lambdas, cos, sin)


def _backward(ctx, dq, dk, dv):
    qkv, ve, lambdas, cos, sin = ctx.saved_tensors
    dqkv, dve, d_lambdas = torch.ops.speedrun.attn_prep_bwd(dq, dk, dv, qkv, ve if ctx.has_ve else None, lambdas,
                                                            cos, sin)
    return dqkv, (dve if ctx.has_ve else None), d_lambdas, None, None


attn_prep.register_autograd(_backward, setup_context=_setup_context)


def attn_prep_reference(qkv, ve, lambdas, cos, sin):
    """The same math in plain torch, as trainer/layers.py writes it (cos and sin as the tables above)."""
    import torch.nn.functional as F

    def rotate(x):
        x1, x2 = x.chunk(2, dim=-1)
        c, s = cos[None, :, None, :], sin[None, :, None, :]
        return torch.cat([x1 * c + x2 * s, x2 * c - x1 * s], dim=-1)

    q, k, v = qkv.unbind(2)
    q, k = rotate(F.rms_norm(q, (q.size(-1),))), rotate(F.rms_norm(k, (k.size(-1),)))
    v = lambdas[0] * v + lambdas[1] * ve.view_as(v) if ve is not None else lambdas[0] * v
    return q, k, v

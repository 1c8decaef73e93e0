"""FP8 lm-head matmul for Hopper: e4m3 activations and weights forward, e5m2 gradients backward.

The head is the largest matmul of the model (48K tokens x 768 x 50304 per micro-batch, three times
with the backward); FP8 tensor cores run it at about twice the bf16 rate. Every operand is scaled
into its format's range: activations and gradients by fixed bounds known from the model (rms-normed
rows: |x| <= sqrt(dim); mean cross-entropy over M rows: |dL/dlogit| <= 1/M), the weight by its amax.
Fixed bounds matter for speed: written as a plain autograd.Function, torch.compile fuses the scaling
and the cast into the kernels that produce x and the logit gradient, instead of extra passes over a
(tokens x vocab) tensor (measured: ~250 ms of a 1056 ms step went to such passes with amax scales).
"""
from __future__ import annotations

import torch

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
E4M3_MAX, E5M2_MAX = 448.0, 57344.0


def to_fp8(t: torch.Tensor, inv_scale, dtype: torch.dtype, limit: float) -> torch.Tensor:
    return (t * inv_scale).clamp(-limit, limit).to(dtype)


def activation_scale(dim: int) -> float:
    """The e4m3 scale of rms-normed rows, fixed up front: none of their entries exceeds sqrt(dim)."""
    return dim ** 0.5 / E4M3_MAX


def weight_scale(w: torch.Tensor) -> torch.Tensor:
    """The e4m3 scale of a weight matrix: its amax (a 0-d fp32 tensor, so no host sync)."""
    return (w.detach().abs().amax().float() / E4M3_MAX).clamp(min=1e-30)


def activation_to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Rms-normed rows in e4m3 with their fixed scale (see activation_scale)."""
    x_s = activation_scale(x.size(-1))
    return to_fp8(x, 1.0 / x_s, E4M3, E4M3_MAX), x_s


def weight_to_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight in e4m3 with its amax scale (a 0-d tensor); |w| <= amax, so no clamp is needed."""
    w_s = weight_scale(w)
    return (w.detach() / w_s).to(E4M3), w_s


class FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, grad_bound: float) -> torch.Tensor:
        x8, x_s = activation_to_fp8(x)
        w8, w_s = weight_to_fp8(w)
        x_s_t = torch.full((), x_s, dtype=torch.float32, device=x.device)
        out = torch._scaled_mm(x8, w8.t(), scale_a=x_s_t, scale_b=w_s, out_dtype=torch.bfloat16, use_fast_accum=True)
        ctx.save_for_backward(x8, w8, x_s_t, w_s)
        ctx.g_s = grad_bound / E5M2_MAX
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x8, w8, x_s_t, w_s = ctx.saved_tensors
        g8 = to_fp8(g, 1.0 / ctx.g_s, E5M2, E5M2_MAX)
        g_s_t = torch.full((), ctx.g_s, dtype=torch.float32, device=g.device)
        # _scaled_mm wants a row-major first operand and a column-major second one
        grad_x = torch._scaled_mm(g8, w8.t().contiguous().t(), scale_a=g_s_t, scale_b=w_s, out_dtype=torch.bfloat16)
        grad_w = torch._scaled_mm(g8.t().contiguous(), x8.t().contiguous().t(), scale_a=g_s_t, scale_b=x_s_t,
                                  out_dtype=torch.float32)
        return grad_x, grad_w, None


class FP8ForwardLinear(torch.autograd.Function):
    """x @ w.T with only the forward in FP8: e4m3 x (rms-normed rows, the fixed scale) and w (its amax).
    The backward is bf16 matmuls on the unrounded x and w (straight-through), since the gradient that
    comes back has no bound known up front. Used for the attention's q, k, v projection."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x8, x_s = activation_to_fp8(x)
        w8, w_s = weight_to_fp8(w)
        x_s_t = torch.full((), x_s, dtype=torch.float32, device=x.device)
        ctx.save_for_backward(x, w)
        return torch._scaled_mm(x8, w8.t(), scale_a=x_s_t, scale_b=w_s, out_dtype=torch.bfloat16, use_fast_accum=True)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w = ctx.saved_tensors
        return g @ w.to(g.dtype), (g.t() @ x).to(w.dtype)


def fp8_forward_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., K) rms-normed bf16 @ w.T (w (N, K), any float dtype; gradient in w's dtype); K and N multiples of 16."""
    lead = x.shape[:-1]
    return FP8ForwardLinear.apply(x.reshape(-1, x.size(-1)).contiguous(), w).view(*lead, -1)


def fp8_linear(x: torch.Tensor, w: torch.Tensor, grad_bound: float | None = None) -> torch.Tensor:
    """x (M, K) @ w.T in FP8; M, K and N multiples of 16. grad_bound: largest |dL/dout| (default 1/M,
    the mean cross-entropy's)."""
    return FP8Linear.apply(x.contiguous(), w, grad_bound if grad_bound is not None else 1.0 / x.size(0))

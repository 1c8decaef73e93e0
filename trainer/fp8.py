"""FP8 lm-head matmul for Hopper: e4m3 activations and weights forward, e5m2 gradients backward.

The head is the largest matmul of the model (48K tokens x 768 x 50304 per micro-batch, three times
with the backward); FP8 tensor cores run it at about twice the bf16 rate. Every operand is scaled
into its format's range: activations and gradients by fixed bounds known from the model (rms-normed
rows: |x| <= sqrt(dim); mean cross-entropy over M rows: |dL/dlogit| <= 1/M), the weight by its amax.
Fixed bounds matter for speed: torch.compile fuses the scaling and the cast into the kernels that
produce x and the logit gradient, instead of extra passes over a (tokens x vocab) tensor (measured:
~250 ms of a 1056 ms step went to such passes with amax scales).
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
    """The e4m3 scale of a weight matrix: its amax (a 0-d fp32 tensor, so no host sync). Record-28 fixes its head's
    at 2^-9, which clips any weight above 448 * 2^-9 = 0.875; amax never clips (the yardstick's 0.802x ran with it)."""
    return (w.detach().abs().amax().float() / E4M3_MAX).clamp(min=1e-30)


def activation_to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Rms-normed rows in e4m3 with their fixed scale (see activation_scale)."""
    x_s = activation_scale(x.size(-1))
    return to_fp8(x, 1.0 / x_s, E4M3, E4M3_MAX), x_s


def weight_to_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight in e4m3 with its amax scale (a 0-d tensor); |w| <= amax, so no clamp is needed."""
    w_s = weight_scale(w)
    return (w.detach() / w_s).to(E4M3), w_s


def scale_tensor(scale: float, like: torch.Tensor) -> torch.Tensor:
    """A fixed scale as the 0-d fp32 tensor _scaled_mm takes, on like's device."""
    return torch.full((), scale, dtype=torch.float32, device=like.device)


# The matmuls are custom ops whose autograd formulas are plain torch code: compiled, the casts around
# them fuse into the kernels that produce x and the gradient, and AOTAutograd can cache the graph (it
# cannot cache one holding an autograd.Function, so a warm start would trace the whole model again).

@torch.library.custom_op("speedrun::fp8_mm", mutates_args=())
def _fp8_mm(x8: torch.Tensor, w8: torch.Tensor, x_s: torch.Tensor, w_s: torch.Tensor,
            x: torch.Tensor, w: torch.Tensor, grad_bound: float) -> torch.Tensor:
    """x8 @ w8.T, bf16 out. x and w (the unrounded operands) and grad_bound are for the backward: a
    negative grad_bound means a bf16 backward on x and w; otherwise the gradient is cast to e5m2 with
    that bound and the backward is FP8 on x8 and w8."""
    return torch._scaled_mm(x8, w8.t(), scale_a=x_s, scale_b=w_s, out_dtype=torch.bfloat16, use_fast_accum=True)


@_fp8_mm.register_fake
def _(x8, w8, x_s, w_s, x, w, grad_bound):
    return x8.new_empty((x8.size(0), w8.size(0)), dtype=torch.bfloat16)


def _fp8_mm_setup(ctx, inputs, output):
    x8, w8, x_s, w_s, x, w, grad_bound = inputs
    ctx.grad_bound = grad_bound
    ctx.save_for_backward(*((x8, w8, x_s, w_s) if grad_bound >= 0 else (x, w)))


def _fp8_mm_backward(ctx, g: torch.Tensor):
    if ctx.grad_bound < 0:   # straight-through: bf16 matmuls of the unrounded operands
        x, w = ctx.saved_tensors
        return None, None, None, None, g @ w.to(g.dtype), (g.t() @ x).to(w.dtype), None
    x8, w8, x_s, w_s = ctx.saved_tensors
    g_s = ctx.grad_bound / E5M2_MAX
    g8, g_s_t = to_fp8(g, 1.0 / g_s, E5M2, E5M2_MAX), scale_tensor(g_s, g)
    # _scaled_mm wants a row-major first operand and a column-major second one
    grad_x = torch._scaled_mm(g8, w8.t().contiguous().t(), scale_a=g_s_t, scale_b=w_s, out_dtype=torch.bfloat16)
    grad_w = torch._scaled_mm(g8.t().contiguous(), x8.t().contiguous().t(), scale_a=g_s_t, scale_b=x_s,
                              out_dtype=torch.float32)
    return None, None, None, None, grad_x, grad_w, None


_fp8_mm.register_autograd(_fp8_mm_backward, setup_context=_fp8_mm_setup)


def _fp8_matmul(x: torch.Tensor, w: torch.Tensor, grad_bound: float) -> torch.Tensor:
    x8, x_s = activation_to_fp8(x)
    w8, w_s = weight_to_fp8(w)
    return torch.ops.speedrun.fp8_mm(x8, w8, scale_tensor(x_s, x), w_s, x, w, grad_bound)


def fp8_forward_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., K) rms-normed bf16 @ w.T (w (N, K), any float dtype; gradient in w's dtype); K and N multiples
    of 16. Only the forward is FP8: e4m3 x (the fixed scale) and w (its amax). The backward is bf16 matmuls
    on the unrounded x and w, since the gradient that comes back has no bound known up front. Used for
    the attention's q, k, v projection."""
    lead = x.shape[:-1]
    return _fp8_matmul(x.reshape(-1, x.size(-1)).contiguous(), w, -1.0).view(*lead, -1)


def fp8_linear(x: torch.Tensor, w: torch.Tensor, grad_bound: float | None = None) -> torch.Tensor:
    """x (M, K) @ w.T in FP8 both ways; M, K and N multiples of 16. grad_bound: largest |dL/dout| (default
    1/M, the mean cross-entropy's)."""
    return _fp8_matmul(x.contiguous(), w, grad_bound if grad_bound is not None else 1.0 / x.size(0))

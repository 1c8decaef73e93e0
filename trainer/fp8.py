"""FP8 lm-head matmul for Hopper: e4m3 activations and weights forward, e5m2 gradients backward.

The head is the largest matmul of the model (48K tokens x 768 x 50304 per micro-batch, three times
with the backward). FP8 tensor cores run it at about twice the bf16 rate. Each operand gets a
per-tensor scale (amax / largest finite value of its format), so no value overflows and small
gradients keep their mantissa bits. Wrapped as custom ops so torch.compile keeps them whole.
"""
from __future__ import annotations

import torch

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def _quantize(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """t ~= q * scale with q in dtype; scale is a float32 0-d tensor (stays on the GPU: no sync).

    The multiply stays in t's dtype: for the (tokens x vocab) bf16 gradient an fp32 copy would cost
    a 10 GB round trip per micro-batch; bf16 keeps 7 mantissa bits, e5m2 keeps 2 of them.
    """
    scale = (t.detach().abs().amax().float() / torch.finfo(dtype).max).clamp(min=1e-30)
    return (t * scale.reciprocal().to(t.dtype)).to(dtype), scale


@torch.library.custom_op("trainer::fp8_mm", mutates_args=())
def fp8_mm(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K) bf16 @ w (N, K).T -> (M, N) bf16; also returns the fp8 operands and scales for backward."""
    x8, xs = _quantize(x, E4M3)
    w8, ws = _quantize(w, E4M3)
    out = torch._scaled_mm(x8, w8.t(), scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16, use_fast_accum=True)
    return out, x8, w8, xs, ws


@fp8_mm.register_fake
def _(x, w):
    M, K = x.shape
    N = w.shape[0]
    scalar = x.new_empty((), dtype=torch.float32)
    return (x.new_empty((M, N), dtype=torch.bfloat16), x.new_empty((M, K), dtype=E4M3),
            w.new_empty((N, K), dtype=E4M3), scalar, scalar.clone())


@torch.library.custom_op("trainer::fp8_mm_backward", mutates_args=())
def fp8_mm_backward(g: torch.Tensor, x8: torch.Tensor, w8: torch.Tensor, xs: torch.Tensor,
                    ws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g8, gs = _quantize(g, E5M2)
    # _scaled_mm wants a row-major first operand and a column-major second one
    grad_x = torch._scaled_mm(g8, w8.t().contiguous().t(), scale_a=gs, scale_b=ws, out_dtype=torch.bfloat16)
    grad_w = torch._scaled_mm(g8.t().contiguous(), x8.t().contiguous().t(), scale_a=gs, scale_b=xs,
                              out_dtype=torch.float32)
    return grad_x, grad_w


@fp8_mm_backward.register_fake
def _(g, x8, w8, xs, ws):
    return g.new_empty((g.shape[0], w8.shape[1]), dtype=torch.bfloat16), w8.new_empty(w8.shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    _, x8, w8, xs, ws = output
    ctx.save_for_backward(x8, w8, xs, ws)
    ctx.x_dtype = inputs[0].dtype


def _backward(ctx, grad_out, *_unused):
    x8, w8, xs, ws = ctx.saved_tensors
    grad_x, grad_w = fp8_mm_backward(grad_out.contiguous(), x8, w8, xs, ws)
    return grad_x.to(ctx.x_dtype), grad_w


fp8_mm.register_autograd(_backward, setup_context=_setup_context)


def fp8_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ w.T in FP8; M, K and N must be multiples of 16."""
    return fp8_mm(x.contiguous(), w)[0]

"""The lm head and its soft-capped cross-entropy as one op, so the (tokens x vocab) logits never outlive it.

Forward: logits = x @ W^T (FP8 on Hopper, bf16 otherwise), then trainer/kernels/softcap_ce.py computes
every row's loss and, in the same kernel, the gradient of the loss with respect to the logits. The
logits are freed at once; backward is then two matmuls over that stored gradient (the loss's backward is
fully known in the forward, so it is computed there, while the logits are still in cache-sized tiles).

FP8 mode: x (rms-normed, so |x| <= sqrt(dim)) and W are cast to e4m3 with scales known up front (a fixed
bound for x, W's amax), the gradient to e5m2 scaled by an exact power of two. The gradient is kept twice,
row-major and transposed (a Triton transpose, 1.8 ms per micro-batch), because _scaled_mm wants the
contraction dimension contiguous in both operands, for grad_x = G @ W and for grad_W = G^T @ x alike.

A torch.library custom op: torch.compile keeps it as one opaque node (no tracing into Triton), and the
backward below is ordinary torch code that compiles with the rest of the graph.
"""
from __future__ import annotations

import torch

from trainer.fp8 import E4M3, E5M2, activation_scale, activation_to_fp8, scale_tensor, weight_to_fp8
from trainer.kernels.softcap_ce import FP8_GRAD_SCALE, softcap_cross_entropy, transpose


def fp8_grad_scale(weights: torch.Tensor | None) -> float:
    """The FP8 gradient's scale: 2^15 for one target (|g| <= 1); half that with weighted targets, whose |g| reaches
    their sum (multi-token prediction and the prefix target: 2.0), so that it stays under e5m2's 57344 up to 3.5."""
    return FP8_GRAD_SCALE if weights is None else FP8_GRAD_SCALE / 2


def _none(x: torch.Tensor) -> torch.Tensor:
    """A placeholder output (a custom op's outputs must be distinct tensors)."""
    return x.new_empty((0,))


@torch.library.custom_op("speedrun::head_loss", mutates_args=())
def _head_loss(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None, vocab: int,
               cap: float, div: float, offset: float, fp8: bool, need_grad: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (sum of row losses, G, G^T, x8^T, W8^T, W's scale); G^T, x8^T, W8^T only in FP8 mode, and
    G only when need_grad. The last four are what backward needs, nothing for callers."""
    if fp8:
        x8, x_s = activation_to_fp8(x)
        w8, w_s = weight_to_fp8(w)
        x_s_t = scale_tensor(x_s, x)
        logits = torch._scaled_mm(x8, w8.t(), scale_a=x_s_t, scale_b=w_s, out_dtype=torch.bfloat16,
                                  use_fast_accum=True)
    else:
        w_s = torch.ones((), dtype=torch.float32, device=x.device)
        logits = x @ w.detach().to(x.dtype).t()
    form = dict(div=div, offset=offset, weights=weights)
    if not need_grad:
        loss = softcap_cross_entropy(logits, targets, vocab, cap, **form)
        return loss.sum(), _none(x), _none(x), _none(x), _none(x), w_s
    if fp8:
        g = torch.empty(logits.shape, dtype=E5M2, device=x.device)
        loss = softcap_cross_entropy(logits, targets, vocab, cap, grad=g, grad_mult=fp8_grad_scale(weights), **form)
        del logits   # before G^T is allocated: 4.9 GB less at the peak
        g_t = torch.empty(g.shape[::-1], dtype=E5M2, device=x.device)
        transpose(g, g_t)
        x8_t, w8_t = x8.new_empty(x8.shape[::-1]), w8.new_empty(w8.shape[::-1])
        transpose(x8, x8_t)   # torch's strided copy of FP8 runs at a tenth of the bandwidth
        transpose(w8, w8_t)
        return loss.sum(), g, g_t, x8_t, w8_t, w_s
    # the gradient replaces the logits, unless weighted targets need them after it is written
    g = logits if weights is None else torch.empty_like(logits)
    loss = softcap_cross_entropy(logits, targets, vocab, cap, grad=g, **form)
    return loss.sum(), g, _none(x), _none(x), _none(x), w_s


@_head_loss.register_fake
def _(x, w, targets, weights, vocab, cap, div, offset, fp8, need_grad):
    M, K, N = x.size(0), x.size(1), w.size(0)
    loss, w_s = x.new_empty((), dtype=torch.float32), x.new_empty((), dtype=torch.float32)
    if not need_grad:
        return loss, _none(x), _none(x), _none(x), _none(x), w_s
    if fp8:
        return (loss, x.new_empty((M, N), dtype=E5M2), x.new_empty((N, M), dtype=E5M2),
                x.new_empty((K, M), dtype=E4M3), x.new_empty((K, N), dtype=E4M3), w_s)
    return loss, x.new_empty((M, N)), _none(x), _none(x), _none(x), w_s


def _setup_context(ctx, inputs, output):
    x, w, _, weights, *_, fp8, _ = inputs
    _, g, g_t, x8_t, w8_t, w_s = output
    ctx.fp8 = fp8
    ctx.grad_scale = fp8_grad_scale(weights)
    ctx.w_dtype = w.dtype
    ctx.mark_non_differentiable(*output[1:])
    if fp8:
        ctx.save_for_backward(g, g_t, x8_t, w8_t, w_s)
    else:
        ctx.save_for_backward(g, x, w)


def _backward(ctx, grad_loss, *_unused):
    if ctx.fp8:
        g, g_t, x8_t, w8_t, w_s = ctx.saved_tensors
        g_s = grad_loss.float() * (1.0 / ctx.grad_scale)
        x_s = scale_tensor(activation_scale(x8_t.size(0)), g)
        # operands: row-major first, column-major second (the transposes below are views, not copies)
        grad_x = torch._scaled_mm(g, w8_t.t(), scale_a=g_s, scale_b=w_s, out_dtype=torch.bfloat16)
        grad_w = torch._scaled_mm(g_t, x8_t.t(), scale_a=g_s, scale_b=x_s, out_dtype=torch.float32)
    else:
        g, x, w = ctx.saved_tensors
        s = grad_loss.to(g.dtype)
        grad_x = (g @ w.to(g.dtype)) * s
        grad_w = (g.t() @ x).float() * grad_loss
    return grad_x, grad_w.to(ctx.w_dtype), None, None, None, None, None, None, None, None


_head_loss.register_autograd(_backward, setup_context=_setup_context)


def head_loss(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, vocab: int, cap: float,
              fp8: bool = False, div: float | None = None, offset: float = 0.0,
              weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over rows of the cross-entropy of cap*tanh((x @ w.T + offset) / div)[:, :vocab] (div None: cap);
    rows with target < 0 add 0. FP8 needs cap <= div (the gradient's scaling assumes |ds/dz| <= 1).
    weights (K,) float32 and targets (M, K): each row's K targets, their losses weighted (multi-token
    prediction, record-53, and the prefix target, record-88; targets < 0 skipped); FP8 then needs the weights to
    sum to at most 3.5 (fp8_grad_scale).

    x: (M, K) activations (bf16), w: (N_padded, K) with N_padded >= vocab; FP8 needs M, K, N_padded
    multiples of 16 and |x| <= sqrt(K) (rms-normed rows).
    """
    return torch.ops.speedrun.head_loss(x.contiguous(), w, targets.contiguous(), weights, vocab, float(cap),
                                        float(cap if div is None else div), float(offset), fp8,
                                        torch.is_grad_enabled())[0]


def head_loss_reference(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, vocab: int, cap: float,
                        div: float | None = None, offset: float = 0.0, weights: torch.Tensor | None = None):
    """The same loss in plain torch (float32 logits), for tests and benchmarks."""
    z = (x @ w.to(x.dtype).t())[:, :vocab].float()
    s = cap * torch.tanh((z + offset) / (cap if div is None else div))
    if weights is None:
        return torch.nn.functional.cross_entropy(s, targets, ignore_index=-1, reduction="sum")
    return sum(wk * torch.nn.functional.cross_entropy(s, targets[:, k], ignore_index=-1, reduction="sum")
               for k, wk in enumerate(weights))

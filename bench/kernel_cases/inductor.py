"""Kernels inductor writes for the trainer, compiled as the trainer compiles them, against the same code
compiled with inductor's coordinate-descent tuning (it times neighbouring block sizes of every generated
kernel while compiling). The torch column is the default compile, the triton column the tuned one.

Measured on an H200 (2026-11-29): the whole model with that tuning did not finish compiling and warming up
within 9.5 minutes (155 s without it), and this row, the largest inductor kernels of a step, gained 3%
(0.704 -> 0.684 ms of GPU time, ~2 ms a step); the trainer does not use it."""
from __future__ import annotations

from kernel_cases import ACCUM, LAYERS, TOKENS, case

HEADS, HEAD_DIM = 6, 128


def _qkv_to_attention(qkv, ve, lambdas, rotary):
    """The attention's work between its q, k, v projection and FlexAttention (trainer/model.py)."""
    from trainer.model import norm

    q, k, v = qkv.unbind(2)
    q, k = rotary(norm(q)), rotary(norm(k))
    v = lambdas[0] * v + lambdas[1] * ve.view_as(v)
    return tuple(t.transpose(1, 2) for t in (q, k, v))


# two top-level functions (two code objects), so dynamo keeps each compile's graph apart
def _default_compile(qkv, ve, lambdas, rotary):
    return _qkv_to_attention(qkv, ve, lambdas, rotary)


def _tuned_compile(qkv, ve, lambdas, rotary):
    return _qkv_to_attention(qkv, ve, lambdas, rotary)


@case("q/k rms-norm + rotary + value mix, fwd+bwd: inductor default vs coordinate-descent tuned",
      f"1x{TOKENS}x3x{HEADS}x{HEAD_DIM}", calls_per_step=LAYERS * ACCUM)
def qk_norm_rotary():
    import torch

    from trainer.model import Rotary

    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(1, TOKENS, 3, HEADS, HEAD_DIM, device="cuda", generator=g).bfloat16().requires_grad_()
    ve = torch.randn(1, TOKENS, HEADS * HEAD_DIM, device="cuda", generator=g).bfloat16().requires_grad_()
    lambdas = torch.tensor([0.5, 0.5], device="cuda", requires_grad=True)
    rotary = Rotary(HEAD_DIM).cuda()
    grads = [torch.randn(1, HEADS, TOKENS, HEAD_DIM, device="cuda", generator=g).bfloat16() for _ in range(3)]

    def step(fn):
        return lambda: torch.autograd.grad(fn(qkv, ve, lambdas, rotary), (qkv, ve, lambdas), grads)

    return (step(torch.compile(_default_compile, dynamic=False)),
            step(torch.compile(_tuned_compile, dynamic=False, options={"coordinate_descent_tuning": True})))

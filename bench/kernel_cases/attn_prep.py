"""The attention's work between its q, k, v projection and FlexAttention: q/k rms-norm + rotary + value mix
(trainer/kernels/attn_prep.py against the model's torch code compiled), and that torch code under
inductor's default compile against its coordinate-descent tuning (inductor times neighbouring block
sizes of every kernel it writes while compiling; the torch column is the default, the triton column
the tuned compile).

Measured on an H200 (2026-11-29): the whole model with that tuning did not finish compiling and warming up
within 9.5 minutes (155 s without it), and the tuning row gained 3% (0.704 -> 0.684 ms of GPU time, ~2 ms a
step); the trainer does not use it."""
from __future__ import annotations

from kernel_cases import ACCUM, LAYERS, TOKENS, case

HEADS, HEAD_DIM = 6, 128


def _qkv_to_attention(qkv, ve, lambdas, rotary):
    """The attention's work between its q, k, v projection and FlexAttention (trainer/layers.py)."""
    from trainer.layers import norm

    q, k, v = qkv.unbind(2)
    q, k = rotary(norm(q)), rotary(norm(k))
    v = lambdas[0] * v + lambdas[1] * ve.view_as(v)
    return tuple(t.transpose(1, 2) for t in (q, k, v))


def _inputs():
    """qkv, ve and lambdas (requiring grad), and the three gradients in FlexAttention's (B, H, T, D) layout."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(1, TOKENS, 3, HEADS, HEAD_DIM, device="cuda", generator=g).bfloat16().requires_grad_()
    ve = torch.randn(1, TOKENS, HEADS * HEAD_DIM, device="cuda", generator=g).bfloat16().requires_grad_()
    lambdas = torch.tensor([0.5, 0.5], device="cuda", requires_grad=True)
    grads = [torch.randn(1, HEADS, TOKENS, HEAD_DIM, device="cuda", generator=g).bfloat16() for _ in range(3)]
    return qkv, ve, lambdas, grads


# two top-level functions (two code objects), so dynamo keeps each compile's graph apart
def _default_compile(qkv, ve, lambdas, rotary):
    return _qkv_to_attention(qkv, ve, lambdas, rotary)


def _tuned_compile(qkv, ve, lambdas, rotary):
    return _qkv_to_attention(qkv, ve, lambdas, rotary)


@case("q/k rms-norm + rotary + value mix, fwd+bwd: inductor default vs coordinate-descent tuned",
      f"1x{TOKENS}x3x{HEADS}x{HEAD_DIM}", calls_per_step=LAYERS * ACCUM)
def qk_norm_rotary():
    import torch

    from trainer.layers import Rotary

    qkv, ve, lambdas, grads = _inputs()
    rotary = Rotary(HEAD_DIM).cuda()

    def step(fn):
        return lambda: torch.autograd.grad(fn(qkv, ve, lambdas, rotary), (qkv, ve, lambdas), grads)

    return (step(torch.compile(_default_compile, dynamic=False)),
            step(torch.compile(_tuned_compile, dynamic=False, options={"coordinate_descent_tuning": True})))


def _kernel_case(block_t: int, warps: int):
    def build():
        import torch

        from trainer.kernels import attn_prep as ap
        from trainer.layers import Rotary

        qkv, ve, lambdas, grads = _inputs()
        rotary = Rotary(HEAD_DIM).cuda()
        tables = rotary.tables(TOKENS, qkv.device)

        def kernel():
            chosen = ap.BLOCK_T, ap.WARPS
            ap.BLOCK_T, ap.WARPS = block_t, warps   # read at each launch; put back after, for later cases
            try:
                q, k, v = ap.attn_prep(qkv, ve, lambdas, *tables)
                return torch.autograd.grad((q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)),
                                           (qkv, ve, lambdas), grads)
            finally:
                ap.BLOCK_T, ap.WARPS = chosen

        ref = torch.compile(_default_compile, dynamic=False)
        return (lambda: torch.autograd.grad(ref(qkv, ve, lambdas, rotary), (qkv, ve, lambdas), grads)), kernel
    return build


for _bt, _w in ((32, 4), (16, 4), (64, 4), (64, 8), (128, 8)):
    case(f"attn_prep fwd+bwd (q/k norm + rotary + value mix), {_bt} tokens x 1 head a program, {_w} warps",
         f"1x{TOKENS}x3x{HEADS}x{HEAD_DIM}", calls_per_step=LAYERS * ACCUM)(_kernel_case(_bt, _w))

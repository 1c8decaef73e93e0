"""Soft-capped cross-entropy and the lm head (trainer/kernels/softcap_ce.py, trainer/head.py)."""
from __future__ import annotations

from kernel_cases import ACCUM, DIM, TOKENS, case


VOCAB, VOCAB_PADDED, CAP = 50257, 50304, 15.0
CE_SHAPE = f"{TOKENS}x{VOCAB_PADDED}"


def _logits_and_targets():
    import torch

    g = torch.Generator(device="cuda").manual_seed(0)
    z = (torch.randn(TOKENS, VOCAB_PADDED, device="cuda", generator=g) * 4).bfloat16()
    t = torch.randint(0, VOCAB, (TOKENS,), device="cuda", generator=g)
    return z, t


def _torch_softcap_ce(z, t):
    import torch

    s = CAP * torch.tanh(z[:, :VOCAB].float() / CAP)
    return torch.nn.functional.cross_entropy(s, t, reduction="sum")


@case("softcap CE loss + grad, bf16 grad in place", CE_SHAPE, calls_per_step=ACCUM)
def ce_bf16():
    import torch

    from trainer.kernels.softcap_ce import softcap_cross_entropy

    z, t = _logits_and_targets()
    zr = z.clone().requires_grad_()
    ref = torch.compile(_torch_softcap_ce)
    work = z.clone()   # overwritten by its gradient each call: the same work, whatever the values
    return (lambda: torch.autograd.grad(ref(zr, t), zr)), \
        (lambda: softcap_cross_entropy(work, t, VOCAB, CAP, grad=work))


def _ce_fp8_case(with_transpose: bool):
    """Compiled torch against the loss kernel writing the FP8 gradient, as the lm head's backward runs it,
    with or without the transpose that lays it out for the weight-gradient matmul."""
    def build():
        import torch

        from trainer.kernels.softcap_ce import FP8_GRAD_SCALE, softcap_cross_entropy, transpose

        z, t = _logits_and_targets()
        zr = z.clone().requires_grad_()
        ref = torch.compile(_torch_softcap_ce)
        g8 = torch.empty(TOKENS, VOCAB_PADDED, device="cuda", dtype=torch.float8_e5m2)
        g8_t = torch.empty(VOCAB_PADDED, TOKENS, device="cuda", dtype=torch.float8_e5m2)

        def fused():
            softcap_cross_entropy(z, t, VOCAB, CAP, grad=g8, grad_mult=FP8_GRAD_SCALE)
            if with_transpose:
                transpose(g8, g8_t)

        return (lambda: torch.autograd.grad(ref(zr, t), zr)), fused
    return build


case("softcap CE loss + grad, FP8 grad and its transpose", CE_SHAPE, calls_per_step=ACCUM)(_ce_fp8_case(True))
case("softcap CE loss + grad, FP8 grad", CE_SHAPE, calls_per_step=ACCUM)(_ce_fp8_case(False))


def _ce_tile_case(tile: tuple):
    """The loss kernel with the FP8 gradient at its default tile against another (BLOCK_M, BLOCK_N, warps)."""
    def build():
        import torch

        from trainer.kernels.softcap_ce import FP8_GRAD_SCALE, GPU_CONFIG, softcap_cross_entropy

        z, t = _logits_and_targets()
        g8 = torch.empty(TOKENS, VOCAB_PADDED, device="cuda", dtype=torch.float8_e5m2)

        def run(cfg):
            bm, bn, warps = cfg
            return lambda: softcap_cross_entropy(z, t, VOCAB, CAP, grad=g8, grad_mult=FP8_GRAD_SCALE, block_m=bm,
                                                 block_n=bn, num_warps=warps)
        return run(GPU_CONFIG), run(tile)
    return build


for _tile in [(8, 128, 4), (8, 256, 8), (4, 256, 8), (4, 512, 4), (2, 512, 4), (4, 128, 4)]:
    case(f"softcap CE tile: default vs {_tile[0]}x{_tile[1]}, {_tile[2]} warps", CE_SHAPE)(_ce_tile_case(_tile))


@case("lm head + loss fwd+bwd: torch FP8 matmuls + compiled CE vs fused op", f"{TOKENS}x{DIM} @ {DIM}x{VOCAB_PADDED}",
      calls_per_step=ACCUM)
def head_fp8():
    import torch

    from trainer.fp8 import fp8_linear
    from trainer.head import head_loss

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.nn.functional.rms_norm(torch.randn(TOKENS, DIM, device="cuda", generator=g), (DIM,))
    x = x.bfloat16().requires_grad_()
    w = (torch.randn(VOCAB_PADDED, DIM, device="cuda", generator=g) * 0.02).requires_grad_()
    t = torch.randint(0, VOCAB, (TOKENS,), device="cuda", generator=g)

    def unfused(x, w, t):
        return _torch_softcap_ce(fp8_linear(x, w), t)

    ref = torch.compile(unfused)
    fused = torch.compile(lambda x, w, t: head_loss(x, w, t, VOCAB, CAP, fp8=True))
    return (lambda: torch.autograd.grad(ref(x, w, t), (x, w))), (lambda: torch.autograd.grad(fused(x, w, t), (x, w)))

"""Muon's orthogonalisation (trainer/kernels/gram.py, trainer/optim.py)."""
from __future__ import annotations

from kernel_cases import DIM, HIDDEN, LAYERS, case


# the record's Muon stacks on one GPU: q,k,v (12 params of 3 matrices), attention out, MLP up (tall: iterated on
# its transpose), MLP down; one orthogonalize call per stack and optimizer step
MUON_STACKS = ((LAYERS, 3, DIM, DIM), (LAYERS, DIM, DIM), (LAYERS, HIDDEN, DIM), (LAYERS, DIM, HIDDEN))


def _gram_case(shape: tuple, epilogue: bool, config: tuple | None = None):
    """Baselines in eager torch, as the optimizer runs them (it is not compiled): a cuBLAS matmul, or the
    three kernels of b A + c (A @ A)."""
    def build():
        import torch

        from trainer.kernels.gram import gram

        x = torch.randn(shape, device="cuda").bfloat16()
        if not epilogue:   # A = X X^T
            return (lambda: x @ x.mT), (lambda: gram(x, config=config))
        a = gram(x) / shape[-1]   # a symmetric A of Polar Express's scale
        return (lambda: -2.77 * a + 0.51 * (a @ a)), (lambda: gram(a, add=a, alpha=0.51, beta=-2.77, config=config))
    return build


# per optimizer step: 5 iterations on the q,k,v stack; 5 on each of the two MLP stacks (768 x 3072 once transposed)
for _what, _shape, _calls, _epilogue in (("X X^T", (3 * LAYERS, DIM, DIM), 5, False),
                                         ("X X^T", (LAYERS, DIM, HIDDEN), 10, False),
                                         ("b A + c A A", (3 * LAYERS, DIM, DIM), 5, True)):
    _s = "x".join(map(str, _shape))
    case(f"{_what} {_s}: torch vs symmetric Triton", _s, calls_per_step=_calls)(_gram_case(_shape, _epilogue))
# tiles for GPU_CONFIG's first sweep (block_m, block_k, num_warps, num_stages), on the largest product
for _cfg in ((128, 32, 8, 3), (128, 64, 8, 3), (64, 128, 4, 3)):
    case(f"X X^T 12x768x3072, tile {'/'.join(map(str, _cfg))}: torch vs symmetric Triton", "12x768x3072")(
        _gram_case((LAYERS, DIM, HIDDEN), False, _cfg))


@case("orthogonalize, all Muon stacks: torch (eager, as the optimizer runs) vs symmetric kernels",
      " + ".join("x".join(map(str, s)) for s in MUON_STACKS), calls_per_step=1)
def orthogonalize_stacks():
    import torch

    from trainer.optim import orthogonalize

    stacks = [torch.randn(s, device="cuda") for s in MUON_STACKS]
    return (lambda: [orthogonalize(s) for s in stacks]), (lambda: [orthogonalize(s, symmetric=True) for s in stacks])

"""record-89's cautious decay of Adam's tables (trainer/optim.py CautiousAdam), one pass over each table.

    p -= rate * p   where (beta1 * m + (1 - beta1) * g) * p > 0

m is Adam's first moment before this step (zero before the first), g the gradient: the sign of the new first
moment is the sign of Adam's step, so the rule decays p where that step shrinks |p|. Written in torch it is five
kernels a table (lerp, product, compare, product, subtract), each reading or writing table-sized tensors: about ten
passes over each table's bytes, where this kernel makes four (p, g and m read once, p written once). Its time on a
GPU is not measured yet; its tests there passed (H100, 2026-12-07).

The arithmetic is float32 and rounds once at the store, as the torch rule's ops do one by one; the two can differ
only where the new moment is within an ulp of zero (lerp against a multiply-add), i.e. on the mask's edge.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK, WARPS = 4096, 8   # a pointwise pass: large tiles, as inductor picks for one


@triton.jit
def _cautious_decay_kernel(p, g, m, n, beta1, rate, HAS_M: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(p + offs, mask=mask, other=0.0).to(tl.float32)
    step = (1 - beta1) * tl.load(g + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_M:
        step += beta1 * tl.load(m + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.where(step * x > 0, x - rate * x, x)
    tl.store(p + offs, x.to(p.dtype.element_ty), mask=mask)


def cautious_decay_(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor | None, beta1: float,
                    rate: float) -> None:
    """The rule above on p in place (contiguous p, grad and exp_avg of one shape); exp_avg None before Adam's
    first step."""
    if not (p.is_contiguous() and grad.is_contiguous() and (exp_avg is None or exp_avg.is_contiguous())):
        raise ValueError("cautious_decay_: p, grad and exp_avg must be contiguous")
    n = p.numel()
    _cautious_decay_kernel[(triton.cdiv(n, BLOCK),)](p, grad, p if exp_avg is None else exp_avg, n, beta1, rate,
                                                     HAS_M=exp_avg is not None, BLOCK=BLOCK, num_warps=WARPS)


def cautious_decay_reference_(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor | None, beta1: float,
                              rate: float) -> None:
    """The same rule in torch ops: where there is no GPU, and the kernel's test reference."""
    step = grad * (1 - beta1) if exp_avg is None else torch.lerp(grad, exp_avg, beta1)
    p.sub_(p * (step * p > 0), alpha=rate)

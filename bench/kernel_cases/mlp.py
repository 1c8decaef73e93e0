"""Linear + relu^2 (trainer/kernels/linear_relu2.py), its FP8 modes, and the FP8 matmuls alone."""
from __future__ import annotations

from kernel_cases import ACCUM, DIM, HIDDEN, LAYERS, TOKENS, case


def _mlp_inputs(requires_grad: bool):
    import torch

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(TOKENS, DIM, device="cuda", generator=g).to(torch.bfloat16).requires_grad_(requires_grad)
    w_fc = (torch.randn(HIDDEN, DIM, device="cuda", generator=g) * DIM ** -0.5).requires_grad_(requires_grad)
    w_proj = (torch.randn(DIM, HIDDEN, device="cuda", generator=g) * HIDDEN ** -0.5).requires_grad_(requires_grad)
    return x, w_fc, w_proj


MLP_SHAPE = f"{TOKENS}x{DIM} -> {HIDDEN} -> {DIM}"


@case("mlp relu^2 fwd", MLP_SHAPE, calls_per_step=LAYERS * ACCUM)
def mlp_forward():
    import torch

    from trainer.kernels.linear_relu2 import mlp_relu2, mlp_relu2_reference

    x, w_fc, w_proj = _mlp_inputs(requires_grad=False)
    ref = torch.compile(mlp_relu2_reference)
    return (lambda: ref(x, w_fc, w_proj)), (lambda: mlp_relu2(x, w_fc, w_proj))


@case("mlp relu^2 fwd+bwd", MLP_SHAPE, calls_per_step=LAYERS * ACCUM)
def mlp_forward_backward():
    import torch

    from trainer.kernels.linear_relu2 import mlp_relu2, mlp_relu2_reference

    x, w_fc, w_proj = _mlp_inputs(requires_grad=True)
    grad_y = torch.randn(TOKENS, DIM, device="cuda", dtype=torch.bfloat16)

    def step(fn):
        return lambda: torch.autograd.grad(fn(x, w_fc, w_proj), (x, w_fc, w_proj), grad_y)

    return step(torch.compile(mlp_relu2_reference)), step(mlp_relu2)


@case("c_fc matmul: cuBLAS bare vs Triton + relu^2", f"{TOKENS}x{DIM} @ {DIM}x{HIDDEN}")
def fc_matmul_alone():
    """The fused forward matmul against cuBLAS doing the matmul alone: how far the Triton mainloop is off."""
    from trainer.kernels.linear_relu2 import matmul_relu2

    x, w_fc, _ = _mlp_inputs(requires_grad=False)
    w = w_fc.bfloat16()
    return (lambda: x @ w.t()), (lambda: matmul_relu2(x, w))


@case("grad_h matmul: cuBLAS bare vs Triton * 2 sqrt(h)", f"{TOKENS}x{DIM} @ {DIM}x{HIDDEN}")
def grad_h_matmul_alone():
    """The fused backward matmul (it also reads h) against cuBLAS doing the matmul alone."""
    import torch

    from trainer.kernels.linear_relu2 import matmul_relu2

    x, w_fc, w_proj = _mlp_inputs(requires_grad=False)
    g = torch.randn(TOKENS, DIM, device="cuda", dtype=torch.bfloat16)
    h = matmul_relu2(x, w_fc.bfloat16())
    w = w_proj.bfloat16()
    w_t = w.t().contiguous()
    return (lambda: g @ w), (lambda: matmul_relu2(g, w_t, h=h))


def _mlp_fp8_case(mode: str, baseline: str = "none"):
    """The FP8 mode against the baseline mode (bf16 kernels by default), forward+backward, the casts included
    (compiled, as in the model)."""
    import torch
    import torch.nn.functional as F

    from trainer.kernels.linear_relu2 import mlp_relu2

    x, w_fc, w_proj = _mlp_inputs(requires_grad=True)
    grad_y = torch.randn(TOKENS, DIM, device="cuda", dtype=torch.bfloat16)

    def step(fp8):
        fn = torch.compile(lambda x, a, b: mlp_relu2(F.rms_norm(x, (DIM,)), a, b, fp8=fp8))
        return lambda: torch.autograd.grad(fn(x, w_fc, w_proj), (x, w_fc, w_proj), grad_y)

    return step(baseline), step(mode)


case("mlp relu^2 fwd+bwd: bf16 vs fp8=forward", MLP_SHAPE, calls_per_step=LAYERS * ACCUM)(
    lambda: _mlp_fp8_case("forward"))
case("mlp relu^2 fwd+bwd: bf16 vs fp8=all", MLP_SHAPE, calls_per_step=LAYERS * ACCUM)(lambda: _mlp_fp8_case("all"))
case("mlp relu^2 fwd+bwd: fp8=grad_h vs fp8=all (grad_x in FP8)", MLP_SHAPE, calls_per_step=LAYERS * ACCUM)(
    lambda: _mlp_fp8_case("all", baseline="grad_h"))


def _fp8_matmul_case(M: int, K: int, N: int, a_dtype: str = "float8_e4m3fn", fast_accum: bool = True):
    def build():
        import torch

        a = torch.randn(M, K, device="cuda").bfloat16()
        b = torch.randn(N, K, device="cuda").bfloat16()
        a8, b8 = a.to(getattr(torch, a_dtype)), b.to(torch.float8_e4m3fn)
        one = torch.ones((), device="cuda")
        return (lambda: a @ b.t()), (lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one,
                                                               out_dtype=torch.bfloat16, use_fast_accum=fast_accum))
    return build


case("MLP up matmul alone: bf16 vs FP8 (casts not counted)", f"{TOKENS}x{DIM} @ {DIM}x{HIDDEN}")(
    _fp8_matmul_case(TOKENS, DIM, HIDDEN))
case("MLP down matmul alone: bf16 vs FP8 (casts not counted)", f"{TOKENS}x{HIDDEN} @ {HIDDEN}x{DIM}")(
    _fp8_matmul_case(TOKENS, HIDDEN, DIM))
for _fast in (False, True):
    case(f"MLP grad_x matmul alone: bf16 vs e5m2 x e4m3, fast accumulation {'on' if _fast else 'off'}",
         f"{TOKENS}x{HIDDEN} @ {HIDDEN}x{DIM}")(_fp8_matmul_case(TOKENS, HIDDEN, DIM, "float8_e5m2", _fast))

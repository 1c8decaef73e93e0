"""Time each Triton kernel of trainer/kernels against the torch code it replaces, compiled with torch.compile.

    python bench/kernels.py [--reps 20] [--only SUBSTRING] [--out bench/results]

The baseline is what the trainer runs without the kernel: the same math in plain torch under
torch.compile. Each case builds its inputs at the trainer's real shapes and returns (torch_fn, triton_fn),
two no-argument callables doing the same work; both are called a few times to compile and warm up, then
timed with CUDA events over a few back-to-back calls, per call, and the median of --reps such samples is
reported. A kernel adds its rows with the @case decorator below. Writes bench/results/kernels-<gpu>.json:
the rows of this run, each stamped with its date and versions, and the earlier rows of cases not run
this time (--only), kept as they were.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TOKENS, DIM, HIDDEN, LAYERS, ACCUM = 48 * 1024, 768, 4 * 768, 12, 8   # the record's micro-batch and model


@dataclass
class Case:
    name: str
    shape: str
    build: Callable[[], tuple[Callable[[], object], Callable[[], object]]]
    calls_per_step: int = 0   # times the trainer runs this per optimizer step (0: not a trainer call)


CASES: list[Case] = []


def case(name: str, shape: str, calls_per_step: int = 0):
    """Register a benchmark: the decorated function builds inputs and returns (torch_fn, triton_fn)."""
    def register(build):
        CASES.append(Case(name, shape, build, calls_per_step))
        return build
    return register


# --- linear + relu^2 (trainer/kernels/linear_relu2.py)

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


# --- soft-capped cross-entropy and the lm head (trainer/kernels/softcap_ce.py, trainer/head.py)

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


@case("softcap CE loss + grad, FP8 grad and its transpose", CE_SHAPE, calls_per_step=ACCUM)
def ce_fp8():
    import torch

    from trainer.kernels.softcap_ce import FP8_GRAD_SCALE, softcap_cross_entropy, transpose

    z, t = _logits_and_targets()
    zr = z.clone().requires_grad_()
    ref = torch.compile(_torch_softcap_ce)
    g8 = torch.empty(TOKENS, VOCAB_PADDED, device="cuda", dtype=torch.float8_e5m2)
    g8_t = torch.empty(VOCAB_PADDED, TOKENS, device="cuda", dtype=torch.float8_e5m2)

    def fused():
        softcap_cross_entropy(z, t, VOCAB, CAP, grad=g8, grad_mult=FP8_GRAD_SCALE)
        transpose(g8, g8_t)

    return (lambda: torch.autograd.grad(ref(zr, t), zr)), fused


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


# --- FlexAttention kernel options (trainer/attention.py), and FP8 for the MLP matmuls (not in the trainer)

FLEX_OPTIONS = {
    "safe rows + prescale": dict(ROWS_GUARANTEED_SAFE=True, PRESCALE_QK=True),
    "TMA": dict(USE_TMA=True),
    "safe rows + prescale + TMA": dict(ROWS_GUARANTEED_SAFE=True, PRESCALE_QK=True, USE_TMA=True),
    "fwd 128x128, 2 stages": dict(BLOCK_M=128, BLOCK_N=128, num_stages=2),
    "bwd 32/128/128/32": dict(bwd_BLOCK_M1=32, bwd_BLOCK_N1=128, bwd_BLOCK_M2=128, bwd_BLOCK_N2=32),
}


def _flex_case(options: dict):
    def build():
        import numpy as np
        import torch
        from torch.nn.attention.flex_attention import flex_attention

        from trainer.attention import document_ids, flex_block_mask
        from trainer.data import BOS

        rng = np.random.default_rng(0)   # packed documents of FineWeb-like length (mean ~700 tokens)
        tokens = torch.from_numpy(rng.integers(0, BOS, TOKENS)).cuda()
        starts = np.cumsum(rng.geometric(1 / 700, TOKENS // 100))
        tokens[torch.from_numpy(starts[starts < TOKENS])] = BOS
        tokens[0] = BOS
        mask = flex_block_mask(document_ids(tokens), torch.tensor(14, device="cuda"), 128)
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, 6, TOKENS, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
                   for _ in range(3))
        dy = torch.randn_like(q)
        base = torch.compile(flex_attention, dynamic=False)
        tuned = torch.compile(flex_attention, dynamic=False)

        def step(fn, **kw):
            return lambda: torch.autograd.grad(fn(q, k, v, block_mask=mask, scale=0.12, **kw), (q, k, v), dy)

        return step(base), step(tuned, kernel_options=options)
    return build


for _name, _opts in FLEX_OPTIONS.items():
    case(f"flex attention fwd+bwd, window 14: default vs {_name}", f"{TOKENS} tokens, 6x128 heads",
         calls_per_step=LAYERS * ACCUM)(_flex_case(_opts))


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


# --- Muon's orthogonalisation (trainer/kernels/gram.py, trainer/optim.py)

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
for _cfg in ((128, 64, 4, 4), (128, 128, 8, 3), (64, 64, 4, 4)):
    case(f"X X^T 12x768x3072, tile {'/'.join(map(str, _cfg))}: torch vs symmetric Triton", "12x768x3072")(
        _gram_case((LAYERS, DIM, HIDDEN), False, _cfg))


@case("orthogonalize, all Muon stacks: torch (eager, as the optimizer runs) vs symmetric kernels",
      " + ".join("x".join(map(str, s)) for s in MUON_STACKS), calls_per_step=1)
def orthogonalize_stacks():
    import torch

    from trainer.optim import orthogonalize

    stacks = [torch.randn(s, device="cuda") for s in MUON_STACKS]
    return (lambda: [orthogonalize(s) for s in stacks]), (lambda: [orthogonalize(s, symmetric=True) for s in stacks])


# --- timing

def median_ms(fn, reps: int, warmup: int = 5, calls: int = 4) -> float:
    """Median over reps samples of the mean time of `calls` back-to-back calls: as in the trainer, the host
    queues the next launch while the GPU runs, so per-launch host overhead (larger for a Python Triton
    launch than for a compiled graph) counts only where it would stall the GPU."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def run(cases: list[Case], reps: int) -> list[dict]:
    rows = []
    for c in cases:
        try:
            torch_fn, triton_fn = c.build()
            ms_torch, ms_triton = median_ms(torch_fn, reps), median_ms(triton_fn, reps)
        except Exception as e:   # noqa: BLE001 - one case that fails to build or compile must not hide the others
            print(f"{c.name}: failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", file=sys.stderr)
            continue
        row = dict(kernel=c.name, shape=c.shape, ms_torch=ms_torch, ms_triton=ms_triton,
                   speedup=ms_torch / ms_triton, calls_per_step=c.calls_per_step,
                   ms_saved_per_step=(ms_torch - ms_triton) * c.calls_per_step if c.calls_per_step else None)
        rows.append(row)
        del torch_fn, triton_fn
    return rows


def show(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for col in ("kernel", "shape", "ms torch", "ms triton", "speed-up", "ms saved / step"):
        t.add_column(col, justify="left" if col in ("kernel", "shape") else "right")
    for r in rows:
        saved = f"{r['ms_saved_per_step']:.1f}" if r["ms_saved_per_step"] is not None else "-"
        t.add_row(r["kernel"], r["shape"], f"{r['ms_torch']:.3f}", f"{r['ms_triton']:.3f}", f"{r['speedup']:.2f}x",
                  saved)
    Console().print(t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--only", default="", help="run the cases whose name contains this")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args(argv)
    import torch
    import triton

    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU and none is visible.", file=sys.stderr)
        return 1
    gpu = torch.cuda.get_device_name()
    rows = run([c for c in CASES if args.only in c.name], args.reps)
    show(rows, f"kernels vs torch.compile, {gpu} (torch {torch.__version__}, triton {triton.__version__}), "
               f"median of {args.reps}")
    name = "".join(ch if ch.isalnum() else "-" for ch in gpu).strip("-").lower()
    path = Path(args.out) / f"kernels-{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = f"{datetime.date.today()}, torch {torch.__version__}, triton {triton.__version__}"
    rows = [dict(r, measured=stamp) for r in rows]
    ran = {r["kernel"] for r in rows}
    kept = json.loads(path.read_text()).get("rows", []) if path.exists() else []
    order = [c.name for c in CASES]
    merged = sorted([r for r in kept if r["kernel"] not in ran] + rows,
                    key=lambda r: order.index(r["kernel"]) if r["kernel"] in order else len(order))
    path.write_text(json.dumps(dict(gpu=gpu, reps=args.reps, rows=merged), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

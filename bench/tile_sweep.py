"""Time launch configurations (Tiles) of the relu^2 MLP's Triton matmul at the trainer's shapes, FP8 as it runs.

    python bench/tile_sweep.py [--only forward|backward] [--reps 20] [--out bench/results]

Each kernel (the FP8 forward writing h and its e4m3 copy; the FP8 backward reading h and writing grad_pre
and its e5m2 copy) runs with the trainer's configuration first, then with each candidate below; a row
gives the median ms per call by CUDA events, the GPU's kernel time (profiler), the ratio to the trainer's
configuration of the same run, and the largest difference of its output from the trainer's configuration's
(the same K order: 0 but for wgmma's own order within a step). A candidate that fails to compile or launch
is a row with its error. bench/kernel_resources.py --sweep compiles the same candidates without a GPU
(registers, spills, shared memory), which is how these were chosen. Writes
bench/results/tile_sweep-<gpu>.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from kernel_cases import DIM, HIDDEN, REPO, TOKENS
from kernels import gpu_slug, kernel_ms, median_ms

# fields as trainer.kernels.linear_relu2.Tiles: block m, n, k, group, warps, stages, split, warp-specialise,
# h_early, programs per SM. Two per SM needs each program's registers and shared memory to fit twice.
CANDIDATES = {
    "backward": [
        (128, 256, 128, 8, 8, 3, True, False, 0), (128, 256, 128, 8, 8, 3, True, True, 0),
        (128, 256, 128, 8, 8, 3, True, True, 1),
        (128, 128, 128, 8, 4, 2, True, False, 0, 2), (128, 128, 128, 8, 4, 2, True, False, 1, 2),
        (128, 128, 128, 8, 4, 2, True, True, 0, 2),
        (128, 128, 128, 8, 8, 4, False, False, 2), (128, 128, 128, 8, 8, 4, False, True, 0),
        (128, 128, 128, 8, 8, 4, False, False, 0), (128, 128, 128, 8, 8, 4, True, False, 1),
        # one warpgroup a program and two programs an SM, so one's epilogue runs beside the other's matmul:
        # 64-row tiles keep the accumulator at 128 registers a thread, 64-deep K steps the shared memory
        # under half an SM's
        (64, 256, 64, 8, 4, 3, True, False, 1, 2), (64, 256, 64, 8, 4, 2, True, False, 1, 2),
        (64, 256, 64, 16, 4, 3, True, False, 1, 2),
    ],
    "forward": [
        (128, 256, 128, 8, 8, 3, True, False), (128, 128, 128, 8, 4, 2, True, False, 0, 2),
        (128, 128, 128, 8, 4, 2, True, True, 0, 2), (128, 128, 128, 8, 8, 4, False, True),
        (128, 128, 128, 8, 8, 4, True, False),
        (64, 256, 64, 8, 4, 3, True, False, 0, 2), (64, 256, 64, 8, 4, 4, True, False, 0, 2),   # as the backward's
    ],
}


def inputs(kind: str):
    """The FP8 operands of one micro-batch's MLP, scaled as mlp_relu2 scales them; returns (a, b, h, scale,
    out8 dtype) for matmul_relu2."""
    import torch

    from trainer.fp8 import E4M3, E5M2, E5M2_MAX, activation_to_fp8, weight_to_fp8
    from trainer.kernels.linear_relu2 import grad_pre_scale, h_scale, matmul_relu2

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.nn.functional.rms_norm(torch.randn(TOKENS, DIM, device="cuda", generator=g), (DIM,)).bfloat16()
    w_fc = torch.randn(HIDDEN, DIM, device="cuda", generator=g) * DIM ** -0.5
    x8, x_s = activation_to_fp8(x)
    fc8, fc_s = weight_to_fp8(w_fc)
    fwd_scale = torch.stack([fc_s * x_s, 1 / h_scale(w_fc)]).float()
    if kind == "forward":
        return x8, fc8, None, fwd_scale, E4M3
    h = matmul_relu2(x8, fc8, scale=fwd_scale, out8=torch.empty(TOKENS, HIDDEN, dtype=E4M3, device="cuda"))
    grad_y = torch.randn(TOKENS, DIM, device="cuda", generator=g)
    g_max = grad_y.abs().amax()
    g_s = g_max / E5M2_MAX
    w_proj = torch.randn(DIM, HIDDEN, device="cuda", generator=g) * HIDDEN ** -0.5
    proj8, proj_s = weight_to_fp8(w_proj)
    scale = torch.stack([g_s * proj_s, 1 / grad_pre_scale(g_max, w_fc, w_proj)]).float()
    return (grad_y / g_s).to(E5M2), proj8.t().contiguous(), h, scale, E5M2


def sweep(kind: str, reps: int) -> list[dict]:
    import torch

    from trainer.kernels.linear_relu2 import GPU_CONFIGS, Tiles, matmul_relu2

    a, b, h, scale, out8_dtype = inputs(kind)
    out8 = torch.empty(TOKENS, HIDDEN, dtype=out8_dtype, device="cuda")
    default = GPU_CONFIGS[(kind == "backward", True, True)]
    ref = None
    rows = []
    for cfg in [default] + [Tiles(*c) for c in CANDIDATES[kind]]:
        def call(cfg=cfg):
            return matmul_relu2(a, b, h=h, scale=scale, out8=out8, config=cfg)
        row = dict(kernel=kind, tiles=cfg._asdict(), trainer=cfg == default)
        try:
            out = call().float()
            ref = out if ref is None else ref
            row.update(ms=median_ms(call, reps), gpu_ms=kernel_ms(call), max_diff=(out - ref).abs().max().item())
        except Exception as e:   # noqa: BLE001 - a candidate that does not compile or launch is a result
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:160] if str(e).strip() else ''}"
        rows.append(row)
    base = rows[0].get("gpu_ms")
    for r in rows:
        r["vs_trainer"] = r["gpu_ms"] / base if "gpu_ms" in r and base else None
    return rows


def label(t: dict) -> str:
    return (f"{t['block_m']}x{t['block_n']}x{t['block_k']} g{t['group_m']} {t['warps']}w {t['stages']}s"
            f"{' split' if t['split'] else ''}{' ws' if t['warp_specialize'] else ''} h{t['h_early']} x{t['per_sm']}")


def show(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for col in ("kernel", "tiles", "ms (events)", "GPU ms", "vs trainer's", "max |diff|"):
        t.add_column(col, justify="left" if col in ("kernel", "tiles") else "right")
    for r in rows:
        name = label(r["tiles"]) + (" (trainer)" if r["trainer"] else "")
        if "error" in r:
            t.add_row(r["kernel"], name, r["error"], "", "", "")
            continue
        t.add_row(r["kernel"], name, f"{r['ms']:.3f}", f"{r['gpu_ms']:.3f}", f"{r['vs_trainer']:.2f}x",
                  f"{r['max_diff']:.3g}")
    Console(width=150).print(t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=sorted(CANDIDATES), help="sweep one kernel (default: both)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args(argv)
    import torch
    import triton

    if not torch.cuda.is_available():
        print("bench/tile_sweep.py needs a CUDA GPU and none is visible.", file=sys.stderr)
        return 1
    gpu = torch.cuda.get_device_name()
    kinds = [args.only] if args.only else sorted(CANDIDATES, reverse=True)   # the forward first
    rows = [r for kind in kinds for r in sweep(kind, args.reps)]
    show(rows, f"relu^2 MLP matmul tiles, FP8, {TOKENS}x{DIM} -> {HIDDEN}, {gpu} (torch {torch.__version__}, "
               f"triton {triton.__version__}), median of {args.reps}")
    path = Path(args.out) / f"tile_sweep-{gpu_slug(gpu)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__,
                                    date=str(datetime.date.today()), reps=args.reps, rows=rows), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

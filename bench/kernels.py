"""Time each Triton kernel of trainer/kernels against the torch code it replaces, compiled with torch.compile.

    python bench/kernels.py [--reps 20] [--only SUBSTRING] [--out bench/results]

The baseline is what the trainer runs without the kernel: the same math in plain torch under
torch.compile. Each case builds its inputs at the trainer's real shapes and returns (torch_fn, triton_fn),
two no-argument callables doing the same work; both are called a few times to compile and warm up, then
timed with CUDA events over a few back-to-back calls, per call, and the median of --reps such samples is
reported, and beside it the GPU's own kernel time per call (the profiler's sum), which tells a row that
timed the host's launches from one that timed the GPU; the milliseconds a step saves come from the GPU's
time, since the trainer queues a whole step ahead of the GPU. A kernel adds its rows with @case in its module of
bench/kernel_cases/. Writes
bench/results/kernels-<gpu>.json: the rows of this run, each stamped with its date and versions, and the earlier rows of cases not run
this time (--only), kept as they were.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

from kernel_cases import CASES, REPO, Case, attention, attn_prep, head, mlp  # noqa: F401 - the modules register their cases

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


def kernel_ms(fn, calls: int = 4) -> float:
    """The GPU's kernel time per call (the profiler's sum of kernel durations over `calls` calls): where it is
    well under median_ms, the row timed the host launching work, not the GPU running it, and a trainer that
    queues a whole step ahead of the GPU would not see that difference."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total_us = sum(getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
                   for e in prof.key_averages())
    return total_us / 1000 / calls


def gpu_slug(gpu: str) -> str:
    """A GPU's name as a results file names it: 'NVIDIA H200' -> 'nvidia-h200'."""
    return "".join(ch if ch.isalnum() else "-" for ch in gpu).strip("-").lower()


def run(cases: list[Case], reps: int) -> list[dict]:
    rows = []
    for c in cases:
        try:
            torch_fn, triton_fn = c.build()
            ms_torch, ms_triton = median_ms(torch_fn, reps), median_ms(triton_fn, reps)
            gpu_torch, gpu_triton = kernel_ms(torch_fn), kernel_ms(triton_fn)
        except Exception as e:   # noqa: BLE001 - one case that fails to build or compile must not hide the others
            print(f"{c.name}: failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", file=sys.stderr)
            continue
        row = dict(kernel=c.name, shape=c.shape, ms_torch=ms_torch, ms_triton=ms_triton, gpu_ms_torch=gpu_torch,
                   gpu_ms_triton=gpu_triton,
                   speedup=ms_torch / ms_triton, calls_per_step=c.calls_per_step,
                   # from the GPU's time: the trainer queues a step ahead, so the host's launches do not add
                   ms_saved_per_step=(gpu_torch - gpu_triton) * c.calls_per_step if c.calls_per_step else None)
        rows.append(row)
        del torch_fn, triton_fn
    return rows


def show(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for col in ("kernel", "shape", "ms torch", "ms triton", "speed-up", "GPU kernels ms torch / triton",
                "GPU ms saved / step"):
        t.add_column(col, justify="left" if col in ("kernel", "shape") else "right")
    for r in rows:
        saved = f"{r['ms_saved_per_step']:.1f}" if r["ms_saved_per_step"] is not None else "-"
        t.add_row(r["kernel"], r["shape"], f"{r['ms_torch']:.3f}", f"{r['ms_triton']:.3f}", f"{r['speedup']:.2f}x",
                  f"{r['gpu_ms_torch']:.3f} / {r['gpu_ms_triton']:.3f}", saved)
    Console(width=170).print(t)


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
    path = Path(args.out) / f"kernels-{gpu_slug(gpu)}.json"
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

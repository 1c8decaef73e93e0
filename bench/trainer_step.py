"""Time the trainer's optimizer step on this GPU: ms/step, tokens/s, model TFLOP/s, MFU, memory, compile time.

    python bench/trainer_step.py [--steps 20] [--set KEY=VALUE ...] [--phases cold,warm]
                                 [--variant NAME:KEY=VALUE[,KEY=VALUE...] ...] [--baseline DIR] [--profile]

Each phase runs in a fresh process: 'cold' starts from an empty inductor/Triton cache, 'warm' reuses the
cache the cold run filled (the directory is keyed by the trainer's code hash, the torch version and the GPU
name, as a node would keep it between seeds). Each --variant then runs once more, in its own process, with
its overrides on top of --set: the before/after of one change, measured in the same run on the same GPU
(its compile seconds are not a cold figure: it shares the cache with the runs before it). --baseline DIR
runs once more the trainer code of another checkout of this repo (`git worktree add DIR REV`, or a copy
of its files), with the same --set: the before/after of a code change in one call, its cache keyed by
its own code. A phase builds the default config (overrides with --set),
generates Markov shards with FineWeb-like document lengths, runs the trainer's untimed warm-up (timed here
as compile+warm-up seconds), then times --steps optimizer steps with CUDA events, as the trainer's loop
runs them (each step's loss read once the next is queued), then --steps more waiting for each step to end
before the next begins (the 'synced' column: the loop's way before it deferred that read). The timed steps walk the
whole schedule (step i of N runs at training step i*steps/N) so the growing attention window is averaged
as in a real run.

FLOPs: 6 x (matmul parameters) x tokens for the linear layers and the lm-head (the real 50257 rows;
embeddings are lookups and count 0), plus attention over the spans actually computed: for every query,
the keys it may see (causal, same document, inside its layer's long or short window) times 4 x head_dim x
heads FLOPs forward (QK^T and PV), x3 for forward+backward. MFU divides by the GPU's dense bf16 peak.
Both timed stretches also sample the GPU's SM clock and power draw (bench/gpu_clocks.py): at the power
cap the clock follows the load, so runs compare by their clocks too.
Writes bench/results/trainer_step-<gpu>.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
SHARD_URL = "synthetic://markov?seed=0&doc_len=700&train_shards=2&val_shards=1&shard_tokens={n}"


def code_hash(root: Path = REPO) -> str:
    h = hashlib.sha256()
    for p in sorted((root / "trainer").rglob("*.py")):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:12]


def cache_dir(gpu: str, torch_version: str, root: Path = REPO) -> Path:
    key = f"{code_hash(root)}-torch{torch_version}-{gpu.replace(' ', '_')}"
    return Path(os.environ.get("SPEEDRUN_COMPILE_CACHE", Path.home() / ".cache" / "speedrun" / "compile")) / key


def visible_keys(docs, window: int, block: int):
    """Per query, how many keys it attends to under the causal + document + block-window rule."""
    import numpy as np

    T = docs.size
    i = np.arange(T)
    starts = np.flatnonzero(np.r_[True, docs[1:] != docs[:-1]])
    doc_start = starts[np.searchsorted(starts, i, side="right") - 1]
    win_start = np.maximum(i // block - window + 1, 0) * block
    return (i - np.maximum(doc_start, win_start) + 1).sum()


def attention_flops(cfg, micro_batches, window: int) -> float:
    import numpy as np

    from trainer.data import BOS

    try:
        from trainer.model import attention_layout
        layout = attention_layout(cfg)
    except ImportError:   # a --baseline checkout from before record-28's layout: every layer attends
        layout = ["long" if i % 4 == 0 or i == cfg.num_layers - 1 else "short" for i in range(cfg.num_layers)]
    long_w, short_w = window, max(1, window // 2)
    n_long, n_short, n_paired = layout.count("long"), layout.count("short"), layout.count("paired")
    total = 0.0
    for seq in micro_batches:
        docs = np.cumsum(seq[:-1] == BOS)
        keys = n_long * visible_keys(docs, long_w, cfg.block_size) + \
            n_short * visible_keys(docs, short_w, cfg.block_size)
        if n_paired:   # half the heads over twice the positions, the short window counted in those positions
            keys += n_paired * visible_keys(np.repeat(docs, 2), short_w, cfg.block_size) / 2
        total += 3 * 4 * cfg.num_heads * cfg.head_dim * keys
    return total


def run_phase(args) -> dict:
    """One fresh process: compile+warm-up, then the timed steps."""
    import numpy as np
    import torch

    from gpu_clocks import ClockSampler, gpu_uuid
    from trainer.__main__ import parse_value
    from trainer.config import TrainConfig
    from orchestrator.data.synthetic import markov_shards
    from trainer.train import Trainer

    overrides = {"val_tokens": 262144}
    for item in args.set:
        k, _, v = item.partition("=")
        overrides[k] = parse_value(k, v)
    cfg = TrainConfig.from_dict(overrides)
    bypasses = cache_bypass_reasons()
    tokens_per_step = cfg.seq_len * cfg.grad_accum_total
    data = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    need = tokens_per_step * (args.steps + 2) // 2 + cfg.val_tokens + 1
    markov_shards(data, SHARD_URL.format(n=max(need, 1 << 20)))
    out = Path(tempfile.mkdtemp(prefix="bench-out-"))
    t0 = time.perf_counter()
    trainer = Trainer(cfg, str(data), str(out))
    trainer.warm_up()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    uuid = gpu_uuid(torch)
    with ClockSampler(uuid) as clocks:
        times, flops, losses = timed_steps(trainer, cfg, args.steps, synced=False)
    with ClockSampler(uuid) as synced_clocks:
        synced_times = timed_steps(trainer, cfg, args.steps, synced=True)[0]
    profile = profile_steps(trainer, cfg) if args.profile else None
    model = trainer.model
    matmul_params = sum(p.numel() for b in model.blocks for p in b.parameters() if p.ndim >= 2)
    matmul_params += cfg.vocab_size * cfg.model_dim
    dense = 6 * matmul_params * tokens_per_step
    med = statistics.median(times)
    step_flops = dense + statistics.mean(flops)
    gpu = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)
    return dict(
        phase=args.phase, overrides=args.set, code=args.code or str(REPO),
        code_hash=code_hash(Path(args.code or REPO)),
        warmup_parts_s=trainer.warmup_parts, gpu=gpu, torch=torch.__version__, steps_timed=args.steps, config=cfg.to_dict(),
        ms_per_step_median=med, ms_per_step_min=min(times), ms_per_step_max=max(times),
        ms_per_step_p10=float(np.percentile(times, 10)), ms_per_step_p90=float(np.percentile(times, 90)),
        ms_per_step_synced_median=statistics.median(synced_times), synced_times_ms=synced_times,
        clocks=clocks.summary, synced_clocks=synced_clocks.summary,
        tokens_per_step=tokens_per_step, tokens_per_s=tokens_per_step / (med / 1000),
        model_tflop_per_step=step_flops / 1e12, attention_share=statistics.mean(flops) / step_flops,
        tflops=step_flops / (med / 1000) / 1e12, mfu=(step_flops / (med / 1000) / 1e12 / peak) if peak else None,
        peak_bf16_tflops=peak, peak_memory_allocated_mib=torch.cuda.max_memory_allocated() // 2**20,
        peak_memory_reserved_mib=torch.cuda.max_memory_reserved() // 2**20, compile_warmup_s=compile_s,
        fp8_head=model.fp8_head, attention=model.attention, losses=losses, times_ms=times,
        mean_doc_tokens=701, cache_dir=os.environ.get("TORCHINDUCTOR_CACHE_DIR"), profile=profile,
        graph_breaks=dict(torch._dynamo.utils.counters["graph_break"]),
        compile_cache=({k: dict(v) for k, v in torch._dynamo.utils.counters.items() if k in ("inductor", "aot_autograd")}),
        autograd_cache_bypass_reasons=bypasses,
        unique_graphs=int(torch._dynamo.utils.counters["stats"]["unique_graphs"]))


def timed_steps(trainer, cfg, n: int, synced: bool) -> tuple[list[float], list[float], list[float]]:
    """n optimizer steps walking the schedule: each one's milliseconds (CUDA events around it), attention
    FLOPs and loss. As the trainer's loop runs them (synced=False), a step's loss is read once the next
    step is queued, so each step starts with work queued; synced=True waits for each step before the next
    starts (the loop before it deferred that read): every step then begins with the host launching into
    an idle GPU."""
    import torch

    from trainer.distributed import sum_to_host
    try:
        from trainer.schedules import window_blocks
    except ImportError:   # a --baseline checkout from before trainer/schedules.py
        from trainer.train import window_blocks

    marks, flops, losses, pending = [], [], [], None
    for i in range(n):
        step = i * cfg.steps // n
        batch = trainer.batches.next_step()
        start = trainer.mark()
        loss = trainer.train_step(batch, step)
        marks.append((start, trainer.mark()))
        queued = (sum_to_host(loss), marks[-1][1])
        if synced:
            torch.cuda.synchronize()
        if pending is not None:
            pending[1].synchronize()
            losses.append(pending[0].item())
        pending = queued
        flops.append(attention_flops(cfg, batch, window_blocks(cfg, step)))
    torch.cuda.synchronize()
    losses.append(pending[0].item())
    return [a.elapsed_time(b) for a, b in marks], flops, losses


def cache_bypass_reasons() -> list[str]:
    """The reasons AOTAutograd gives (at INFO) for not caching a graph: a bypassed graph is traced again on
    every warm start. Filled as compilation goes."""
    import logging

    reasons: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if "ypass" in msg:
                reasons.append(msg[:300])

    lg = logging.getLogger("torch._functorch._aot_autograd.autograd_cache")
    lg.setLevel(logging.INFO)
    lg.addHandler(Keep())
    return reasons


def idle_gaps(kernels: list[tuple[float, float, str]]) -> tuple[float, float, list[tuple[float, float, str, str]]]:
    """GPU busy time (the union of the kernels' intervals), the span from the first kernel's start to the last
    one's end, and the holes between them as (start, end, kernel before, kernel after); microseconds."""
    busy, end, last, gaps = 0.0, float("-inf"), "", []
    for a, b, name in sorted(kernels):
        if a > end > float("-inf"):
            gaps.append((end, a, last, name))
        if b > end:
            busy += b - max(a, end)
            end, last = b, name
    span = (max(k[1] for k in kernels) - min(k[0] for k in kernels)) if kernels else 0.0
    return busy, span, gaps


def host_during(start: float, end: float, host_ops: list[tuple[float, float, str]]) -> str:
    """What the host was doing while the GPU sat idle from start to end: the innermost host op that spans
    the whole hole, else the one that covers most of it ('' if none)."""
    spanning = [(b - a, name) for a, b, name in host_ops if a <= start and b >= end]
    if spanning:
        return min(spanning)[1]
    overlaps = [(min(b, end) - max(a, start), name) for a, b, name in host_ops if a < end and b > start]
    return max(overlaps)[1] if overlaps else ""


def profile_steps(trainer, cfg, n: int = 2) -> dict:
    """The GPU kernels of n steps, by total time: where a step's milliseconds go; how long the GPU sat idle
    between kernels; and, from n more steps profiled with the host's ops too (which slows the host, so
    they are kept out of the idle figures), what the host was doing in the widest holes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    def profiled(activities):
        # one step queued before the profiler starts, as the loop keeps one queued: the profiled steps then
        # begin with the GPU busy, not with the host launching into an idle GPU after the last synchronize
        trainer.train_step(trainer.batches.next_step(), cfg.steps // 2)
        with profile(activities=activities) as prof:
            for _ in range(n):
                trainer.train_step(trainer.batches.next_step(), cfg.steps // 2)
            torch.cuda.synchronize()
        return prof

    def intervals(prof, device_type, label=lambda e: e.name):
        return [(e.time_range.start, e.time_range.end, label(e)) for e in prof.events()
                if e.device_type == device_type and e.time_range.end > e.time_range.start]

    prof = profiled([ProfilerActivity.CUDA])
    totals = [(e.key, getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0), e.count)
              for e in prof.key_averages()]
    traced = profiled([ProfilerActivity.CPU, ProfilerActivity.CUDA])
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    # the thread says which launcher was late: the training loop's (forward) or autograd's (backward)
    return summarize_profile(totals, intervals(prof, cuda), intervals(traced, cuda),
                             intervals(traced, cpu, lambda e: f"{e.name} [thread {e.thread}]"), n)


def summarize_profile(totals, kernels, traced_kernels, host_ops, n: int) -> dict:
    """profile_steps' figures from what the profiler recorded over n steps: totals, (name, self GPU us, calls)
    per kernel name; kernels, (start us, end us, name) of each kernel run; traced_kernels and host_ops,
    the same from the steps traced with the host's ops."""
    def widest(gaps):
        return sorted(gaps, key=lambda g: g[0] - g[1])[:12]

    rows = sorted((dict(name=name[:120], ms_per_step=t / 1000 / n, calls_per_step=count / n)
                   for name, t, count in totals if t > 0), key=lambda r: -r["ms_per_step"])
    busy, span, gaps = idle_gaps(kernels)
    buckets = {"under_10us": 0.0, "10us_to_100us": 0.0, "over_100us": 0.0}
    for a, b, _, _ in gaps:
        g = b - a
        buckets["under_10us" if g < 10 else "10us_to_100us" if g < 100 else "over_100us"] += g / 1000 / n
    _, _, traced_gaps = idle_gaps(traced_kernels)
    # every kernel of 10 us a step or more, so that two runs' profiles can be compared kernel by kernel
    return dict(kernels=[r for r in rows if r["ms_per_step"] >= 0.01],
                kernel_ms_per_step=sum(r["ms_per_step"] for r in rows),
                gpu_busy_ms_per_step=busy / 1000 / n, gpu_span_ms_per_step=span / 1000 / n,
                idle_ms_per_step_by_gap=buckets, idle_gaps_per_step=len(gaps) / n,
                widest_idle_gaps=[dict(us=round(b - a, 1), after=x[:80], before=y[:80]) for a, b, x, y in widest(gaps)],
                widest_idle_gaps_host_traced=[dict(us=round(b - a, 1), before=y[:80],
                                                   host=host_during(a, b, host_ops)[:100])
                                              for a, b, _, y in widest(traced_gaps)])


def kernel_diff(before: list[dict], after: list[dict], top: int = 15) -> list[tuple[str, float, float]]:
    """The kernels whose ms per step differ most between two profiles' kernel rows, as (name, before, after);
    a kernel one run lacks counts 0 there (inductor names its kernels after what they fuse, so a changed
    graph shows as one name leaving and another arriving)."""
    a = {r["name"]: r["ms_per_step"] for r in before}
    b = {r["name"]: r["ms_per_step"] for r in after}
    rows = [(name, a.get(name, 0.0), b.get(name, 0.0)) for name in a.keys() | b.keys()]
    return sorted(rows, key=lambda r: (-abs(r[2] - r[1]), r[0]))[:top]


def show_profile(profiled: dict) -> None:
    print(f"GPU busy {profiled['gpu_busy_ms_per_step']:.1f} ms of a {profiled['gpu_span_ms_per_step']:.1f} ms "
          f"step span (kernels {profiled['kernel_ms_per_step']:.1f} ms); the top kernels:")
    for row in profiled["kernels"][:25]:
        print(f"{row['ms_per_step']:9.2f} ms {row['calls_per_step']:7.1f}x  {row['name']}")
    print(f"idle ms per step by gap length: {profiled['idle_ms_per_step_by_gap']} "
          f"({profiled['idle_gaps_per_step']:.0f} gaps); the widest:")
    for g in profiled["widest_idle_gaps"]:
        print(f"{g['us']:9.1f} us  after {g['after']}  before {g['before']}")
    print("the widest holes of steps profiled with the host's ops too, and the host op they fall in:")
    for g in profiled["widest_idle_gaps_host_traced"]:
        print(f"{g['us']:9.1f} us  before {g['before']}  host in {g['host'] or '-'}")


def table(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"trainer step, {results[0]['gpu']} (torch {results[0]['torch']})")
    for col in ("run", "overrides", "ms/step (median)", "spread p10-p90", "synced each step", "tokens/s", "TFLOP/s",
                "MFU", "SM MHz (synced)", "W", "peak alloc MiB", "compile+warm-up s"):
        t.add_column(col)

    def mhz(c):
        return f"{c['sm_mhz_mean']:.0f}" if c else "-"

    for r in results:
        c = r.get("clocks")
        t.add_row(r["phase"], " ".join(s for s in r.get("overrides", []) if not s.startswith("val_")) or "-",
                  f"{r['ms_per_step_median']:.1f}", f"{r['ms_per_step_p10']:.1f}-{r['ms_per_step_p90']:.1f}",
                  f"{r['ms_per_step_synced_median']:.1f}",
                  f"{r['tokens_per_s']:,.0f}", f"{r['tflops']:.0f}", f"{r['mfu']:.1%}" if r["mfu"] else "-",
                  f"{mhz(c)} ({mhz(r.get('synced_clocks'))})", f"{c['power_w_mean']:.0f}" if c else "-",
                  str(r["peak_memory_allocated_mib"]), f"{r['compile_warmup_s']:.0f}")
    console = Console()
    if not console.is_terminal:   # a log file: rich would squeeze the table into 80 columns and cut the figures
        console = Console(width=200)
    console.print(t)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--phases", default="cold,warm")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                   help="one more timed run with these overrides, labelled NAME in the table")
    p.add_argument("--profile", action="store_true",
                   help="add the top GPU kernels of 2 steps, the GPU's idle time and what the host did in its "
                        "widest holes to the last cold/warm phase, and to each variant and the baseline (printed as "
                        "the kernels whose time differs most from the phase's)")
    p.add_argument("--baseline", default=None, metavar="DIR",
                   help="one more run, labelled 'baseline', of the trainer code in DIR (another checkout of this "
                        "repo) with the same --set: a code change's before and after in one call")
    p.add_argument("--phase", default=None, help=argparse.SUPPRESS)   # the child process
    p.add_argument("--code", default=None, help=argparse.SUPPRESS)    # the child: the checkout to import from
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args()
    if args.phase:
        if args.code:   # ahead of this checkout, so `import trainer` finds the baseline's
            sys.path.insert(0, args.code)
        Path(args.result).write_text(json.dumps(run_phase(args)))
        return 0
    baseline = Path(args.baseline).resolve() if args.baseline else None
    if baseline and not (baseline / "trainer" / "train.py").is_file():
        print(f"--baseline {args.baseline}: no trainer/train.py there; give another checkout of this repo "
              "(git worktree add DIR REV)", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("bench/trainer_step.py needs a CUDA GPU; none is visible", file=sys.stderr)
        return 1
    gpu = torch.cuda.get_device_name()
    runs = [(phase, phase, args.set, REPO) for phase in args.phases.split(",") if phase]
    n_phases = len(runs)
    for v in args.variant:
        name, _, sets = v.partition(":")
        runs.append((name, "variant", args.set + [s for s in sets.split(",") if s], REPO))
    if baseline:
        runs.append(("baseline", "variant", args.set, baseline))
    results = []
    for i, (label, phase, sets, code) in enumerate(runs):
        cache = cache_dir(gpu, torch.__version__, code)
        if phase == "cold" and cache.exists():
            shutil.rmtree(cache)
        cache.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"), TRITON_CACHE_DIR=str(cache / "triton"))
        result = Path(tempfile.mkdtemp()) / "result.json"
        cmd = [sys.executable, __file__, "--phase", label, "--result", str(result), "--steps", str(args.steps)]
        cmd += [a for s in sets for a in ("--set", s)]
        if code != REPO:
            cmd += ["--code", str(code)]
        if args.profile and (i == n_phases - 1 or phase == "variant"):   # the last cold/warm run, each variant
            cmd.append("--profile")
        done = subprocess.run(cmd, env=env)
        if done.returncode != 0 or not result.exists():
            print(f"run {label} failed with exit code {done.returncode}", file=sys.stderr)
            continue
        results.append(json.loads(result.read_text()))
        write(results, args.out, gpu)   # partial results survive a later run's failure
    if results:
        table(results)
        profiled = [r for r in results if r.get("profile")]
        if profiled:
            show_profile(profiled[0]["profile"])
        for r in profiled[1:]:
            p0, p1 = profiled[0]["profile"], r["profile"]
            idle0, idle1 = (p["gpu_span_ms_per_step"] - p["gpu_busy_ms_per_step"] for p in (p0, p1))
            print(f"\n{r['phase']} against {profiled[0]['phase']}: kernels {p1['kernel_ms_per_step']:.1f} against "
                  f"{p0['kernel_ms_per_step']:.1f} ms/step, GPU idle {idle1:.1f} against {idle0:.1f}; the kernels "
                  "that differ most:")
            for name, before, after in kernel_diff(p0["kernels"], p1["kernels"]):
                print(f"{before:9.2f} -> {after:9.2f} ms  {name}")
    return 0 if results else 1


def write(results: list[dict], out: str, gpu: str) -> Path:
    from kernels import gpu_slug

    path = Path(out) / f"trainer_step-{gpu_slug(gpu)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = {"gpu": gpu, "phases": results}
    by_phase = {r["phase"]: r for r in results}
    if "cold" in by_phase and "warm" in by_phase:
        summary["warm_over_cold_compile"] = by_phase["warm"]["compile_warmup_s"] / by_phase["cold"]["compile_warmup_s"]
    path.write_text(json.dumps(summary, indent=2))
    return path


if __name__ == "__main__":
    sys.exit(main())

"""The 8xH100 projection of a yardstick run: FineWeb's step count for its recipe and its time to 3.28 on 8 GPUs.

    python bench/projection.py --recipe-json J --run LABEL --log LOG [--log LOG2 ...]
        [--base-run LABEL [--base-json J2]] [--base-steps N] [--record-factor NAME=F ...]
        [--ranks 8] [--rank-cost-ms 3.5] [--tag X] [--out DIR]

Steps. FineWeb's step count now (--base-steps, default TrainConfig's `steps`) was chosen for the recipe of --base-run;
the run's recipe needs that times the run's steps to the reference's loss on the yardstick over the base run's
(estimate b: both rows reach the same target on the same shards; from J, or the base from J2). --record-factor
multiplies it by the records' own step ratios instead (estimate a: e.g. record-46's 2160 / 2225 steps for its batch
schedule), one per technique.

Time per step. Each phase of the run's schedule (its micro-batches and their tokens) on the yardstick's one GPU is the
mean train time of the phase's steps in the run's logs (train_time between step lines: validation is not in it, as
in the records' times). On --ranks GPUs a step runs its micro-batches / ranks of them on each, so the phase's one-GPU
ms x (micro-batches per rank / micro-batches), plus --rank-cost-ms for every step: the gradient all-reduce and what
else more ranks add. That cost is not measured here (no multi-GPU machine is lent); the default 3.5 ms is the
record-28 calibration of bench/NOTES.md: record-28's published 8xH100 step (99.69 ms) over its own one-H200 step
(700.8 ms), times ours on the H200 (586.1 ms: 83.4), scaled to ours on an H100 (642.6 against 639.8 ms: 83.8), is
3.5 ms over 642.6 / 8.

Projection. The FineWeb run is the run's config at each estimate's step count; its steps fall into the same phases
(schedules are fractions of `steps`), each at its projected ms. A phase the yardstick did not run is refused. The
run's config is this checkout's TrainConfig with the run's overrides from J: a row measured under other defaults
(ours of an older call) is read as today's, so project a row whose schedule its overrides name, or one of today's.
Prints a table and writes bench/results/projection-<gpu of J>[-TAG].json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import statistics
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

RECORD28_RANK_COST_MS = 3.5   # bench/NOTES.md, "Steps for FineWeb and the projection": calibrated, not measured


class UsageError(Exception):
    """One sentence: which argument or file is wrong, and what to do. Exit 2, nothing written."""


def run_config(report: dict, label: str, where: str):
    """The TrainConfig a recipe JSON's run trained with: the yardstick's fixed keys, then the run's overrides."""
    from trainer.config import TrainConfig

    run = find_run(report, label, where)
    base = dict(steps=report.get("ours_steps", report["steps"]), val_every=report["val_every"],
                val_tokens=report["val_tokens"])
    return TrainConfig.from_dict(dict(base, **run["overrides"]))


def find_run(report: dict, label: str, where: str) -> dict:
    for run in report["runs"]:
        if run["label"] == label:
            return run
    labels = ", ".join(r["label"] for r in report["runs"])
    raise UsageError(f"{where}: no run labelled {label!r} (it has {labels})")


def phase_of(cfg, step: int) -> tuple[int, int]:
    """(micro-batches, tokens in each) of a training step: what sets its time."""
    from trainer.schedules import micro_batch_len, microbatches

    return microbatches(cfg, step), micro_batch_len(cfg, step)


def step_times(train_times: dict[int, float]) -> dict[int, float]:
    """{step: ms} from {steps done: train_time_ms}: step s (0-based) took train_time(s + 1) - train_time(s), where
    both are logged (a log written every step has them all; step 0 is train_time 0)."""
    times = dict(train_times)
    times.setdefault(0, 0.0)
    return {s: times[s + 1] - times[s] for s in sorted(times) if s + 1 in times}


def phase_ms(cfg, logs_times: list[dict[int, float]]) -> dict[tuple[int, int], float]:
    """Each phase's mean ms per step over every log's steps in it."""
    by_phase: dict[tuple[int, int], list[float]] = {}
    for times in logs_times:
        for step, ms in step_times(times).items():
            if step < cfg.total_steps():
                by_phase.setdefault(phase_of(cfg, step), []).append(ms)
    return {phase: statistics.fmean(ms) for phase, ms in by_phase.items()}


def ranks_ms(phase: tuple[int, int], one_gpu_ms: float, ranks: int, rank_cost_ms: float) -> float:
    """A phase's step on `ranks` GPUs: each runs micro-batches / ranks of them (at least one), plus the ranks' cost."""
    micro, _ = phase
    return one_gpu_ms * max(1, micro // ranks) / micro + rank_cost_ms


def project(cfg, steps: int, measured: dict[tuple[int, int], float], ranks: int, rank_cost_ms: float,
            where: str) -> tuple[float, list[dict]]:
    """(seconds, phases) of the run's config trained for `steps` on `ranks` GPUs at each phase's projected ms."""
    import dataclasses

    fineweb = dataclasses.replace(cfg, steps=steps)
    counts = Counter(phase_of(fineweb, s) for s in range(fineweb.total_steps()))
    rows = []
    for phase, n in sorted(counts.items(), key=lambda kv: kv[0][0] * kv[0][1]):
        if phase not in measured:
            raise UsageError(f"{where}: the FineWeb run has steps of {phase[0]} micro-batches of {phase[1]:,} tokens, "
                             "which the run's logs never ran; pass the logs of a run of this schedule")
        ms = ranks_ms(phase, measured[phase], ranks, rank_cost_ms)
        rows.append(dict(microbatches=phase[0], tokens=phase[1], steps=n, one_gpu_ms=measured[phase],
                         ranks_ms=ms, seconds=n * ms / 1000))
    return sum(r["seconds"] for r in rows), rows


def reduced_bytes(cfg) -> int:
    """Bytes each rank all-reduces a step: every trained parameter's fp32 gradient, once (trainer/distributed.py)."""
    import torch

    from trainer.model import GPT

    with torch.device("meta"):
        model = GPT(cfg)
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def steps_estimates(base_steps: int, run_reach: float | None, base_reach: float | None,
                    record_factors: dict[str, float]) -> dict[str, int]:
    """{estimate: FineWeb steps}: (b) from the yardstick's steps to the target, (a) from the records' ratios."""
    out = {}
    if run_reach is not None and base_reach:
        out["yardstick"] = math.ceil(base_steps * run_reach / base_reach)
    if record_factors:
        out["records"] = math.ceil(base_steps * math.prod(record_factors.values()))
    return out


def parse_factors(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            factor = float(value)
        except ValueError:
            factor = math.nan
        if not name or not 0 < factor < 10:
            raise UsageError(f"--record-factor {item!r}: write NAME=F with F a step ratio, e.g. record46=0.971")
        out[name] = factor
    return out


def read_json(path: str, what: str) -> dict:
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{what} {path}: cannot read it as JSON ({e.__class__.__name__}); pass a "
                         "bench/results/recipe-*.json") from e
    if not isinstance(report, dict) or "runs" not in report or "val_every" not in report:
        raise UsageError(f"{what} {path}: not a bench/recipe.py result (no runs); pass a bench/results/recipe-*.json")
    return report


def read_log_times(path: str) -> dict[int, float]:
    from orchestrator.train_log import LogFormatError, parse_log

    try:
        result = parse_log(Path(path).read_text(errors="replace"))
    except OSError as e:
        raise UsageError(f"--log {path}: cannot read it ({e.strerror})") from e
    except LogFormatError as e:
        raise UsageError(f"--log {path}: {e}") from e
    times = {p.step: p.train_time_ms for p in (*result.val_points, *result.train_points)
             if p.train_time_ms is not None}
    if len(times) < 2:
        raise UsageError(f"--log {path}: no timed step lines; pass the run's launch log or its seed's train.log")
    return times


def plan(args) -> dict:
    """Every check that can refuse, then the projection as the JSON keeps it."""
    from trainer.config import TrainConfig

    report = read_json(args.recipe_json, "--recipe-json")
    base_report = read_json(args.base_json, "--base-json") if args.base_json else report
    cfg = run_config(report, args.run, "--recipe-json")
    run = find_run(report, args.run, "--recipe-json")
    base = find_run(base_report, args.base_run, "--base-json" if args.base_json else "--recipe-json") \
        if args.base_run else None
    if base is not None and base_report.get("reference_final_loss") != report.get("reference_final_loss"):
        raise UsageError("--base-json: its target loss is not the run's; both rows must be measured against the "
                         "same reference curve")
    if args.ranks < 1 or args.rank_cost_ms < 0:
        raise UsageError("--ranks must be >= 1 and --rank-cost-ms >= 0")
    factors = parse_factors(args.record_factor)
    base_steps = args.base_steps or TrainConfig().steps
    estimates = steps_estimates(base_steps, run.get("steps_to_loss"), base and base.get("steps_to_loss"), factors)
    if not estimates:
        raise UsageError("no step estimate: pass --base-run (both rows must reach the target) or --record-factor")
    measured = phase_ms(cfg, [read_log_times(p) for p in args.log])
    projections = []
    for name, steps in estimates.items():
        seconds, phases = project(cfg, steps, measured, args.ranks, args.rank_cost_ms, "--log")
        projections.append(dict(estimate=name, steps=steps, seconds=seconds, phases=phases))
    return dict(gpu=report["gpu"], torch=report.get("torch"), date=datetime.datetime.now(datetime.timezone.utc)
                .isoformat(timespec="seconds"), command=shlex.join(sys.argv), recipe_json=args.recipe_json,
                run=args.run, base_run=args.base_run, base_json=args.base_json, base_steps=base_steps,
                run_steps_to_loss=run.get("steps_to_loss"), base_steps_to_loss=base and base.get("steps_to_loss"),
                record_factors=factors, logs=args.log, ranks=args.ranks, rank_cost_ms=args.rank_cost_ms,
                rank_cost_measured=False, reduced_bytes_per_step=reduced_bytes(cfg), projections=projections)


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table("estimate", "steps", "phase", f"ms/step on one GPU ({result['gpu']})",
              f"ms/step on {result['ranks']} GPUs", "steps in phase", "seconds",
              title=f"projected time to the target on {result['ranks']} GPUs: run {result['run']!r}; "
                    f"+{result['rank_cost_ms']} ms a step for {result['ranks']} ranks (not measured; each rank "
                    f"all-reduces {result['reduced_bytes_per_step'] / 1e9:.2f} GB of fp32 gradients a step)")
    for p in result["projections"]:
        for i, ph in enumerate(p["phases"]):
            t.add_row(p["estimate"] if i == 0 else "", str(p["steps"]) if i == 0 else "",
                      f"{ph['microbatches']} x {ph['tokens']:,}", f"{ph['one_gpu_ms']:.1f}", f"{ph['ranks_ms']:.1f}",
                      str(ph["steps"]), f"{ph['seconds']:.1f}")
        t.add_row("", "", "total", "", "", "", f"{p['seconds']:.1f}", end_section=True)
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    console.print(t)


def main(argv: list[str] | None = None) -> int:
    from kernels import gpu_slug   # bench/kernels.py: 'NVIDIA H200' -> 'nvidia-h200'

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe-json", required=True, help="bench/results/recipe-*.json with the run")
    p.add_argument("--run", required=True, help="the run's label in it (ours, a variant's NAME)")
    p.add_argument("--log", action="append", required=True, help="the run's launch log or train.log (one per seed)")
    p.add_argument("--base-run", help="the row FineWeb's steps now belong to")
    p.add_argument("--base-json", help="the recipe JSON of --base-run, if another (the same reference curve)")
    p.add_argument("--base-steps", type=int, help="FineWeb's steps for --base-run (default: TrainConfig's steps)")
    p.add_argument("--record-factor", action="append", default=[], metavar="NAME=F",
                   help="a record's own step ratio for a technique of the run (estimate a)")
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--rank-cost-ms", type=float, default=RECORD28_RANK_COST_MS,
                   help="ms a step that more ranks add (default: the record-28 calibration, not measured)")
    p.add_argument("--tag", help="results file projection-<gpu>-TAG.json")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args(argv)
    try:
        result = plan(args)
    except UsageError as e:
        print(f"bench/projection.py: {e}", file=sys.stderr)
        return 2
    print_table(result)
    path = Path(args.out) / f"projection-{gpu_slug(result['gpu'])}{'-' + args.tag if args.tag else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The yardstick's arithmetic and tables: each run's mean curve, the target (the reference's final val loss), every
run's time to it, and the printed tables. Pure apart from printing; bench/recipe.py runs the trainers."""
from __future__ import annotations

import math
import statistics


def time_to_loss(curve, target: float) -> tuple[float, float] | None:
    """(seconds, steps) at which a curve of (step, train_time_ms, val_loss) first reaches target: the first
    point at or below it, linearly interpolated from the val point before it; None if it never does."""
    prev = None
    for step, ms, loss in curve:
        if not math.isfinite(loss):
            continue
        if loss <= target:
            if prev is None:
                return ms / 1000, float(step)
            f = (prev[2] - target) / (prev[2] - loss)   # prev is above target, so this is in (0, 1]
            return (prev[1] + f * (ms - prev[1])) / 1000, prev[0] + f * (step - prev[0])
        prev = (step, ms, loss)
    return None


def curve_of(result) -> list[dict]:
    """A parsed log's (orchestrator.train_log.SeedResult) val points as the JSON keeps them."""
    return [dict(step=p.step, val_loss=p.val_loss, train_time_ms=p.train_time_ms)
            for p in result.val_points if p.train_time_ms is not None]


def mean_curve(curves: list[list[dict]]) -> list[dict]:
    """Point by point mean of curves, over the val steps they all have."""
    if not curves:
        return []
    by_step = [{p["step"]: p for p in c} for c in curves]
    steps = sorted(set.intersection(*(set(b) for b in by_step)))
    return [dict(step=s, val_loss=statistics.fmean(b[s]["val_loss"] for b in by_step),
                 train_time_ms=statistics.fmean(b[s]["train_time_ms"] for b in by_step)) for s in steps]


def _reach(curve: list[dict], target: float | None) -> dict:
    hit = None if not curve or target is None else time_to_loss(
        [(p["step"], p["train_time_ms"], p["val_loss"]) for p in curve], target)
    return dict(time_to_loss_s=hit[0] if hit else None, steps_to_loss=hit[1] if hit else None)


def summarize_run(run: dict, target: float | None) -> dict:
    """A run with its mean curve, final loss, ms/step and time to target, and each seed's (re)computed."""
    seeds = [dict(s, **_reach(s["curve"], target)) for s in run["seeds"]]
    done = [s for s in seeds if s["state"] == "succeeded" and s["curve"]]
    curve = mean_curve([s["curve"] for s in done])
    reached = [s["time_to_loss_s"] for s in done if s["time_to_loss_s"] is not None]
    spread = dict(reached=len(reached), of=len(done), min=min(reached, default=None), max=max(reached, default=None),
                  mean=statistics.fmean(reached) if reached else None,
                  std=statistics.stdev(reached) if len(reached) > 1 else None)
    ms = [s["ms_per_step"] for s in done if s["ms_per_step"] is not None]
    return dict(run, seeds=seeds, curve=curve, final_val_loss=curve[-1]["val_loss"] if curve else None,
                final_train_time_s=curve[-1]["train_time_ms"] / 1000 if curve else None,
                ms_per_step=statistics.fmean(ms) if ms else None, time_to_loss_spread=spread, **_reach(curve, target))


def assemble(meta: dict, runs: list[dict]) -> dict:
    """The JSON: meta, then the target (the reference's final mean loss) and every run's time to it."""
    ref = next((r for r in runs if r["kind"] == "reference"), None)
    ref_curve = summarize_run(ref, None)["curve"] if ref else []
    target = ref_curve[-1]["val_loss"] if ref_curve else None
    out = [summarize_run(r, target) for r in runs]
    ref_time = next((r["time_to_loss_s"] for r in out if r["kind"] == "reference"), None)
    # a reference curve reused from another GPU model keeps its losses (the same arithmetic) but not its seconds
    same_gpu = meta.get("reference_gpu") in (None, meta.get("gpu"))
    ours = next((r for r in out if r["kind"] == "ours"), {})
    for r in out:
        t = r["time_to_loss_s"]
        r["time_to_loss_ratio"] = t / ref_time if t is not None and ref_time and same_gpu else None
        mine = same_gpu or r["kind"] != "reference"
        r["vs_ours"] = t / ours["time_to_loss_s"] if t is not None and ours.get("time_to_loss_s") and mine else None
    return dict(meta, reference_final_loss=target, reference_time_to_loss_s=ref_time,
                ours_time_to_loss_s=ours.get("time_to_loss_s"), time_to_loss_ratio=ours.get("time_to_loss_ratio"),
                runs=out)


def print_tables(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    def f(v, spec):
        return "-" if v is None else f"{v:{spec}}"

    target, common = report["reference_final_loss"], report.get("set", {})
    other = report.get("reference_gpu") not in (None, report["gpu"])
    t = Table("run", "overrides beyond --set", "seeds", "ms/step", "final val loss", "time to it (s)", "steps to it",
              "vs reference", "vs ours",
              title=f"time to the reference's final val loss {f(target, '.4f')}, {report['gpu']} (torch "
                    f"{report['torch']}), the reference {report['steps']} steps of {report['tokens_per_step']:,} "
                    f"tokens, ours {report.get('ours_steps', report['steps'])} steps" +
                    (f"; the reference ran on {report['reference_gpu']}: its seconds are not this GPU's, compare "
                     "with ours" if other else ""))
    for r in report["runs"]:
        spread = r["time_to_loss_spread"]
        if not r["curve"]:
            when = f"failed: {(r['seeds'][0]['reason'] if r['seeds'] else '') or (r.get('log_tail') or ['?'])[-1]}"
        elif r["time_to_loss_s"] is None:
            when = f"not reached (final loss {r['final_val_loss']:.4f} at {r['final_train_time_s']:.1f} s)"
        else:
            when = f"{r['time_to_loss_s']:.1f}" + (f" (seeds {f(spread['min'], '.1f')}-{f(spread['max'], '.1f')}, "
                                                   f"{spread['reached']}/{spread['of']} reached)" if spread["of"] > 1 else "")
        own = {k: v for k, v in r["overrides"].items() if k not in common or common[k] != v}
        t.add_row(r["label"], " ".join(f"{k}={v}" for k, v in own.items()) or "-", str(len(r["seeds"])),
                  f(r["ms_per_step"], ".1f"), f(r["final_val_loss"], ".4f"), when, f(r["steps_to_loss"], ".1f"),
                  f(r["time_to_loss_ratio"], ".3f"), f(r["vs_ours"], ".3f"))
    c = Table("step", *(r["label"] for r in report["runs"]), title="val loss by step (mean over seeds)")
    by_run = [{p["step"]: p["val_loss"] for p in r["curve"]} for r in report["runs"]]
    for step in sorted({s for b in by_run for s in b}):
        c.add_row(str(step), *(f(b.get(step), ".4f") for b in by_run))
    console = Console()
    if not console.is_terminal:   # a log file: rich would squeeze the tables into 80 columns and cut the figures
        console = Console(width=200)
    console.print(t, f"--set: {' '.join(f'{k}={v}' for k, v in common.items()) or '-'}", c)

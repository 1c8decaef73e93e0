"""PNG plots of a sweep (val loss against step and against time for every seed, the spread of train
times), and their upload beside the sweep under `<sweep-id>/report/`, manifest last.

matplotlib's object API with the Agg canvas: no pyplot global state, no display needed on a login node.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from orchestrator.artifacts import MANIFEST, Manifest, ManifestEntry
from orchestrator.results import SeedLog, load_sweep_runs
from orchestrator.stats import TARGET_VAL_LOSS, sweep_stats

log = logging.getLogger(__name__)

# The interesting part of a val curve is its last few tenths of a nat; the first steps start near 10.8.
Y_SPAN_ABOVE_TARGET = 1.2


def _figure() -> Figure:
    fig = Figure(figsize=(8, 5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _val_curves(runs: Sequence[SeedLog], target: float, x: str, path: Path) -> Path:
    fig = _figure()
    ax = fig.add_subplot()
    lows = []
    for run in runs:
        points = run.result.val_points if run.result else []
        if x == "time":
            points = [p for p in points if p.train_time_ms is not None]
            xs = [p.train_time_ms / 1000.0 for p in points]
        else:
            xs = [p.step for p in points]
        ys = [p.val_loss for p in points]
        if not xs:
            continue
        lows.extend(ys)
        if run.summary.complete:
            ax.plot(xs, ys, marker=".", linewidth=1.2, label=run.name)
        else:  # a dead seed's partial curve: shown, but visibly not a result
            ax.plot(xs, ys, linestyle="--", color="grey", linewidth=1.0, label=f"{run.name} (failed)")
    ax.axhline(target, color="red", linestyle=":", linewidth=1.0, label=f"target {target}")
    finite = [y for y in lows if y == y]
    if finite:
        ax.set_ylim(min(min(finite), target) - 0.05, target + Y_SPAN_ABOVE_TARGET)
    ax.set_xlabel("training time (s)" if x == "time" else "step")
    ax.set_ylabel("validation loss")
    ax.set_title(f"Validation loss against {'training time' if x == 'time' else 'step'}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", ncol=2 if len(runs) > 8 else 1)
    fig.savefig(path)
    return path


def _train_times(runs: Sequence[SeedLog], target: float, path: Path) -> Path:
    stats = sweep_stats([r.summary for r in runs], target)
    times = [r.summary.train_time_s for r in runs if r.summary.complete and r.summary.train_time_s is not None]
    fig = _figure()
    ax = fig.add_subplot()
    if times:
        ax.hist(times, bins=min(20, max(5, len(times))), color="tab:blue", alpha=0.6, edgecolor="black")
        # Every seed as a tick, since a sweep has few seeds and a histogram hides them.
        ax.plot(times, [0] * len(times), "|", color="black", markersize=20)
        if stats.train_time_mean_s is not None:
            ax.axvline(stats.train_time_mean_s, color="tab:red", label=f"mean {stats.train_time_mean_s:.2f} s")
        if stats.train_time_ci95_s:
            lo, hi = stats.train_time_ci95_s
            ax.axvspan(lo, hi, color="tab:red", alpha=0.15, label=f"95% CI [{lo:.2f}, {hi:.2f}] s")
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no complete seeds", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("training time (s), complete seeds")
    ax.set_ylabel("seeds")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"Training time over {len(times)} complete seed(s) of {len(runs)}")
    fig.savefig(path)
    return path


def make_plots(runs: Sequence[SeedLog], out_dir: str | Path, target: float = TARGET_VAL_LOSS) -> list[Path]:
    """Write the three PNGs into out_dir and return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [
        _val_curves(runs, target, "step", out / "val_loss_vs_step.png"),
        _val_curves(runs, target, "time", out / "val_loss_vs_time.png"),
        _train_times(runs, target, out / "train_time_distribution.png"),
    ]


def write_report(store: Any, sweep_id: str, out_dir: str | Path, target: float = TARGET_VAL_LOSS,
                 target_source: str = "") -> Manifest:
    """Plots and stats.json into out_dir, uploaded to `<sweep>/report/`; `report/manifest.json` (the seeds'
    manifest format: key relative to the prefix, size, sha256) goes last, so a report without it is unfinished."""
    sweep_id = sweep_id.strip("/")
    prefix = f"{sweep_id}/report"
    runs = load_sweep_runs(store, sweep_id)
    out = Path(out_dir)
    files = make_plots(runs, out, target)
    stats_path = out / "stats.json"
    stats = sweep_stats([r.summary for r in runs], target)
    stats.target_source = target_source
    stats_path.write_text(json.dumps(stats.to_dict(), indent=2))
    files.append(stats_path)
    entries = []
    for path in files:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        store.put_file(path, f"{prefix}/{path.name}", sha256=digest)
        entries.append(ManifestEntry(path.name, path.stat().st_size, digest))
        log.info("uploaded %s/%s", prefix, path.name)
    manifest = Manifest(prefix, entries)
    store.put_bytes(manifest.to_json(), f"{prefix}/{MANIFEST}")  # the commit marker, last
    return manifest

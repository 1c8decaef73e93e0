"""`speedrun runs|show|collect|stats|compare|report`: a sweep's results, read from the store and printed.

Argument parsing and printing only (orchestrator/cli.py registers these with add_results_commands); the
numbers come from orchestrator.summary, results, stats and report.
"""
from __future__ import annotations

import sys
from pathlib import Path

from rich.table import Table

from orchestrator.config import ConfigError
from orchestrator.terminal import OutputConsole

console = OutputConsole(highlight=False)


def open_store_for(url: str):
    """The store as the CLI uses it: a person is waiting, so an unreachable endpoint fails in ~20 s, not the
    node uploader's 5-minute budget (which exists so that artifacts are never lost)."""
    from orchestrator.store import open_store

    return open_store(url, retry_budget_s=20.0) if str(url).startswith("s3://") else open_store(url)


def _fmt(v, spec: str, unit: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{unit}"


def print_sweep(store, sweep_id: str, store_url: str, cluster=None) -> None:
    from orchestrator.summary import sweep_summary
    from orchestrator.sweep import SeedState, seed_dir

    s = sweep_summary(store, sweep_id)
    t = Table(title=f"{sweep_id}", title_justify="left")
    for col in ("seed", "state", "val loss", "train time", "step avg", "peak mem", "artifacts"):
        t.add_column(col, justify="right" if col not in ("state", "artifacts") else "left")
    for r in s.seeds:
        t.add_row(str(r.seed), r.state, _fmt(r.val_loss, ".4f"), _fmt(r.train_time_s, ".1f", " s"),
                  _fmt(r.step_avg_ms, ".1f", " ms"), _fmt(r.peak_mem_mib, ".0f", " MiB"),
                  f"{seed_dir(r.seed)}/")
    console.print(t)
    console.print(f"artifacts: {store_url.rstrip('/')}/{sweep_id}/", markup=False, soft_wrap=True)
    for r in s.seeds:
        if r.state != SeedState.SUCCEEDED and r.reason:
            console.print(f"seed {r.seed}: {r.state}: {r.reason}", style="red", markup=False, soft_wrap=True)
    if s.entropy_rate_nats is not None:
        console.print(f"data entropy rate (best possible val loss): {s.entropy_rate_nats:.4f} nats")
    if cluster is None:  # `show`: the cluster the sweep was launched on, from its stored plan
        from orchestrator.plan import LaunchPlan
        from orchestrator.summary import json_or_none
        from orchestrator.sweep import plan_key

        try:
            cluster = LaunchPlan.from_dict(json_or_none(store, plan_key(sweep_id))).cluster
        except (AttributeError, KeyError, TypeError, ValueError):  # no plan, or one this version cannot read
            cluster = None
    if cluster is not None and s.wall_s:
        from orchestrator.summary import cost_line

        console.print(cost_line(cluster, s.wall_s), markup=False)


def _store_for(args, run_id: str | None = None):
    """The store named by --store, else the one recorded for RUN, else the local cluster's default."""
    from orchestrator.config import load_cluster
    from orchestrator.runs import find_sweep

    if args.store:
        return open_store_for(args.store), args.store
    if run_id:
        try:
            rec = find_sweep(run_id)
            return open_store_for(rec.store_url), rec.store_url
        except ConfigError:
            pass
    cluster, _ = load_cluster(args.cluster)
    return open_store_for(cluster.store), cluster.store


def cmd_runs(args) -> int:
    from orchestrator.runs import list_sweeps
    from orchestrator.summary import sweep_summary
    from orchestrator.sweep import SeedState

    store, url = _store_for(args)
    t = Table(title=f"runs in {url}", title_justify="left")
    for col in ("run", "seeds", "complete", "best val loss"):
        t.add_column(col)
    for sweep in list_sweeps(store):
        s = sweep_summary(store, sweep)
        done = [r for r in s.seeds if r.state == SeedState.SUCCEEDED]
        best = min((r.val_loss for r in done if r.val_loss is not None), default=None)
        t.add_row(sweep, str(len(s.seeds)), f"{len(done)}/{len(s.seeds)}", _fmt(best, ".4f"))
    console.print(t)
    return 0


def cmd_show(args) -> int:
    from orchestrator.runs import list_sweeps

    store, url = _store_for(args, args.run)
    if args.run not in list_sweeps(store):
        raise ConfigError(f"run {args.run!r}: not found in store {url}; list runs with `speedrun runs --store {url}`")
    print_sweep(store, args.run, url)
    return 0


def cmd_collect(args) -> int:
    from orchestrator.artifacts import collect
    from orchestrator.config import expand, load_cluster
    from orchestrator.sweep import handle_key, plan_key

    store, url = _store_for(args, args.run)
    spool = Path(args.spool) if args.spool else None
    if spool is None:
        cluster, _ = load_cluster(args.cluster)
        spool = expand(cluster.work_dir) / args.run / "spool"
    if not spool.is_dir() and not any(store.exists(k) for k in (plan_key(args.run), handle_key(args.run))):
        raise ConfigError(f"collect {args.run}: no spool at {spool} and no such sweep in {url}; check the id "
                          "(`speedrun status` lists runs) or pass --spool")
    report = collect(store, spool, args.run)
    console.print(report.describe() if hasattr(report, "describe") else str(report))
    return 0 if getattr(report, "ok", True) else 1


def _stats_runs(args, what: list[str]):
    """SeedRuns from log files (every argument a file, or a folder of *.txt/*.log) or from one sweep id,
    where they came from, and the target to test them against (--target, else the sweep job's)."""
    from orchestrator.results import ResultsError, load_sweep_runs, runs_from_logs, sweep_target
    from orchestrator.sweep import choose_target

    paths = [p for p in map(Path, what) if p.exists()]
    if paths and len(paths) == len(what):
        files = [f for p in paths for f in (sorted([*p.glob("*.txt"), *p.glob("*.log")]) if p.is_dir() else [p])]
        if not files:
            raise ResultsError(f"{what[0]}: no *.txt or *.log training logs in it; pass log files or a sweep id")
        return runs_from_logs(files), f"{len(files)} log file(s)", choose_target(args.target, None)
    missing = next(w for w in what if not Path(w).exists())
    if len(what) != 1 or Path(missing).suffix in (".txt", ".log") or "/" in missing.rstrip("/"):
        raise ResultsError(f"{missing}: no such log file; pass either log files or ONE sweep id")
    store, url = _store_for(args, what[0])
    runs = load_sweep_runs(store, what[0])
    return runs, f"{url.rstrip('/')}/{what[0]}", choose_target(args.target, sweep_target(store, what[0]))


def cmd_stats(args) -> int:
    import json

    from orchestrator.stats import render_stats, sweep_stats

    runs, where, (target, source) = _stats_runs(args, args.what)
    s = sweep_stats([r.summary for r in runs], target)
    s.target_source = source
    if args.json:
        sys.stdout.write(json.dumps(s.to_dict(), indent=2) + "\n")
    else:
        console.print(render_stats(s, title=where))
    return 1 if args.check and not s.is_record else 0   # a script can branch on it: `speedrun stats --check X && ...`


def cmd_compare(args) -> int:
    import json

    from orchestrator.stats import compare, render_comparison

    a, _, target_a = _stats_runs(args, [args.a])
    b, _, target_b = _stats_runs(args, [args.b])
    c = compare([r.summary for r in a], [r.summary for r in b], args.a, args.b, targets=[target_a, target_b])
    if args.json:
        sys.stdout.write(json.dumps(c.to_dict(), indent=2) + "\n")
    else:
        console.print(render_comparison(c))
    return 0


def cmd_report(args) -> int:
    from orchestrator.report import write_report
    from orchestrator.results import sweep_target
    from orchestrator.sweep import choose_target

    store, url = _store_for(args, args.sweep)
    out = Path(args.out or f"{args.sweep}-report")
    target, source = choose_target(args.target, sweep_target(store, args.sweep))
    manifest = write_report(store, args.sweep, out, target, target_source=source)
    t = Table(title=f"report of {args.sweep}", title_justify="left",
              caption=f"target val loss: {target} ({source})\nlocal: {out}/\nstore: {url.rstrip('/')}/{manifest.prefix}/",
              caption_justify="left")
    for col in ("file", "size", "sha256"):
        t.add_column(col)
    for f in manifest.files:
        t.add_row(f.key, f"{f.size / 1024:.0f} KiB", f.sha256[:16])
    console.print(t)
    return 0


def add_stats_commands(sub) -> None:
    """`speedrun stats|compare|report` (orchestrator/stats.py, orchestrator/report.py)."""
    from orchestrator.sweep import TARGET_VAL_LOSS

    def common(p):
        p.add_argument("--store", help="object store holding the sweep (default: the run's, else the cluster's)")
        p.add_argument("--cluster", default="local", help="cluster config whose store to use (default: local)")
        p.add_argument("--target", type=float, default=None,
                       help=f"target val loss (default: the sweep job's target_loss, else {TARGET_VAL_LOSS})")

    p = sub.add_parser("stats", help="seeds table, mean ± std, p-value against the target, train time CI")
    p.add_argument("what", nargs="+", metavar="SWEEP|LOG", help="a sweep id, or training log files / folders")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--check", action="store_true",
                   help="exit 1 unless the sweep is a record (mean below the target at p < 0.01); tables print as usual")
    common(p)
    p.set_defaults(func=cmd_stats)
    p = sub.add_parser("compare", help="B minus A: val loss and train time with 95%% CIs (Welch)")
    p.add_argument("a", metavar="A", help="sweep id or folder of logs")
    p.add_argument("b", metavar="B", help="sweep id or folder of logs")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    common(p)
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("report", help="PNG plots of a sweep, uploaded to <sweep>/report/ with a manifest")
    p.add_argument("sweep")
    p.add_argument("--out", help="local folder for the plots (default: ./<sweep>-report)")
    common(p)
    p.set_defaults(func=cmd_report)


def add_results_commands(sub) -> None:
    """`speedrun runs|show|collect` and `stats|compare|report`."""
    p = sub.add_parser("runs", help="list runs found in a store")
    p.add_argument("--store")
    p.add_argument("--cluster", default="local")
    p.set_defaults(func=cmd_runs)
    p = sub.add_parser("show", help="one run's summary")
    p.add_argument("run")
    p.add_argument("--store")
    p.add_argument("--cluster", default="local")
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("collect", help="finish an interrupted upload from the node's spool")
    p.add_argument("run")
    p.add_argument("--store")
    p.add_argument("--spool", help="spool directory (default: <work_dir>/<run>/spool)")
    p.add_argument("--cluster", default="local")
    p.set_defaults(func=cmd_collect)

    add_stats_commands(sub)

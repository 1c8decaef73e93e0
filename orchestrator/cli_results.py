"""`speedrun runs|show|collect|stats|compare|report`: a sweep's results, read from the store and printed.

Argument parsing and printing only (orchestrator/cli.py registers these with add_results_commands); the
numbers come from orchestrator.summary, results, stats and report.
"""
from __future__ import annotations

from pathlib import Path

from rich.table import Table

from orchestrator.config import ConfigError
from orchestrator.terminal import OutputConsole, print_json

console = OutputConsole(highlight=False)


def open_store_for(url: str):
    """The store as the CLI uses it: a person is waiting, so an unreachable endpoint fails in ~20 s, not the
    node uploader's 5-minute budget (which exists so that artifacts are never lost)."""
    from orchestrator.store import open_store

    return open_store(url, retry_budget_s=20.0) if str(url).startswith("s3://") else open_store(url)


def _fmt(v, spec: str, unit: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{unit}"


def sweep_json(store, sweep_id: str, store_url: str) -> dict:
    """`speedrun show RUN --json`: the sweep's seeds as the table shows them, and where its artifacts are."""
    from dataclasses import asdict

    from orchestrator.summary import sweep_summary

    s = sweep_summary(store, sweep_id)
    return {"run": sweep_id, "store": store_url, "artifacts": f"{store_url.rstrip('/')}/{sweep_id}/", **asdict(s)}


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
    from orchestrator.cluster_config import load_cluster
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
    rows = []
    for sweep in list_sweeps(store):
        s = sweep_summary(store, sweep)
        done = [r for r in s.seeds if r.state == SeedState.SUCCEEDED]
        best = min((r.val_loss for r in done if r.val_loss is not None), default=None)
        rows.append({"run": sweep, "seeds": len(s.seeds), "complete": len(done), "best_val_loss": best})
    if args.json:
        print_json({"store": url, "runs": rows})
        return 0
    t = Table(title=f"runs in {url}", title_justify="left")
    for col in ("run", "seeds", "complete", "best val loss"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["run"], str(r["seeds"]), f"{r['complete']}/{r['seeds']}", _fmt(r["best_val_loss"], ".4f"))
    console.print(t)
    return 0


def cmd_show(args) -> int:
    from orchestrator.runs import list_sweeps

    store, url = _store_for(args, args.run)
    if args.run not in list_sweeps(store):
        raise ConfigError(f"run {args.run!r}: not found in store {url}; list runs with `speedrun runs --store {url}`")
    if args.json:
        print_json(sweep_json(store, args.run, url))
    else:
        print_sweep(store, args.run, url)
    return 0


def cmd_collect(args) -> int:
    from orchestrator.artifacts import collect
    from orchestrator.cluster_config import load_cluster
    from orchestrator.config import expand
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
    """SeedRuns from log files (every argument a file, or a folder of logs or a downloaded sweep) or from one
    sweep id, where they came from, the target to test them against (--target, else the sweep job's), and
    notes on the files (skipped, duplicates)."""
    from orchestrator.log_files import is_sweep_folder, load_log_files
    from orchestrator.results import ResultsError, load_sweep_runs, sweep_target
    from orchestrator.sweep import choose_target

    paths = [p for p in map(Path, what) if p.exists()]
    if len(paths) == 1 == len(what) and is_sweep_folder(paths[0]):
        # A sweep copied out of the store (`aws s3 sync s3://bucket/prefix/SWEEP SWEEP`): read as the store reads
        # it, so a seed without its manifest is incomplete and the job's target applies.
        from orchestrator.store import open_store

        folder = paths[0].absolute()
        store = open_store(folder.parent)
        target = choose_target(args.target, sweep_target(store, folder.name))
        return load_sweep_runs(store, folder.name), str(folder), target, []
    if paths and len(paths) == len(what):
        pool = load_log_files(paths)
        return pool.runs, f"{len(pool.runs)} log file(s)", choose_target(args.target, None), pool.notes
    missing = next(w for w in what if not Path(w).exists())
    if len(what) != 1 or Path(missing).suffix in (".txt", ".log") or "/" in missing.rstrip("/"):
        raise ResultsError(f"{missing}: no such log file; pass either log files or ONE sweep id")
    store, url = _store_for(args, what[0])
    runs = load_sweep_runs(store, what[0])
    return runs, f"{url.rstrip('/')}/{what[0]}", choose_target(args.target, sweep_target(store, what[0])), []


def cmd_stats(args) -> int:
    from orchestrator.stats import group_by_steps, render_stats, sweep_stats

    runs, where, (target, source), notes = _stats_runs(args, args.what)
    summaries = [r.summary for r in runs]
    groups = group_by_steps(summaries) if args.group_by == "steps" else [(None, summaries)]
    stats = []
    for _, group in groups:
        s = sweep_stats(group, target)
        s.target_source = source
        stats.append(s)
    if args.group_by is None:
        stats[0].notes[:0] = notes
        if args.json:
            print_json(stats[0].to_dict())
        else:
            console.print(render_stats(stats[0], title=where))
    elif args.json:
        print_json({"group_by": args.group_by, "notes": notes,
                     "groups": [{"steps": steps, **s.to_dict()} for (steps, _), s in zip(groups, stats)]})
    else:
        for note in notes:
            console.print(note, style="yellow", markup=False)
        for (steps, _), s in zip(groups, stats):
            console.print(render_stats(s, title=f"{where}: {'unknown' if steps is None else steps} steps"))
    # a script can branch on it: `speedrun stats --check X && ...`; with groups, every group must be a record
    return 1 if args.check and not all(s.is_record for s in stats) else 0


def cmd_compare(args) -> int:
    from orchestrator.stats import compare, render_comparison

    a, _, target_a, notes_a = _stats_runs(args, [args.a])
    b, _, target_b, notes_b = _stats_runs(args, [args.b])
    c = compare([r.summary for r in a], [r.summary for r in b], args.a, args.b, targets=[target_a, target_b])
    c.notes[:0] = notes_a + notes_b
    if args.json:
        print_json(c.to_dict())
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
    if args.json:
        print_json({"sweep": args.sweep, "target": target, "target_source": source, "local": str(out),
                    "store": f"{url.rstrip('/')}/{manifest.prefix}/",
                    "files": [{"key": f.key, "size": f.size, "sha256": f.sha256} for f in manifest.files]})
        return 0
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
    p.add_argument("--group-by", choices=["steps"], default=None,
                   help="one table (and test) per step count, for a pool that mixes runs of different lengths")
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
    p.add_argument("--json", action="store_true", help="machine-readable output")
    common(p)
    p.set_defaults(func=cmd_report)


def add_results_commands(sub) -> None:
    """`speedrun runs|show|collect` and `stats|compare|report`."""
    p = sub.add_parser("runs", help="list runs found in a store")
    p.add_argument("--store")
    p.add_argument("--cluster", default="local")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_runs)
    p = sub.add_parser("show", help="one run's summary")
    p.add_argument("run")
    p.add_argument("--store")
    p.add_argument("--cluster", default="local")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("collect", help="finish an interrupted upload from the node's spool")
    p.add_argument("run")
    p.add_argument("--store")
    p.add_argument("--spool", help="spool directory (default: <work_dir>/<run>/spool)")
    p.add_argument("--cluster", default="local")
    p.set_defaults(func=cmd_collect)

    add_stats_commands(sub)

"""`speedrun launch` and `speedrun prefetch`: a job planned, checked before anything is created, submitted and
followed. Argument parsing and printing only (orchestrator/cli.py registers these with add_launch_commands); the
work happens in plan, backends, watch, workdir and offline.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from orchestrator.cli_results import open_store_for, print_sweep
from orchestrator.config import ConfigError
from orchestrator.sweep import MAX_SEEDS
from orchestrator.terminal import OutputConsole, print_json

console = OutputConsole(highlight=False)


def _prepare_launch(args):
    """Load, validate and plan; creates nothing. Returns (plan, backend)."""
    from orchestrator.backends.registry import get_backend
    from orchestrator.cluster_config import load_cluster
    from orchestrator.config import check_store_url, check_writable_dir, expand, load_job
    from orchestrator.plan import build_plan

    from orchestrator.backends.ray_launcher_config import check_launch_nodes

    job = load_job(args.job, args.set)
    cluster, cluster_path = load_cluster(args.cluster, args.set)
    check_launch_nodes(cluster, cluster_path, args.set)
    if args.seeds is not None and not 1 <= args.seeds <= MAX_SEEDS:
        raise ConfigError(f"--seeds {args.seeds}: must be from 1 to {MAX_SEEDS} (a sweep's bound)")
    both = [o for o in args.set if o.partition("=")[0].strip() == "seeds"]
    if args.seeds is not None and both:
        raise ConfigError(f"--seeds {args.seeds} and --set {both[-1]}: two seed counts; give one of them")
    if args.seeds_parallel:
        if cluster.backend != "slurm":
            raise ConfigError(f"--seeds-parallel: only the slurm backend runs seeds as a job array, not {cluster.backend!r}")
        cluster.slurm.seeds_parallel = True
    store_url = args.store or job.store or cluster.store
    store_key = "--store" if args.store else (f"{args.job}: store" if job.store else f"{cluster_path}: store")
    check_store_url(store_url, store_key)
    if "://" not in store_url or store_url.startswith("file://"):
        store_url = str(expand(store_url.removeprefix("file://")).absolute())
    _check_data(job, args.job, local=cluster.backend == "local")
    if cluster.backend == "local":  # remote nodes' directories are checked by the node runner there
        data_key = f"{args.job}: data.dir" if job.data.dir else f"{cluster_path}: data_dir"
        check_writable_dir(expand(job.data.dir or cluster.data_dir), "data directory", data_key)
        check_writable_dir(expand(cluster.work_dir), "work directory", f"{cluster_path}: work_dir")
    plan = build_plan(job, cluster, Path(args.job), cluster_path, seeds=args.seeds, store=store_url)
    return plan, get_backend(cluster)


def _check_data(job, job_file, local: bool) -> None:
    """Shards the source cannot provide, where that is known here (see data.stage.unprovided_shards)."""
    from orchestrator.data import DataError
    from orchestrator.data.stage import unprovided_shards

    d = job.data
    if local and "://" not in d.source and not Path(d.source).is_dir():
        raise ConfigError(f"{job_file}: data.source: {d.source} is not a folder on this machine; give the folder "
                          "that holds the fineweb_*.bin shards (relative paths are read from the job file's folder)")
    try:
        found = unprovided_shards(d.source, d.train_shards, d.val_shards)
    except DataError as e:
        raise ConfigError(f"{job_file}: data.source: {e}") from None
    if found and found[0]:
        lacking, fix = found
        raise ConfigError(f"{job_file}: data: {d.source} does not provide {', '.join(lacking[:3])}"
                          f"{f' and {len(lacking) - 3} more' if len(lacking) > 3 else ''}; {fix}")


def _time_limit_note(plan) -> str:
    """' (each stopped after N min)' where the job sets seed_time_limit_min, else ''."""
    limit = plan.job.seed_time_limit_min
    return f" (each stopped after {limit:g} min)" if limit else ""


def _print_plan(plan, backend) -> None:
    t = Table(title=f"plan {plan.sweep_id}", show_header=False, title_justify="left")
    t.add_row("job", f"{plan.job_file} ({plan.job.name})")
    t.add_row("cluster", f"{plan.cluster_file} (backend {plan.cluster.backend}, {plan.cluster.nodes} node(s) x "
                         f"{plan.cluster.gpus_per_node} {plan.cluster.device})")
    t.add_row("seeds", ", ".join(map(str, plan.seeds)) + _time_limit_note(plan))
    t.add_row("data", f"{plan.job.data.source} -> {plan.data_dir}")
    t.add_row("trainer", plan.job.script or ", ".join(f"{k}={v}" for k, v in plan.job.trainer.items()) or "defaults")
    for what, shipped in (("workdir", plan.workdir), ("offline", plan.offline)):
        if shipped:
            t.add_row(what, f"{shipped['root']}: {shipped['files']} files, {shipped['bytes'] / 1e6:.2f} MB "
                            f"-> {plan.store_url}/{shipped['key']}")
    t.add_row("store", f"{plan.store_url}/{plan.sweep_id}/")
    t.add_row("code", f"{plan.code.get('commit') or 'unknown'}{' (dirty)' if plan.code.get('dirty') else ''}")
    console.print(t)
    console.print(backend.describe(plan), markup=False, soft_wrap=True)  # sbatch lines must stay copyable


def _follow(backend, handle) -> None:
    """Stream the node runner's output; on a terminal, train-step lines become one live status line."""
    from orchestrator.train_log import StepEvent, parse_line

    if not console.is_terminal:
        for line in backend.logs(handle, follow=True):
            console.print(line, markup=False, soft_wrap=True)
        return
    with console.status("waiting for the first step...") as status:
        for line in backend.logs(handle, follow=True):
            ev = parse_line(line)
            if isinstance(ev, StepEvent) and ev.val_loss is None and ev.train_loss is not None:
                total = f"/{ev.total_steps}" if ev.total_steps else ""   # llm.c-style lines carry no total
                timed = "" if ev.train_time_ms is None else f"  train_time {ev.train_time_ms / 1000:.1f}s"
                status.update(f"step {ev.step}{total}  train_loss {ev.train_loss:.4f}{timed}  "
                              f"step_avg {ev.step_avg_ms or 0:.1f}ms")
            else:
                console.print(line, markup=False, soft_wrap=True)


def cmd_launch(args) -> int:
    from orchestrator.backends.ray_rented import rented_for_launch

    if args.json and not args.dry_run:
        raise ConfigError("--json: only with --dry-run (a launch follows its logs); launch with --detach, then "
                          "`speedrun status RUN --json`")
    plan, backend = _prepare_launch(args)
    rented = rented_for_launch(plan, args.cluster, args.down, args.detach, args.idle_minutes, console)
    if args.dry_run and args.json:
        print_json({"plan": plan.shown_dict(), "submit": backend.describe(plan).splitlines(),
                    "rented": rented.describe(args.down, args.idle_minutes) if rented else []})
        return 0
    if args.dry_run:
        _print_plan(plan, backend)
        for line in rented.describe(args.down, args.idle_minutes) if rented else []:
            console.print(line, markup=False, soft_wrap=True)
        console.print("[dim]dry run: nothing was created, provisioned or submitted[/dim]")
        return 0
    if rented is None:
        return _run_sweep(args, plan, backend, {})
    from orchestrator.backends.ray_launcher import confirm_cost
    from orchestrator.backends.ray_rented import launch_around

    if not confirm_cost(plan.cluster, rented.path, rented.config, args.yes, console, "launch"):
        console.print("nothing was provisioned or submitted")
        return 1
    state: dict = {}

    def run() -> int:
        rented.ensure_up()
        if args.idle_minutes is not None:
            rented.start_autostop(args.idle_minutes)
        return _run_sweep(args, plan, backend, state, keep_running_on_interrupt=not args.down)

    def cancel() -> None:
        if "handle" in state:
            backend.cancel(state["handle"])

    def collect() -> None:
        missing = rented.collect(plan, state["store"]) if "store" in state else []
        if missing:
            console.print(f"seeds {missing} have no manifest in the store (stopped, failed, or their upload did not "
                          "finish); what they left on the nodes goes with the cluster", style="red", markup=False)

    return launch_around(rented, args.down, run, cancel, collect)


def _run_sweep(args, plan, backend, state: dict, keep_running_on_interrupt: bool = True) -> int:
    from orchestrator.runs import SweepRecord, record_sweep
    from orchestrator.sweep import plan_key
    from orchestrator.watch import watch
    from orchestrator.workdir import ship_code

    backend.check(plan)
    store = open_store_for(plan.store_url)
    state["store"] = store
    ship_code(plan, store)  # the script's folder and the offline caches, unless the store has them already
    store.put_bytes(plan.to_json().encode(), plan_key(plan.sweep_id))
    handle = backend.submit(plan)
    state["handle"] = handle
    record_sweep(SweepRecord(plan.sweep_id, plan.store_url, plan.cluster_file, plan.job_file, plan.created_at,
                             handle.to_dict()), store)
    console.print(f"launched [bold]{plan.sweep_id}[/bold] on {plan.cluster.name} ({backend.name}); "
                  f"seeds {plan.seeds}" + _time_limit_note(plan))
    if args.detach:
        console.print(f"follow with: speedrun logs -f {plan.sweep_id}")
        if backend.reruns_dead_jobs and plan.job.retries:
            console.print(f"dead jobs are re-submitted (retries: {plan.job.retries}) while a watcher runs: "
                          f"speedrun watch {plan.sweep_id}")
        return 0
    try:
        _follow(backend, handle)
    except KeyboardInterrupt:
        if not keep_running_on_interrupt:
            raise
        console.print(f"\ndetached; the run goes on. cancel with: speedrun cancel {plan.sweep_id}")
        return 130
    status = watch(backend, handle, poll_s=0.5, say=lambda line: console.print(line, markup=False))
    print_sweep(store, plan.sweep_id, plan.store_url, plan.cluster)
    console.print(f"run {plan.sweep_id}: {status.state.value} ({status.detail})")
    return 0 if status.state.value == "SUCCEEDED" else 1


def cmd_prefetch(args) -> int:
    from orchestrator.config import load_job
    from orchestrator.offline import missing, prefetch

    job = load_job(args.job)
    if job.offline is None or not (job.offline.hf_kernels or job.offline.tiktoken):
        raise ConfigError(f"{args.job}: offline: the job names nothing to pre-fetch; add offline.hf_kernels or "
                          "offline.tiktoken")
    root = prefetch(job.offline, say=lambda line: console.print(line, markup=False))
    left = missing(job.offline)
    if left:
        raise ConfigError(f"{args.job}: offline: {', '.join(left)} still missing from {root} after the download")
    console.print(f"pre-fetched into {root}; `speedrun launch {args.job}` ships it to the nodes")
    return 0


def seed_count(text: str) -> int:
    """--seeds: a whole number (its bound, sweep.MAX_SEEDS, is checked with the job's own seeds)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text} is not a whole number; give a seed count from 1 to {MAX_SEEDS}") from None


def add_launch_commands(sub) -> None:
    p = sub.add_parser("launch", help="run a job (all its seeds) on a cluster")
    p.add_argument("job", help="job YAML, e.g. jobs/smoke.yaml")
    p.add_argument("--cluster", default="local", help="cluster_configs/NAME.yaml or a path (default: local)")
    p.add_argument("--seeds", type=seed_count, help=f"number of seeds, 1 to {MAX_SEEDS} (overrides seeds: in the job)")
    p.add_argument("--store", help="object store: a directory, file://..., or s3://bucket/prefix")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a job key (trainer.steps=50) or a cluster key (cluster.nodes=2)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and what would be submitted; change nothing")
    p.add_argument("--detach", action="store_true", help="return once submitted")
    p.add_argument("--seeds-parallel", action="store_true", help="slurm: one array task per seed")
    p.add_argument("--json", action="store_true", help="with --dry-run: the plan and what would be submitted, as JSON")
    p.add_argument("--down", action="store_true",
                   help="rented cluster (ray.launcher): release it after the sweep, on success, failure or Ctrl-C")
    p.add_argument("--idle-minutes", type=float, metavar="N",
                   help="rented cluster: a watcher on the head releases it after N minutes without a running job")
    p.add_argument("--yes", action="store_true", help="rented cluster: go ahead at the stated $/hour without asking")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("prefetch", help="download what a job's offline: section names (hub kernels, tiktoken) into "
                                        "its cache folder, for nodes without internet")
    p.add_argument("job", help="job YAML with an offline: section")
    p.set_defaults(func=cmd_prefetch)

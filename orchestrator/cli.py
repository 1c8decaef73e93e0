"""`speedrun`: argument parsing and printing only; the work happens in the modules it calls.

Exit codes: 0 success, 1 the run failed, 2 bad input (one sentence naming file, key and fix; nothing created).
"""
from __future__ import annotations

import argparse
import logging
import sys

from rich.console import Console
from rich.table import Table

from orchestrator.cli_data import add_data_commands
from orchestrator.cli_launch import add_launch_commands
from orchestrator.cli_results import add_results_commands, open_store_for
from orchestrator.config import ConfigError
from orchestrator.terminal import OutputConsole, print_json

console = OutputConsole(highlight=False)
err_console = Console(stderr=True, highlight=False)


# ------------------------------------------------------------------------------- following a sweep


def _engine_of(rec, store):
    """The backend that runs a sweep, from the plan stored beside it."""
    from orchestrator.backends.registry import get_backend
    from orchestrator.plan import LaunchPlan
    from orchestrator.sweep import plan_key

    plan = LaunchPlan.from_json(store.get_bytes(plan_key(rec.sweep_id)).decode())
    return get_backend(plan.cluster)


def _backend_for(args):
    """(backend, handle, store, record) of the sweep named by args.run: an id, a prefix or `last`, found in
    this machine's index or, with --store, in the store's handle.json."""
    from orchestrator.runs import find_sweep

    store = open_store_for(args.store) if args.store else None
    rec = find_sweep(args.run, store)
    store = store or open_store_for(rec.store_url)
    return _engine_of(rec, store), rec.handle_obj, store, rec


def _list_sweeps(args) -> int:
    import time

    from orchestrator.runs import index_path, recent_sweeps

    if args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: must be >= 1")
    store = open_store_for(args.store) if args.store else None
    rows = []
    stores = {args.store: store} if store is not None else {}
    for rec in recent_sweeps(store, limit=args.limit):
        launched = time.strftime("%Y-%m-%d %H:%M", time.gmtime(rec.created_at))
        try:
            if rec.store_url not in stores:
                stores[rec.store_url] = open_store_for(rec.store_url)
            st = _engine_of(rec, stores[rec.store_url]).status(rec.handle_obj)
            state, detail = st.state.value, st.detail.splitlines()[0][:80] if st.detail else ""
        except Exception as e:  # noqa: BLE001  one unreachable engine must not hide the other runs
            state, detail = "?", f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
        rows.append({"run": rec.sweep_id, "launched_utc": launched, "backend": rec.handle_obj.backend,
                     "state": state, "detail": detail})
    if args.json:
        print_json({"index": str(index_path()), "store": args.store, "runs": rows})
        return 0
    where = f"{index_path()}" + (f" and {args.store}" if args.store else "")
    t = Table(title=f"recent runs ({where})", title_justify="left")
    for col in ("run", "launched (UTC)", "backend", "state", "detail"):
        t.add_column(col, no_wrap=col == "run")
    for r in rows:
        t.add_row(r["run"], r["launched_utc"], r["backend"], r["state"], r["detail"])
    console.print(t)
    return 0


def cmd_status(args) -> int:
    if args.run is None:
        return _list_sweeps(args)
    backend, handle, store, rec = _backend_for(args)
    st = backend.status(handle)
    if args.json:
        print_json({"run": rec.sweep_id, "state": st.state.value, "detail": st.detail,
                    "jobs": {job: state.value for job, state in st.jobs.items()}})
        return 0
    console.print(f"{rec.sweep_id}: [bold]{st.state.value}[/bold] {st.detail}")
    for job, state in st.jobs.items():
        console.print(f"  job {job}: {state.value}")
    return 0


def cmd_watch(args) -> int:
    from orchestrator.watch import watch

    if args.poll <= 0:
        raise ConfigError(f"--poll {args.poll}: must be > 0 seconds")
    backend, handle, _, rec = _backend_for(args)
    console.print(f"{rec.sweep_id}: watching; dead jobs are re-submitted as the job's retries allow")
    st = watch(backend, handle, poll_s=args.poll, say=lambda line: console.print(line, markup=False))
    console.print(f"{rec.sweep_id}: [bold]{st.state.value}[/bold] {st.detail}")
    return 0 if st.state.value == "SUCCEEDED" else 1


def cmd_logs(args) -> int:
    backend, handle, _, _ = _backend_for(args)
    for line in backend.logs(handle, follow=args.follow):
        console.print(line, markup=False, soft_wrap=True)
    return 0


def cmd_cancel(args) -> int:
    backend, handle, _, rec = _backend_for(args)
    backend.cancel(handle)
    console.print(f"{rec.sweep_id}: cancel requested; now {backend.status(handle).state.value}")
    return 0


# --------------------------------------------------------------------------------------- parsing


class OneLineParser(argparse.ArgumentParser):
    """argparse's errors as one sentence and exit 2 (its usage block above the error buries the sentence)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="speedrun", description="Launch NanoGPT-speedrun jobs and prove records.")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True)

    add_launch_commands(sub)

    run_help = "a run id, an unambiguous prefix of one, or 'last'"
    store_help = "object store the run was launched with (finds runs launched on other machines)"
    p = sub.add_parser("status", help="state of a run; without RUN, the recent runs, newest first")
    p.add_argument("run", nargs="?", help=run_help)
    p.add_argument("--store", help=store_help)
    p.add_argument("--limit", type=int, default=10, help="how many recent runs to list (default 10)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("cancel", help="stop a run")
    p.add_argument("run", help=run_help)
    p.add_argument("--store", help=store_help)
    p.set_defaults(func=cmd_cancel)
    p = sub.add_parser("watch", help="follow a run to its end, re-submitting dead jobs as its retries allow")
    p.add_argument("run", help=run_help)
    p.add_argument("--store", help=store_help)
    p.add_argument("--poll", type=float, default=5.0, help="seconds between looks (default 5)")
    p.set_defaults(func=cmd_watch)
    p = sub.add_parser("logs", help="the node runner's output of a run")
    p.add_argument("run", help=run_help)
    p.add_argument("--store", help=store_help)
    p.add_argument("-f", "--follow", action="store_true")
    p.set_defaults(func=cmd_logs)

    add_results_commands(sub)
    add_data_commands(sub)
    add_cluster_commands(sub)
    return ap


def cmd_cluster(args) -> int:
    from orchestrator.backends.ray_launcher import cluster_command

    return cluster_command(args, console)


def add_cluster_commands(sub) -> None:
    """`speedrun cluster up|down|status` (orchestrator/backends/ray_launcher.py)."""
    p = sub.add_parser("cluster", help="rent or release nodes: the Ray cluster launcher on a cluster config")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("config", help="cluster_configs/NAME.yaml with a ray.launcher section, e.g. ray-cluster-aws")
    p.add_argument("--dry-run", action="store_true", help="print what would be provisioned and its $/hour; call nothing")
    p.add_argument("--json", action="store_true", help="up|down --dry-run: what would be provisioned; status: the nodes, as JSON")
    p.add_argument("--yes", action="store_true", help="go ahead without asking (up: at the stated $/hour)")
    p.set_defaults(func=cmd_cluster)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from orchestrator.data import DataError
    from orchestrator.results import ResultsError
    from orchestrator.store import StoreError

    try:
        return args.func(args) or 0
    except (ConfigError, StoreError, DataError, ResultsError) as e:  # bad input or an unreachable service
        err_console.print(f"error: {e}", style="red", markup=False, highlight=False, soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())

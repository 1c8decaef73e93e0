"""The Ray job's driver, inside the cluster (`python -m orchestrator.backends.ray_driver`):
  1. reserves one {GPU: gpus_per_node, CPU: 1} bundle per node (STRICT_SPREAD: one bundle per machine);
  2. starts one node runner per bundle as a Ray task (`python -m orchestrator.node --plan ... --node-rank R`),
     the master address being bundle 0's node;
  3. when a node runner dies (killed, its Ray worker or node lost), re-runs the seeds that have no
     succeeded manifest in the store, as orchestrator.sweep.next_action allows (a trainer that fails is
     retried by the node runner itself; a preempted node runner is resumed without using up a retry).
Its lines start with MARK, so that the laptop's `speedrun status` can quote the latest one.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from orchestrator.backends.ray import MARK, PLAN_ENV, STOP_GRACE_S
from orchestrator.sweep import describe_exit, ending_of_nodes, next_action, seed_done, seed_prefix

if TYPE_CHECKING:
    from orchestrator.plan import LaunchPlan



def _say(msg: str) -> None:
    print(f"{MARK} {msg}", flush=True)


def _die_with_parent() -> None:
    """In the node runner child: get SIGTERM if the Ray worker that started it dies (e.g. SIGKILL)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _stop_tree(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the node runner (it stops torchrun and checkpoints), then SIGKILL whatever is left."""
    import ray  # noqa: F401  (puts Ray's bundled psutil on sys.path)
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def node_address() -> tuple[str, int]:
    """Bundle 0's IP and a port free there, for the torchrun rendezvous."""
    import socket

    import ray

    ip = ray.util.get_node_ip_address()
    with socket.socket() as s:
        s.bind((ip, 0))
        return ip, s.getsockname()[1]


def run_node(plan_json: str, rank: int, nnodes: int, master_addr: str, master_port: int) -> int:
    """One node runner on this bundle's machine; returns its exit code."""
    import psutil  # Ray bundles it (ray/thirdparty_files); importable in a Ray worker
    import ray

    from orchestrator.config import expand
    from orchestrator.plan import LaunchPlan

    plan = LaunchPlan.from_json(plan_json)
    # The launching machine's interpreter means nothing here; this Ray worker's is the cluster's python.
    plan.python = os.path.expanduser(plan.cluster.python) if plan.cluster.python else sys.executable
    # Nodes that share a filesystem keep apart by naming $SPEEDRUN_NODE_RANK in data_dir/work_dir
    # (expand() reads it here and in the node runner, which inherits it).
    os.environ["SPEEDRUN_NODE_RANK"] = str(rank)
    work = expand(plan.cluster.work_dir) / plan.sweep_id  # the node runner's own work directory
    work.mkdir(parents=True, exist_ok=True)
    plan_file = work / f"plan-node{rank}.json"
    plan_file.write_text(plan.to_json())
    cmd = [plan.python, "-m", "orchestrator.node", "--plan", str(plan_file)]
    if nnodes > 1:
        cmd += ["--node-rank", str(rank), "--nnodes", str(nnodes), "--master-addr", master_addr, "--master-port", str(master_port)]
    if plan.cluster.setup:  # the cluster's shell set-up lines (modules, venvs), then the node runner
        cmd = ["bash", "-c", "set -e\n" + "\n".join(plan.cluster.setup) + '\nexec "$@"', "bash", *cmd]
    proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=_die_with_parent)
    _say(f"node {rank}: node runner pid {proc.pid} on {ray.util.get_node_ip_address()}, seeds {plan.seeds}")
    tree: list = []
    try:
        while proc.poll() is None:
            # Remember the torchrun workers: they live in their own sessions, and if the node runner
            # is killed outright nobody else would stop them before the retry starts.
            try:
                tree = psutil.Process(proc.pid).children(recursive=True) or tree
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.5)
    except BaseException:  # ray.cancel raises KeyboardInterrupt here: stop the node runner with us
        _stop_tree(proc)
        raise
    if proc.returncode < 0:
        orphans = [p for p in tree if p.is_running()]
        for p in orphans:
            p.kill()
        psutil.wait_procs(orphans, timeout=10)
    return proc.returncode


def _unfinished(plan: "LaunchPlan", candidates: list[int]) -> list[int]:
    """Seeds among candidates without a succeeded manifest in the store (all of them if the store cannot say)."""
    from orchestrator.artifacts import read_manifest
    from orchestrator.store import open_store

    try:
        store = open_store(plan.store_url)
        manifests = {s: read_manifest(store, seed_prefix(plan.sweep_id, s)) for s in candidates}
        return [s for s, m in manifests.items() if not seed_done(m is not None, m.state if m else None)]
    except Exception as e:  # noqa: BLE001  any store trouble: re-run them all rather than lose one
        _say(f"cannot read the store to find finished seeds ({type(e).__name__}); re-running all of {candidates}")
        return list(candidates)


def _run_attempt(plan: "LaunchPlan", pg) -> dict[int, int | str]:
    """Start every node runner of one attempt; when one fails, stop the others. Returns rank -> code."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    nnodes, gpus = plan.cluster.nodes, plan.cluster.gpus_per_node
    on = lambda i: PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)  # noqa: E731
    addr, port = ray.get(ray.remote(node_address).options(num_cpus=0, scheduling_strategy=on(0)).remote())
    plan_json = plan.to_json()
    task = ray.remote(run_node)
    refs = {task.options(num_cpus=1, num_gpus=gpus, max_retries=0, scheduling_strategy=on(r)).remote(
        plan_json, r, nnodes, addr, port): r for r in range(nnodes)}
    codes: dict[int, int | str] = {}
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            rank = refs[done[0]]
            try:
                codes[rank] = ray.get(done[0])
            except ray.exceptions.TaskCancelledError:
                codes[rank] = "stopped with the other nodes"
            except ray.exceptions.RayError as e:  # the Ray worker itself died (killed, OOM, node lost)
                codes[rank] = f"Ray worker lost ({type(e).__name__})"
            if codes[rank] != 0 and pending:
                _say(f"node {rank}: {describe_exit(codes[rank])}; stopping the other nodes")
                for ref in pending:
                    ray.cancel(ref)
    except KeyboardInterrupt:  # the job is being stopped: take the node runners down with us
        for ref in pending:
            ray.cancel(ref)
        ray.wait(pending, num_returns=len(pending), timeout=STOP_GRACE_S + 5)
        raise
    return codes


def next_step(codes: dict[int, int | str], seeds: list[int], unfinished: list[int], retries_used: int,
              retries: int, requeues: int) -> tuple[str, str]:
    """After one attempt (node rank -> exit code or what happened to its Ray worker), with the
    sweep's seeds and those still without a succeeded manifest: ("done" | "failed" | "retry" |
    "resume", the line that reports it), as orchestrator.sweep.next_action decides."""
    why = "; ".join(f"node {r}: {describe_exit(code)}" for r, code in sorted(codes.items()) if code != 0)
    nxt = next_action(ending_of_nodes(codes), unfinished, retries_used, retries, requeues, why=why, seeds=seeds)
    return nxt.action, nxt.reason


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def drive() -> int:
    """The Ray job's entrypoint: placement group, node runners, retries. Exit code = the run's outcome."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from orchestrator.plan import LaunchPlan

    plan = LaunchPlan.from_json(os.environ[PLAN_ENV])
    c = plan.cluster
    # Ray's job stop sends SIGTERM; turn it into KeyboardInterrupt so node runners are stopped first.
    signal.signal(signal.SIGTERM, _interrupt)
    ray.init(address="auto", logging_level=logging.WARNING)
    pg = placement_group([{"GPU": c.gpus_per_node, "CPU": 1}] * c.nodes, strategy="STRICT_SPREAD",
                         name=f"speedrun-{plan.sweep_id}")
    _say(f"waiting for {c.nodes} node(s) with {c.gpus_per_node} GPUs each")
    while not ray.wait([pg.ready()], timeout=30)[0]:
        _say(f"still waiting for {c.nodes} x {c.gpus_per_node} GPUs; the cluster has {ray.cluster_resources().get('GPU', 0):g} GPUs")
    remaining, retries_used, requeues = list(plan.seeds), 0, 0
    try:
        while True:
            _say(f"starting seeds {remaining} on {c.nodes} node(s)")
            codes = _run_attempt(plan.for_seeds(remaining), pg)
            if any(code != 0 for code in codes.values()):
                remaining = _unfinished(plan, remaining)
            action, message = next_step(codes, plan.seeds, remaining, retries_used, plan.job.retries, requeues)
            _say(message)
            if action == "done":
                return 0
            if action == "failed":
                return 1
            requeues += action == "resume"
            retries_used += action == "retry"
    except KeyboardInterrupt:
        _say("stopped: node runners were asked to checkpoint and exit")
        return 130
    finally:
        remove_placement_group(pg)


if __name__ == "__main__":
    # Re-import under the package name so Ray pickles run_node by reference, not as __main__.
    from orchestrator.backends.ray_driver import drive as _drive

    sys.exit(_drive())

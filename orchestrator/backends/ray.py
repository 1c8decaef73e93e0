"""Ray backend: the node runner as a Ray job, one placement-group bundle of GPUs per node.

The launching CLI submits ONE Ray job per sweep through the Jobs API; its entrypoint is this module
(`python -m orchestrator.backends.ray`), the *driver*, which runs inside the cluster:
  1. reserves one {GPU: gpus_per_node, CPU: 1} bundle per node (STRICT_SPREAD: one bundle per machine);
  2. starts one node runner per bundle as a Ray task (`python -m orchestrator.node --plan ... --node-rank R`),
     the master address being bundle 0's node;
  3. when a node runner dies (killed, its Ray worker or node lost), re-runs the seeds that have no
     succeeded manifest in the store, `job.retries` times (a trainer that fails is retried by the
     node runner itself; a preempted node runner is resumed without using up a retry).
The code travels with the job (runtime_env working_dir = the checkout), so the cluster needs only
Python, torch and ray. Driver lines start with MARK so `status` can quote the latest one.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from orchestrator.backends.base import Backend, Handle, RunState, RunStatus
from orchestrator.config import REPO_ROOT, ConfigError
from orchestrator.sweep import describe_exit, ending_of_nodes, next_action, seed_done, seed_prefix

if TYPE_CHECKING:
    from orchestrator.plan import LaunchPlan

log = logging.getLogger(__name__)

MARK = "speedrun-ray:"
PLAN_ENV = "SPEEDRUN_PLAN_JSON"
STOP_GRACE_S = 15          # SIGTERM (checkpoint and exit) -> SIGKILL, for a node runner being stopped
# Never shipped with the job: environments, outputs, data, caches.
EXCLUDES = [".venv/", "venv/", ".git/", "runs/", "build/", "dist/", ".whl/", ".device/", "tmp/", "bench/results/",
            "**/__pycache__/", "*.egg-info/", ".pytest_cache/", "*.bin", "*.pt", "*.safetensors"]

_STATES = {"PENDING": RunState.PENDING, "RUNNING": RunState.RUNNING, "STOPPED": RunState.CANCELLED,
           "SUCCEEDED": RunState.SUCCEEDED, "FAILED": RunState.FAILED}


def _job_client(address: str, key: str = "ray.address"):
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError:
        raise ConfigError("the Ray backend needs ray: pip install 'speedrun[ray]'") from None
    try:
        return JobSubmissionClient(None if address == "auto" else address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{key}: cannot reach the Ray Jobs API at {address} ({first}); "
                          "start the cluster (`speedrun cluster up ...`) or fix the address") from None


class RayBackend(Backend):
    name = "ray"

    # ------------------------------------------------------------------ what would be submitted
    def runtime_env(self, plan: "LaunchPlan") -> dict[str, Any]:
        settings = self.cluster.ray
        root = Path(settings.working_dir).expanduser() if settings.working_dir else REPO_ROOT
        env: dict[str, Any] = {
            "working_dir": str(root),
            "excludes": EXCLUDES + list(settings.excludes),
            "env_vars": {
                PLAN_ENV: plan.to_json(),
                "PYTHONUNBUFFERED": "1",
                "RAY_DEDUP_LOGS": "0",    # identical lines from several nodes are all kept
                "RAY_COLOR_PREFIX": "0",  # no ANSI colours in the job log
                # Ray's job stop waits this long after SIGTERM before SIGKILL (default 3 s): enough
                # for the driver to stop every node runner and the torchrun workers under it.
                "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_GRACE_S + 15),
            },
        }
        if settings.pip:
            env["pip"] = list(settings.pip)
        return env

    def entrypoint(self) -> str:
        return f"{self.cluster.python or 'python'} -m orchestrator.backends.ray"

    def bundles(self) -> list[dict[str, float]]:
        return [{"GPU": self.cluster.gpus_per_node, "CPU": 1} for _ in range(self.cluster.nodes)]

    def describe(self, plan: "LaunchPlan") -> str:
        env = self.runtime_env(plan)
        shown = dict(env, env_vars={**env["env_vars"], PLAN_ENV: f"<the launch plan, {len(plan.to_json())} bytes of JSON>"})
        n = self.cluster.nodes
        node_cmd = "python -m orchestrator.node --plan plan.json"
        if n > 1:
            node_cmd += f" --node-rank R --nnodes {n} --master-addr <bundle 0's node IP> --master-port <free port there>"
        return "\n".join([
            f"Ray job on {self.cluster.ray.address}, submission id {submission_id(plan)}",
            f"entrypoint: {self.entrypoint()}   (the driver; it asks for no resources itself)",
            f"resources: placement group of {n} bundle(s) {json.dumps(self.bundles()[0])}, strategy STRICT_SPREAD",
            f"per bundle: one Ray task running `{node_cmd}`",
            f"           (torchrun --nproc_per_node={self.cluster.gpus_per_node} inside; seeds {plan.seeds})",
            f"retries: {plan.job.retries} (a killed node runner is re-run for the seeds without a manifest)",
            "runtime_env:",
            *(f"  {k}: {' '.join(v) if isinstance(v, list) else v}" for k, v in shown.items() if k != "env_vars"),
            "  env_vars: " + ", ".join(f"{k}={v}" for k, v in shown["env_vars"].items()),
        ])

    # ----------------------------------------------------------------------------- the handle
    def check(self, plan: "LaunchPlan") -> None:
        _job_client(self.cluster.ray.address, key=f"{plan.cluster_file}: ray.address")  # reachable, or one sentence

    def submit(self, plan: "LaunchPlan") -> Handle:
        client = _job_client(self.cluster.ray.address, key=f"{plan.cluster_file}: ray.address")
        sid = submission_id(plan)
        if not log.isEnabledFor(logging.DEBUG):  # Ray narrates every file it leaves out of the package
            for name in ("ray", "ray.dashboard.modules.dashboard_sdk"):
                logging.getLogger(name).setLevel(logging.ERROR)
        try:
            client.submit_job(entrypoint=self.entrypoint(), submission_id=sid, runtime_env=self.runtime_env(plan),
                              metadata={"sweep_id": plan.sweep_id, "job": plan.job.name})
        except (RuntimeError, ValueError) as e:
            raise ConfigError(f"{plan.cluster_file}: ray: the Ray cluster at {client.get_address()} refused the job: "
                              f"{str(e).strip()[:300]}") from None
        log.info("submitted Ray job %s to %s", sid, client.get_address())
        host = re.sub(r"^\w+://", "", client.get_address()).split(":")[0]
        if "://" not in plan.store_url and host not in ("127.0.0.1", "localhost"):
            log.warning("store %s is a directory on this machine: the Ray nodes at %s write to a directory of that "
                        "name on their own disks; use s3://bucket/prefix to get the artifacts back", plan.store_url, host)
        return Handle(backend=self.name, sweep_id=plan.sweep_id, job_ids=[sid],
                      data={"address": client.get_address(), "nodes": self.cluster.nodes}, store_url=plan.store_url)

    def _client_for(self, handle: Handle):
        return _job_client(handle.data.get("address") or self.cluster.ray.address, key="handle.address")

    def status(self, handle: Handle) -> RunStatus:
        client = self._client_for(handle)
        sid = handle.job_ids[0]
        try:
            info = client.get_job_info(sid)
        except RuntimeError as e:
            return RunStatus(RunState.UNKNOWN, f"Ray job {sid} not found at {client.get_address()} ({str(e)[:120]})")
        state = _STATES.get(str(info.status.value if hasattr(info.status, "value") else info.status), RunState.UNKNOWN)
        detail = _latest_mark(client.get_job_logs(sid))
        if state is RunState.FAILED and info.message and not detail:
            detail = info.message.strip().splitlines()[0]
        return RunStatus(state, detail, {sid: state})

    def logs(self, handle: Handle, follow: bool = False) -> Iterator[str]:
        client = self._client_for(handle)
        sid = handle.job_ids[0]
        names = _NodeNames(handle.data.get("nodes", 1))
        try:
            text = client.get_job_logs(sid)
        except RuntimeError as e:  # the job is unknown there (cluster restarted, wrong address)
            raise ConfigError(f"run {handle.sweep_id}: Ray job {sid} not found at {client.get_address()} "
                              f"({str(e).strip()[:160]}); its artifacts are in the store") from None
        if not follow:
            yield from map(names.rewrite, text.splitlines())
            return
        # tail_job_logs is an async generator over a websocket; drive it from this thread.
        logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)  # "WebSocket closed"
        loop = asyncio.new_event_loop()
        chunks = client.tail_job_logs(sid)
        pending = ""
        try:
            while True:
                try:
                    chunk = loop.run_until_complete(chunks.__anext__())
                except StopAsyncIteration:
                    break
                lines = (pending + chunk).split("\n")
                pending = lines.pop()
                yield from map(names.rewrite, lines)
            if pending:
                yield names.rewrite(pending)
        finally:
            loop.run_until_complete(chunks.aclose())
            loop.close()

    def cancel(self, handle: Handle) -> None:
        """Stop the Ray job and wait (bounded) until Ray says it has stopped."""
        client = self._client_for(handle)
        for sid in handle.job_ids:
            client.stop_job(sid)
        deadline = time.monotonic() + STOP_GRACE_S + 20
        while time.monotonic() < deadline and not self.status(handle).state.finished:
            time.sleep(0.5)


_RAY_PREFIX = re.compile(r"^(?:\x1b\[\d+m)?\((\w+) pid=(\d+)(?:, ip=[^)]*)?\)(?:\x1b\[0m)? ?")


class _NodeNames:
    """Ray prefixes task output with `(run_node pid=N, ip=X)`; show `[node R]` instead (nothing on one node)."""

    def __init__(self, nodes: int):
        self.nodes = nodes
        self.rank_of_pid: dict[str, str] = {}

    def rewrite(self, line: str) -> str:
        m = _RAY_PREFIX.match(line)
        if not m:
            return line
        rest = line[m.end():]
        if MARK in rest and ": node " in rest:  # "speedrun-ray: node R: node runner pid ..." names the worker
            self.rank_of_pid[m.group(2)] = rest.split(": node ", 1)[1].split(":", 1)[0]
        if self.nodes <= 1:
            return rest
        return f"[node {self.rank_of_pid.get(m.group(2), '?')}] {rest}"


def submission_id(plan: "LaunchPlan") -> str:
    return f"speedrun-{plan.sweep_id}"


def _latest_mark(text: str) -> str:
    marks = [ln.split(MARK, 1)[1].strip() for ln in text.splitlines() if MARK in ln]
    return marks[-1] if marks else ""


# ============================================================== the driver (inside the cluster)


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
    from orchestrator.backends.ray import drive as _drive

    sys.exit(_drive())

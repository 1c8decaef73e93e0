"""Ray backend, the laptop side: submit, status, logs and cancel of a sweep's Ray job (the Jobs API).

The launching CLI submits ONE Ray job per sweep; its entrypoint is the *driver*
(`python -m orchestrator.backends.ray_driver`, which runs inside the cluster: placement group, one
node runner per bundle, retries). The code travels with the job (runtime_env working_dir = the
checkout), so the cluster needs only Python, torch and ray. Driver lines start with MARK so `status`
can quote the latest one. `speedrun cluster up|down` is backends/ray_launcher.py.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from orchestrator.backends.base import Backend, Handle, SweepState, SweepStatus
from orchestrator.config import REPO_ROOT, ConfigError

if TYPE_CHECKING:
    from orchestrator.plan import LaunchPlan

log = logging.getLogger(__name__)

MARK = "speedrun-ray:"
PLAN_ENV = "SPEEDRUN_PLAN_JSON"
STOP_GRACE_S = 15          # SIGTERM (checkpoint and exit) -> SIGKILL, for a node runner being stopped
# Never shipped with the job: environments, outputs, data, caches.
EXCLUDES = [".venv/", "venv/", ".git/", "runs/", "build/", "dist/", ".whl/", ".device/", "tmp/", "bench/results/",
            "**/__pycache__/", "*.egg-info/", ".pytest_cache/", "*.bin", "*.pt", "*.safetensors"]

_STATES = {"PENDING": SweepState.PENDING, "RUNNING": SweepState.RUNNING, "STOPPED": SweepState.CANCELLED,
           "SUCCEEDED": SweepState.SUCCEEDED, "FAILED": SweepState.FAILED}


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
        env = code_runtime_env(self.cluster)
        env["env_vars"].update({
            PLAN_ENV: plan.to_json(),
            "PYTHONUNBUFFERED": "1",
            "RAY_DEDUP_LOGS": "0",    # identical lines from several nodes are all kept
            "RAY_COLOR_PREFIX": "0",  # no ANSI colours in the job log
            # Ray's job stop waits this long after SIGTERM before SIGKILL (default 3 s): enough
            # for the driver to stop every node runner and the torchrun workers under it.
            "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_GRACE_S + 15),
        })
        return env

    def entrypoint(self) -> str:
        return f"{self.cluster.python or 'python'} -m orchestrator.backends.ray_driver"

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

    def status(self, handle: Handle) -> SweepStatus:
        client = self._client_for(handle)
        sid = handle.job_ids[0]
        try:
            info = client.get_job_info(sid)
        except RuntimeError as e:
            return SweepStatus(SweepState.UNKNOWN, f"Ray job {sid} not found at {client.get_address()} ({str(e)[:120]})")
        state = _STATES.get(str(info.status.value if hasattr(info.status, "value") else info.status), SweepState.UNKNOWN)
        detail = _latest_mark(client.get_job_logs(sid))
        if state is SweepState.FAILED and info.message and not detail:
            detail = info.message.strip().splitlines()[0]
        return SweepStatus(state, detail, {sid: state})

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
        pending, task = "", None
        try:
            while True:
                task = loop.create_task(chunks.__anext__())
                try:
                    chunk = loop.run_until_complete(task)
                except StopAsyncIteration:
                    break
                lines = (pending + chunk).split("\n")
                pending = lines.pop()
                yield from map(names.rewrite, lines)
            if pending:
                yield names.rewrite(pending)
        finally:
            if task is not None and not task.done():  # Ctrl-C inside the wait: end the read it was in
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    loop.run_until_complete(task)
            with contextlib.suppress(RuntimeError):
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


def code_runtime_env(cluster) -> dict[str, Any]:
    """The job's code (this checkout, or ray.working_dir) and extra pip packages, as a Ray runtime_env."""
    settings = cluster.ray
    root = Path(settings.working_dir).expanduser() if settings.working_dir else REPO_ROOT
    env: dict[str, Any] = {"working_dir": str(root), "excludes": EXCLUDES + list(settings.excludes), "env_vars": {}}
    if settings.pip:
        env["pip"] = list(settings.pip)
    return env


def submission_id(plan: "LaunchPlan") -> str:
    return f"speedrun-{plan.sweep_id}"


def _latest_mark(text: str) -> str:
    marks = [ln.split(MARK, 1)[1].strip() for ln in text.splitlines() if MARK in ln]
    return marks[-1] if marks else ""

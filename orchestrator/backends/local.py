"""This machine: the node runner as a detached subprocess (the embedded default backend).

The node runner gets its own process session so that `speedrun cancel` can stop it and every
torchrun worker under it by process-group id, after the launching CLI has exited. PID reuse is
guarded by the process start time recorded in the handle.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from orchestrator.backends.base import Backend, Handle, SweepState, SweepStatus
from orchestrator.config import REPO_ROOT, expand
from orchestrator.plan import LaunchPlan
from orchestrator.sweep import EXIT_FAILED, EXIT_OK


def _proc_start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat: start time in clock ticks since boot (None if gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _alive(pid: int, start_ticks: int | None) -> bool:
    ticks = _proc_start_ticks(pid)
    if ticks is None or (start_ticks is not None and ticks != start_ticks):
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class LocalBackend(Backend):
    name = "local"

    def run_dir(self, plan: LaunchPlan) -> Path:
        return expand(plan.cluster.work_dir) / plan.sweep_id

    def command(self, plan: LaunchPlan, plan_path: Path, exit_file: Path) -> list[str]:
        return [plan.python or sys.executable, "-m", "orchestrator.node", "--plan", str(plan_path),
                "--exit-file", str(exit_file)]

    def describe(self, plan: LaunchPlan) -> str:
        d = self.run_dir(plan)
        cmd = self.command(plan, d / "plan.json", d / "node.exit")
        return (f"local backend: 1 node, {plan.cluster.gpus_per_node} trainer processes ({plan.cluster.device})\n"
                f"  cd {REPO_ROOT}\n  {shlex.join(cmd)} > {d / 'node.log'} 2>&1 &")

    def submit(self, plan: LaunchPlan) -> Handle:
        d = self.run_dir(plan)
        d.mkdir(parents=True, exist_ok=True)
        plan_path, log_path, exit_file = d / "plan.json", d / "node.log", d / "node.exit"
        plan_path.write_text(plan.to_json())
        env = dict(os.environ)
        env.update(self.cluster.env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(self.command(plan, plan_path, exit_file), cwd=REPO_ROOT, env=env,
                                    stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        return Handle(backend=self.name, sweep_id=plan.sweep_id, job_ids=[str(proc.pid)],
                      data={"pid": proc.pid, "start_ticks": _proc_start_ticks(proc.pid), "log": str(log_path),
                            "exit_file": str(exit_file), "run_dir": str(d)}, store_url=plan.store_url)

    def status(self, handle: Handle) -> SweepStatus:
        data = handle.data
        pid = data["pid"]
        exit_file = Path(data["exit_file"])
        cancelled = (Path(data["run_dir"]) / "cancelled").exists()
        if _alive(pid, data.get("start_ticks")):
            state = SweepState.RUNNING
            detail = f"pid {pid}"
        elif cancelled:
            state, detail = SweepState.CANCELLED, "cancelled"
        elif exit_file.is_file():
            rc = int(exit_file.read_text().strip() or EXIT_FAILED)
            state = SweepState.SUCCEEDED if rc == EXIT_OK else SweepState.FAILED
            detail = f"node runner exited with code {rc}"
        else:
            state, detail = SweepState.FAILED, "node runner died without an exit code (killed?)"
        return SweepStatus(state=state, detail=detail, jobs={str(pid): state})

    def logs(self, handle: Handle, follow: bool = False) -> Iterator[str]:
        path = Path(handle.data["log"])
        if not path.exists():
            return
        with open(path, errors="replace") as f:
            while True:
                line = f.readline()
                if line:
                    yield line.rstrip("\n")
                    continue
                if not follow or self.status(handle).state.finished:
                    rest = f.read()
                    yield from rest.splitlines()
                    return
                time.sleep(0.2)

    def cancel(self, handle: Handle) -> None:
        pid = handle.data["pid"]
        (Path(handle.data["run_dir"]) / "cancelled").touch()
        if not _alive(pid, handle.data.get("start_ticks")):
            return
        pgid = os.getpgid(pid)
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _alive(pid, handle.data.get("start_ticks")):
            time.sleep(0.2)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

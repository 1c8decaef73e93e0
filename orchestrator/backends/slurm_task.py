"""What each Slurm task runs inside the allocation: the node runner as a child process (NodeTask), and how a
preemption or time limit requeues it.

Slurm sends USR2 `signal_delay_s` before the end; submitit calls NodeTask.checkpoint(), which asks the node
runner to checkpoint (SIGUSR1: the trainer saves and exits 75) and returns the same task, which submitit
requeues; the node runner then skips finished seeds and resumes the interrupted one from its checkpoint.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from orchestrator.config import REPO_ROOT
from orchestrator.sweep import EXIT_OK, EXIT_PREEMPTED

try:
    import submitit
    from submitit.helpers import Checkpointable
except ImportError:  # reported by SlurmBackend() as one sentence
    submitit = None
    Checkpointable = object

NOT_REQUEUED = "checkpointed (exit 75) but was not requeued"  # resumable: `retries:` runs it again
CHECKPOINT_WAIT_S = 600  # longest wait for the trainer to save after the signal


class NodeTask(Checkpointable):
    """What each Slurm task runs: the node runner as a child process, checkpointed on submitit's signal."""

    def __init__(self, plan_json: str, python: str, requeues: int = 0):
        self.plan_json = plan_json
        self.python = python
        self.requeues = requeues
        self._proc: subprocess.Popen | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_proc"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _proc=None)

    def node_command(self, env) -> list[str]:
        """The node runner's command line for this Slurm task (env: submitit.JobEnvironment)."""
        plan_path = Path(env.paths.folder) / f"plan-{env.job_id}.json"
        plan_path.write_text(self.plan_json)
        base_id = str(env.array_job_id or env.job_id).split("_")[0]
        hosts = env.hostnames
        return [self.python, "-m", "orchestrator.node", "--plan", str(plan_path),
                "--node-rank", str(env.node), "--nnodes", str(env.num_nodes),
                "--master-addr", _node_address(hosts[0]) if hosts else "127.0.0.1",
                # one port per job so that two runs sharing a first node do not collide
                "--master-port", str(20000 + int(base_id) % 20000)]

    def __call__(self) -> dict[str, Any]:
        env = submitit.JobEnvironment()
        argv = self.node_command(env)
        # Nodes that share a filesystem keep apart by naming $SPEEDRUN_NODE_RANK in data_dir/work_dir
        child_env = dict(os.environ, PYTHONUNBUFFERED="1", SPEEDRUN_NODE_RANK=str(env.node))
        child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), child_env.get("PYTHONPATH")]))
        if self.requeues:
            _say(f"job {env.job_id}: requeued {self.requeues} time(s); resuming")
        # Slurm delivers USR2 to every process of the step; only this process (submitit) must act
        # on it, so the node runner and the trainers under it ignore it (SIG_IGN survives exec).
        self._proc = subprocess.Popen(argv, env=child_env, cwd=REPO_ROOT,
                                      preexec_fn=lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN))
        # poll, not wait(): a blocking wait() holds Popen's lock, and checkpoint() runs as a signal
        # handler on top of this frame, so it could never reap the child
        while (rc := self._proc.poll()) is None:
            time.sleep(0.5)
        self._proc = None
        if rc == EXIT_OK:
            return {"exit_code": rc, "requeues": self.requeues}
        if rc == EXIT_PREEMPTED:
            raise RuntimeError(f"node runner {NOT_REQUEUED}: it was stopped by a signal that was not submitit's")
        raise RuntimeError(f"node runner exited with code {rc}")

    def checkpoint(self, *args: Any, **kwargs: Any) -> "submitit.helpers.DelayedSubmission":
        """Called by submitit on USR2: wait for the node runner to checkpoint, then requeue a fresh task."""
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # scancel --signal may deliver it twice; act once
        proc = self._proc
        if proc is not None and proc.returncode is None:
            _say("preemption/time-limit signal: asking the node runner to checkpoint")
            proc.send_signal(signal.SIGUSR1)
            rc = _reap(proc, CHECKPOINT_WAIT_S)
            _say(f"node runner stopped with exit code {rc} (75 = checkpointed); requeueing")
        return submitit.helpers.DelayedSubmission(NodeTask(self.plan_json, self.python, self.requeues + 1))


def _node_address(name: str) -> str:
    """Where the other nodes reach node `name`: Slurm's NodeAddr (node names need not resolve)."""
    try:
        out = subprocess.run(["scontrol", "show", "node", name, "-o"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return name
    m = re.search(r"\bNodeAddr=(\S+)", out)
    return m.group(1) if m else name


def _say(message: str) -> None:
    """A line in the job's log (the task's stdout), next to the node runner's own lines."""
    Console(highlight=False, soft_wrap=True).print(f"[slurm] {message}", markup=False)
    sys.stdout.flush()


def _reap(proc: subprocess.Popen, timeout_s: float) -> int | None:
    """Wait for a child from inside a signal handler (os.waitpid: Popen's own lock may be held below us)."""
    deadline = time.monotonic() + timeout_s
    while proc.returncode is None and time.monotonic() < deadline:
        try:
            pid, status = os.waitpid(proc.pid, os.WNOHANG)
        except ChildProcessError:  # reaped by the frame below; it set returncode
            break
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            break
        time.sleep(0.2)
    return proc.returncode

"""Slurm through submitit: one task per node runs `python -m orchestrator.node`; torchrun rendezvous on node 0.

Everything a later `speedrun status|logs|cancel` needs lives in the sweep's submitit folder
(`<slurm.log_dir>/<sweep-id>/`): plan.json, jobs.json (every job submitted for the sweep, including
re-submissions) and submitit's own logs and result pickles. The Handle only points at that folder.
status() only reads: whether a dead job runs again is decided by orchestrator/watch.py, which calls rerun().
What runs inside the allocation, and how preemption requeues it: orchestrator/backends/slurm_task.py.
"""
from __future__ import annotations

import json
import logging
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock

from orchestrator.backends.base import Backend, Handle, JobEnd, SweepState, SweepStatus
from orchestrator.backends.slurm_task import NOT_REQUEUED, NodeTask
from orchestrator.cluster_config import ClusterConfig
from orchestrator.config import ConfigError, expand
from orchestrator.plan import LaunchPlan
from orchestrator.sweep import Ending

try:
    import submitit
except ImportError:  # reported by SlurmBackend() as one sentence
    submitit = None

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 20

# Slurm job states -> ours. A requeued job shows PENDING/REQUEUED again, so it is not finished.
SLURM_STATES = {
    **dict.fromkeys(["PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"],
                    SweepState.PENDING),
    **dict.fromkeys(["RUNNING", "COMPLETING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "RESIZING"], SweepState.RUNNING),
    **dict.fromkeys(["FAILED", "NODE_FAIL", "TIMEOUT", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED",
                     "SPECIAL_EXIT", "REVOKED"], SweepState.FAILED),
    "COMPLETED": SweepState.SUCCEEDED, "CANCELLED": SweepState.CANCELLED,
}


def parse_extra_sbatch(lines: list[str], where: str = "slurm.extra_sbatch") -> dict[str, Any]:
    """['--reservation=x', '--requeue', '#SBATCH --mail-type=END'] -> {'reservation': 'x', 'requeue': True, ...}."""
    out: dict[str, Any] = {}
    for raw in lines:
        text = raw.strip().removeprefix("#SBATCH").strip()
        if not text.startswith("--") or len(text) < 3:
            raise ConfigError(f"{where}: {raw!r} is not a long sbatch option; write it as '--name=value' or '--flag'")
        key, sep, value = text[2:].partition("=")
        out[key.strip()] = value.strip() if sep else True
    return out


def sbatch_parameters(cluster: ClusterConfig, job_name: str) -> dict[str, Any]:
    """submitit SlurmExecutor parameters (sbatch names) from the cluster config."""
    s = cluster.slurm
    params: dict[str, Any] = {
        "job_name": job_name,
        "nodes": cluster.nodes,
        "ntasks_per_node": 1,  # one node runner per node; it starts torchrun with one process per GPU
        "time": s.time_min,
        "signal_delay_s": s.signal_delay_s,
        "stderr_to_stdout": True,  # one log per node: `speedrun logs` shows errors in order
    }
    if cluster.setup:
        params["setup"] = list(cluster.setup)
    if cluster.device == "cuda":
        params["gpus_per_node"] = cluster.gpus_per_node
    for key in ("partition", "account", "qos", "constraint", "cpus_per_task"):
        if getattr(s, key) is not None:
            params[key] = getattr(s, key)
    if s.mem_gb is not None:
        params["mem"] = f"{s.mem_gb}GB"
    if s.exclusive:
        params["exclusive"] = True
    extra = parse_extra_sbatch(s.extra_sbatch)
    if extra:
        params["additional_parameters"] = extra
    return params


class SlurmBackend(Backend):
    name = "slurm"
    reruns_dead_jobs = True

    def __init__(self, cluster: ClusterConfig):
        if submitit is None:
            raise ConfigError("backend: slurm needs submitit; install it with `pip install 'speedrun[slurm]'`")
        super().__init__(cluster)

    # ----------------------------------------------------------------------------------- paths
    def folder(self, plan: LaunchPlan) -> Path:
        return expand(self.cluster.slurm.log_dir).absolute() / plan.sweep_id

    def python(self, plan: LaunchPlan) -> str:
        return self.cluster.python or plan.python or sys.executable

    def parameters(self, plan: LaunchPlan) -> dict[str, Any]:
        return sbatch_parameters(self.cluster, f"speedrun-{plan.sweep_id}")

    # --------------------------------------------------------------------------------- dry run
    def describe(self, plan: LaunchPlan) -> str:
        from submitit.slurm.slurm import _make_sbatch_string  # the text SlurmExecutor writes, not submitted

        folder = self.folder(plan)
        params = self.parameters(plan)
        parallel = self.cluster.slurm.seeds_parallel and len(plan.seeds) > 1
        if parallel:
            params["map_count"] = len(plan.seeds)
        command = f"{shlex.quote(self.python(plan))} -u -m submitit.core._submit {shlex.quote(str(folder))}"
        script = _make_sbatch_string(command=command, folder=folder, **params)
        how = (f"a job array of {len(plan.seeds)} tasks, one seed each" if parallel
               else f"one job, seeds {plan.seeds} back to back in one allocation")
        return (f"slurm backend: {how}; {self.cluster.nodes} node(s) x {self.cluster.gpus_per_node} "
                f"{self.cluster.device}, one node runner per node\n"
                f"submitit folder: {folder}\n\n{script}")

    # ----------------------------------------------------------------------------------- submit
    def _executor(self, plan: LaunchPlan):
        ex = submitit.SlurmExecutor(folder=self.folder(plan), python=self.python(plan),
                                    max_num_timeout=self.cluster.slurm.max_requeues)
        ex.update_parameters(**self.parameters(plan))
        return ex

    def _submit_seeds(self, plan: LaunchPlan, groups: list[list[int]], attempt: int) -> list[dict[str, Any]]:
        ex = self._executor(plan)
        tasks = [NodeTask(plan.for_seeds(seeds).to_json(), self.python(plan)) for seeds in groups]
        if len(tasks) == 1:
            jobs = [ex.submit(tasks[0])]
        else:
            with ex.batch():  # several tasks -> one job array
                jobs = [ex.submit(t) for t in tasks]
        return [{"id": j.job_id, "seeds": seeds, "attempt": attempt} for j, seeds in zip(jobs, groups)]

    def check(self, plan: LaunchPlan) -> None:
        if shutil.which("sbatch") is None:
            raise ConfigError(f"{plan.cluster_file}: backend: slurm, but sbatch is not on PATH here; "
                              "launch from a Slurm login node or pick another --cluster")

    def submit(self, plan: LaunchPlan) -> Handle:
        self.check(plan)
        folder = self.folder(plan)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "plan.json").write_text(plan.to_json())
        parallel = self.cluster.slurm.seeds_parallel and len(plan.seeds) > 1
        groups = [[s] for s in plan.seeds] if parallel else [list(plan.seeds)]
        jobs = self._submit_seeds(plan, groups, attempt=0)
        _write_jobs(folder, jobs)
        log.info("submitted %s as Slurm job(s) %s", plan.sweep_id, [j["id"] for j in jobs])
        return Handle(backend=self.name, sweep_id=plan.sweep_id, job_ids=[j["id"] for j in jobs],
                      data={"folder": str(folder), "array": parallel}, store_url=plan.store_url)

    # ----------------------------------------------------------------------------------- status
    def status(self, handle: Handle) -> SweepStatus:
        """Every live job's state, read from squeue/sacct and submitit's result files; submits nothing.

        A job counts as ended only when Slurm positively says so (a final state, or absent from an
        answered squeue) or submitit wrote its result; when squeue fails, the job's state is UNKNOWN."""
        folder = Path(handle.data["folder"])
        live = [j for j in _read_jobs(folder) if not j.get("replaced_by")]
        queue = _slurm_states(f"speedrun-{handle.sweep_id}", [j["id"] for j in live])
        cancelled = (folder / "cancelled").exists()
        states: dict[str, SweepState] = {}
        details, ended = [], []
        for j in live:
            known = queue is not None
            state, why, ending = _job_state(folder, j["id"], (queue or {}).get(j["id"]), cancelled, known)
            states[j["id"]] = state
            if why:
                details.append(f"job {j['id']} (seeds {j['seeds']}): {why}")
            if ending is not None:
                ended.append(JobEnd(j["id"], list(j["seeds"]), ending, why.split(";")[0],
                                    retries_used=j.get("attempt", 0), requeues=j.get("requeues", 0)))
        return SweepStatus(state=_overall(list(states.values())), detail="; ".join(details), jobs=states,
                           ended=ended)

    def rerun(self, handle: Handle, dead: JobEnd, resume: bool) -> str:
        """Submit a dead job's seeds again (the node runner skips seeds already in the store); its new id.

        Only orchestrator/watch.py calls this, after claiming the attempt in the store."""
        folder = Path(handle.data["folder"])
        with FileLock(str(folder / "jobs.json.lock")):  # watchers on one filesystem update jobs.json in turn
            jobs = _read_jobs(folder)
            old = next(j for j in jobs if j["id"] == dead.job_id)
            if old.get("replaced_by"):
                return old["replaced_by"]
            plan = LaunchPlan.from_json((folder / "plan.json").read_text())
            new = self._submit_seeds(plan, [old["seeds"]], attempt=old["attempt"] + (not resume))[0]
            new["requeues"] = old.get("requeues", 0) + resume
            old["replaced_by"] = new["id"]
            jobs.append(new)
            _write_jobs(folder, jobs)
        log.warning("job %s %s; re-submitted seeds %s as job %s", dead.job_id, dead.why, old["seeds"], new["id"])
        return new["id"]

    # ------------------------------------------------------------------------------------- logs
    def logs(self, handle: Handle, follow: bool = False) -> Iterator[str]:
        """Node 0's output of every job of the run, in submission order; with follow, until the run ends."""
        folder = Path(handle.data["folder"])
        offsets: dict[str, int] = {}
        pending: dict[str, str] = {}
        while True:
            finished = not follow or self.status(handle).state.finished
            for j in _read_jobs(folder):
                path = log_path(folder, j["id"])
                if not path.exists():
                    continue
                with open(path, "rb") as f:
                    f.seek(offsets.get(j["id"], 0))
                    chunk = f.read()
                    offsets[j["id"]] = f.tell()
                text = pending.pop(j["id"], "") + chunk.decode(errors="replace")
                lines = text.split("\n")
                if lines[-1]:
                    pending[j["id"]] = lines[-1]
                yield from lines[:-1]
            if finished:
                yield from (rest for rest in pending.values() if rest)
                return
            time.sleep(0.5)

    # ----------------------------------------------------------------------------------- cancel
    def cancel(self, handle: Handle) -> None:
        folder = Path(handle.data["folder"])
        ids = [j["id"] for j in _read_jobs(folder)]
        (folder / "cancelled").touch()  # so that status says CANCELLED and no retry re-submits
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=60)


# ------------------------------------------------------------------------------------- helpers


def _write_jobs(folder: Path, jobs: list[dict[str, Any]]) -> None:
    tmp = folder / "jobs.json.tmp"
    tmp.write_text(json.dumps(jobs, indent=2))
    tmp.replace(folder / "jobs.json")


def _read_jobs(folder: Path) -> list[dict[str, Any]]:
    try:
        return json.loads((folder / "jobs.json").read_text())
    except FileNotFoundError:
        raise ConfigError(f"{folder}/jobs.json: this run's submitit folder is not here; run the command on the "
                          "machine that launched it, or one that shares its filesystem") from None


def log_path(folder: Path, job_id: str, task: int = 0) -> Path:
    return folder / f"{job_id}_{task}_log.out"


def log_tail(folder: Path, job_id: str, n: int = LOG_TAIL_LINES) -> str:
    path = log_path(folder, job_id)
    if not path.exists():
        return "(no log yet)"
    lines = path.read_text(errors="replace").splitlines()
    # submitit's own traceback of NodeTask's RuntimeError repeats what the node runner said: cut it
    errors = [i for i, ln in enumerate(lines) if ln.startswith("submitit ERROR")]
    if errors:
        first = errors[-1]
        while first > 0 and lines[first - 1].startswith("submitit ERROR"):
            first -= 1
        lines = lines[:first]
    lines = [ln for ln in lines if ln.strip() and not ln.startswith("submitit ")]
    return "\n".join(lines[-n:])


def _slurm_states(job_name: str, job_ids: list[str]) -> dict[str, str] | None:
    """Job id -> Slurm state, from squeue (jobs still in slurmctld) and then sacct (if accounting is on).

    None when squeue did not answer (controller unreachable: exit code 1, empty output): then nothing
    is known, and a running job must not look gone. A job absent from an answered squeue has left slurmctld.
    """
    if not job_ids:
        return {}
    # by name, not -j: squeue -j fails outright once one of the ids has been purged from slurmctld
    try:
        q = subprocess.run(["squeue", "-h", "-r", "--states=all", "-o", "%i|%T", f"--name={job_name}"],
                           capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.info("squeue failed (%s): job states unknown", e)
        return None
    if q.returncode != 0:
        log.info("squeue exited with %s (%s): job states unknown", q.returncode, q.stderr.strip()[:200])
        return None
    out: dict[str, str] = {}
    for line in q.stdout.splitlines():
        jid, _, state = line.strip().partition("|")
        if jid in job_ids:
            out[jid] = state
    missing = [j for j in job_ids if j not in out]
    if missing and shutil.which("sacct"):
        a = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(missing)],
                           capture_output=True, text=True, timeout=60)
        for line in a.stdout.splitlines() if a.returncode == 0 else []:
            jid, _, state = line.strip().partition("|")
            out.setdefault(jid, state.split()[0] if state else "")
    return out


def _job_state(folder: Path, job_id: str, slurm_state: str | None, cancelled: bool,
               queue_answered: bool = True) -> tuple[SweepState, str, Ending | None]:
    """Our state of one job, why it did not succeed (with the tail of its log), and how it ended when
    running its seeds again could make sense: DIED (no result) or PREEMPTED (checkpointed, not requeued).
    slurm_state None: absent from the queue (when it answered) or nothing known (when it did not)."""
    result = folder / f"{job_id}_0_result.pkl"
    state = SLURM_STATES.get(slurm_state.split()[0], SweepState.UNKNOWN) if slurm_state else None
    if state in (SweepState.PENDING, SweepState.RUNNING):
        return state, "", None
    outcome, value = "none", ""
    if result.exists():
        from submitit.core.utils import pickle_load

        outcome, value = pickle_load(result)
    if outcome == "success":
        return SweepState.SUCCEEDED, "", None
    if cancelled or state == SweepState.CANCELLED:  # our scancel (or the user's): its error is the cancel itself
        return SweepState.CANCELLED, "cancelled", None
    if outcome == "none" and not queue_answered:
        return SweepState.UNKNOWN, "squeue did not answer (controller unreachable?); state unknown", None
    tail = log_tail(folder, job_id)
    if outcome == "error":
        reason = str(value).strip().splitlines()[-1] if str(value).strip() else "error"
        resumable = Ending.PREEMPTED if NOT_REQUEUED in reason else None
        return SweepState.FAILED, f"failed: {reason}; last lines of its log:\n{tail}", resumable
    what = slurm_state or "gone from the queue"
    return SweepState.FAILED, f"died ({what}) before reporting a result; last lines of its log:\n{tail}", Ending.DIED


def _overall(states: list[SweepState]) -> SweepState:
    if not states:
        return SweepState.UNKNOWN
    for s in (SweepState.RUNNING, SweepState.PENDING):
        if s in states:
            return s
    if all(s == SweepState.SUCCEEDED for s in states):
        return SweepState.SUCCEEDED
    if SweepState.CANCELLED in states:
        return SweepState.CANCELLED
    if SweepState.FAILED in states:
        return SweepState.FAILED
    return SweepState.UNKNOWN

"""LaunchPlan: everything a node runner needs, decided on the launching machine and shipped as JSON.

Pure: building a plan reads configs and git metadata but creates nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.cluster_config import ClusterConfig
from orchestrator.config import REPO_ROOT, JobSpec


def code_version(root: Path = REPO_ROOT) -> dict[str, Any]:
    """Git commit and dirty flag of the checkout that launches (no secrets: no remote URLs)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


# Environment variables that change what the trainer computes, not where it runs: thread counts set the
# order of CPU reductions (so the last bits of every loss) and CUBLAS_WORKSPACE_CONFIG cuBLAS's determinism.
# A job inherits the environment of whichever process submits it, and a dead job is re-submitted by whoever
# watches the run, so the launcher's values travel in the plan and the node runner puts them back.
LAUNCH_ENV_KEYS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "CUBLAS_WORKSPACE_CONFIG")


def launch_env(environ: Mapping[str, str]) -> dict[str, str | None]:
    """The launcher's values of LAUNCH_ENV_KEYS; None where it had none (the node runner unsets it then)."""
    return {k: environ.get(k) for k in LAUNCH_ENV_KEYS}


def make_sweep_id(job_name: str, payload: str, now: float | None = None) -> str:
    """`<job-name>-<utc-timestamp>-<short-hash>`; the hash covers the plan and the instant."""
    now = time.time() if now is None else now
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    digest = hashlib.sha256(f"{payload}|{now!r}".encode()).hexdigest()[:6]
    return f"{job_name}-{stamp}-{digest}"


@dataclass
class LaunchPlan:
    sweep_id: str
    job: JobSpec
    cluster: ClusterConfig
    job_file: str
    cluster_file: str
    seeds: list[int]
    store_url: str
    created_at: float = field(default_factory=time.time)
    code: dict[str, Any] = field(default_factory=dict)
    python: str = sys.executable
    launch_env: dict[str, str | None] = field(default_factory=dict)   # see LAUNCH_ENV_KEYS
    # The user's code (workdir.Snapshot.summary(): store key, sha256, entry script) and the offline cache
    # (the same for the pre-fetched hub/tiktoken files); empty when the job has none.
    workdir: dict[str, Any] = field(default_factory=dict)
    offline: dict[str, Any] = field(default_factory=dict)
    # Filled per submission for seeds that run as separate jobs (Slurm arrays, retries).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def data_dir(self) -> str:
        return self.job.data.dir or self.cluster.data_dir

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["job"] = self.job.model_dump()
        d["cluster"] = self.cluster.model_dump()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def shown_dict(self) -> dict[str, Any]:
        """The plan as a console may show it (`launch --dry-run --json`): secret-named env values and anything
        shaped like a key, token or URL password read <redacted>."""
        from orchestrator.redaction import SECRET_NAME, redact

        d = self.to_dict()
        for env in (d["job"]["env"], d["cluster"]["env"]):
            env.update({k: "<redacted>" for k in env if SECRET_NAME.search(k)})
        return json.loads(redact(json.dumps(d)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LaunchPlan":
        d = dict(d)
        d["job"] = JobSpec.model_validate(d["job"])
        d["cluster"] = ClusterConfig.model_validate(d["cluster"])
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "LaunchPlan":
        return cls.from_dict(json.loads(text))

    def for_seeds(self, seeds: list[int]) -> "LaunchPlan":
        d = self.to_dict()
        d["seeds"] = list(seeds)
        return LaunchPlan.from_dict(d)


def snapshot_code(job: JobSpec, job_file: str | Path):
    """What ships the job's script (a workdir.Snapshot): its workdir, or the one script file; None for our trainer."""
    from orchestrator.workdir import snapshot_workdir

    if job.script is None:
        return None
    max_bytes = job.workdir_max_mb * 1e6
    if job.workdir is not None:
        snap = snapshot_workdir(job.workdir, job.script, max_bytes, f"{job_file}: workdir")
    else:
        script = Path(job.script)
        snap = snapshot_workdir(script.parent, script.name, max_bytes, f"{job_file}: script",
                                listing=([script.name], {}))
    return snap


def snapshot_offline(job: JobSpec, job_file: str | Path):
    """What ships the job's pre-fetched offline caches (a workdir.Snapshot); None when it names none."""
    from orchestrator.offline import snapshot_cache

    spec = job.offline
    if spec is None or not (spec.hf_kernels or spec.tiktoken):
        return None
    return snapshot_cache(spec, f"{job_file}: offline", str(job_file))


def _summary(snap) -> dict[str, Any]:
    return snap.summary() if snap is not None else {}


def build_plan(
    job: JobSpec,
    cluster: ClusterConfig,
    job_file: Path,
    cluster_file: Path,
    seeds: int | None = None,
    store: str | None = None,
    now: float | None = None,
    environ: Mapping[str, str] | None = None,
) -> LaunchPlan:
    n = seeds if seeds is not None else job.seeds
    seed_list = list(range(job.seed_base, job.seed_base + n))
    store_url = store or job.store or cluster.store
    payload = json.dumps([job.model_dump(), cluster.model_dump(), seed_list, store_url], sort_keys=True)
    created = time.time() if now is None else now
    return LaunchPlan(
        sweep_id=make_sweep_id(job.name, payload, created),
        job=job,
        cluster=cluster,
        job_file=str(job_file),
        cluster_file=str(cluster_file),
        seeds=seed_list,
        store_url=store_url,
        created_at=created,
        code=code_version(),
        launch_env=launch_env(os.environ if environ is None else environ),
        workdir=_summary(snapshot_code(job, job_file)),
        offline=_summary(snapshot_offline(job, job_file)),
    )

"""env.json: what ran where (code, versions, devices, host), from named non-secret facts only.

The process environment is never copied wholesale: only the variables named here are recorded.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import socket
import subprocess
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

from orchestrator.config import REPO_ROOT
from orchestrator.plan import LaunchPlan

ENV_KEYS_RECORDED = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_NODELIST", "RAY_JOB_ID", "OMP_NUM_THREADS")


def trainer_code_hash(root: Path = REPO_ROOT) -> str:
    """Hash of the code that decides what gets compiled: the trainer package."""
    h = hashlib.sha256()
    for p in sorted((root / "trainer").rglob("*.py")):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def describe_devices(device: str) -> list[str]:
    if device == "cuda" and shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0:
            return [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return [f"cpu: {platform.processor() or platform.machine()} x{os.cpu_count()}"]


def environment_record(plan: LaunchPlan, data_info: dict | None = None, env: Mapping[str, str] | None = None) -> dict:
    """env.json: what ran where. Only named, non-secret facts; never the process environment wholesale.
    env: the trainer's environment (default: this process's)."""
    env = os.environ if env is None else env
    return {
        "data": {"source": plan.job.data.source, **(data_info or {})},
        "sweep_id": plan.sweep_id,
        "git_commit": plan.code.get("commit"),
        "git_dirty": plan.code.get("dirty"),
        "trainer_code_hash": trainer_code_hash(),
        "workdir_sha256": plan.workdir.get("sha256"),  # the shipped script folder's tar, when the job runs a script
        "python": platform.python_version(),
        "torch": package_version("torch"),
        "triton": package_version("triton"),
        "speedrun": package_version("speedrun"),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "devices": describe_devices(plan.cluster.device),
        "backend": plan.cluster.backend,
        "cluster": plan.cluster.name,
        "env": {k: env[k] for k in ENV_KEYS_RECORDED if k in env},
    }

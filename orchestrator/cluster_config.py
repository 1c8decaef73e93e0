"""ClusterConfig: a cluster_configs/*.yaml (which engine, nodes, GPUs, store, $/hour, the engine's own section),
found by name or path, loaded once, validated with the same one-sentence errors as a job file (orchestrator/config.py).
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from orchestrator.config import (REPO_ROOT, ConfigError, Strict, apply_override, explain_error, override_source,
                                 parse_override, read_yaml)


class LocalSettings(Strict):
    pass


class SlurmSettings(Strict):
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int = Field(60, ge=1)
    cpus_per_task: int | None = Field(None, ge=1)
    mem_gb: int | None = Field(None, ge=1)
    constraint: str | None = None
    exclusive: bool = False
    extra_sbatch: list[str] = Field(default_factory=list, description="extra #SBATCH lines, e.g. '--reservation=x'")
    log_dir: str = "~/.cache/speedrun/slurm"
    signal_delay_s: int = Field(120, ge=0, description="Slurm signals the job this long before its time limit")
    seeds_parallel: bool = False
    max_requeues: int = Field(3, ge=0, description="checkpoint-and-requeue at most this many times on time limits")

    @field_validator("extra_sbatch")
    @classmethod
    def _long_options(cls, v: list[str]) -> list[str]:
        for line in v:
            if not line.strip().removeprefix("#SBATCH").strip().startswith("--"):
                raise ValueError(f"{line!r} is not a long sbatch option; write it as '--name=value' or '--flag'")
        return v


class RaySettings(Strict):
    address: str = Field("auto", description="Ray dashboard/Jobs address, e.g. http://127.0.0.1:8265")
    cluster_yaml: str | None = Field(None, description="Ray cluster launcher config for `speedrun cluster up|down`")
    launcher: dict[str, Any] | None = Field(
        None, description="the Ray cluster launcher config inline (instead of cluster_yaml); see cluster_configs/ray-cluster-*.yaml")
    working_dir: str | None = Field(None, description="code shipped with each job; default: this checkout")
    excludes: list[str] = Field(default_factory=list, description="more paths kept out of the shipped working_dir")
    pip: list[str] = Field(default_factory=list, description="extra pip packages for the job (runtime_env pip)")

    @model_validator(mode="after")
    def _one_launcher(self) -> "RaySettings":
        if self.launcher is not None and self.cluster_yaml is not None:
            raise ValueError("give either launcher (inline) or cluster_yaml (a file), not both")
        return self


class ClusterConfig(Strict):
    name: str
    backend: Literal["local", "slurm", "ray"]
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(8, ge=1, description="trainer processes per node (torchrun --nproc_per_node)")
    device: Literal["cuda", "cpu"] = "cuda"
    data_dir: str = "~/.cache/speedrun/data"
    work_dir: str = "~/.cache/speedrun/work"
    store: str = "runs"
    python: str | None = Field(None, description="python on the node; default: the launching interpreter")
    setup: list[str] = Field(default_factory=list, description="shell lines run before the node runner")
    env: dict[str, str] = Field(default_factory=dict)
    cost_per_hour: float | None = Field(None, ge=0, description="$ per node-hour, for the cost line")
    node_cache_gb: float = Field(50.0, gt=0, description="compile caches and shipped code each node keeps in "
                                 "work_dir between sweeps; past it, the least recently used go after a sweep")
    store_cache_gb: float = Field(20.0, gt=0, description="compile caches the store keeps (one per version of the "
                                  "code, torch and GPU); past it, the least recently used go after a sweep saves one")
    store_code_gb: float = Field(5.0, gt=0, description="shipped code the store keeps (workdir and offline tars, one "
                                 "per version launched); past it, the least recently used go after a sweep")
    store_code_keep_days: float = Field(7.0, gt=0, description="shipped code launched or started within this many "
                                        "days stays in the store even past store_code_gb (a queued sweep needs it)")
    local: LocalSettings | None = None
    slurm: SlurmSettings | None = None
    ray: RaySettings | None = None

    @model_validator(mode="after")
    def _section_for_backend(self) -> "ClusterConfig":
        if self.backend == "slurm" and self.slurm is None:
            self.slurm = SlurmSettings()
        if self.backend == "ray" and self.ray is None:
            self.ray = RaySettings()
        return self


def cluster_search_path() -> list[Path]:
    extra = os.environ.get("SPEEDRUN_CLUSTER_CONFIGS")
    dirs = [Path(extra)] if extra else []
    return dirs + [Path.cwd() / "cluster_configs", REPO_ROOT / "cluster_configs"]


def find_cluster_file(name: str) -> Path:
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        return Path(name)
    for d in cluster_search_path():
        p = d / f"{name}.yaml"
        if p.is_file():
            return p
    known = sorted({p.stem for d in cluster_search_path() if d.is_dir() for p in d.glob("*.yaml")})
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"known clusters: {', '.join(known) or 'none'}"
    raise ConfigError(f"--cluster {name}: no cluster_configs/{name}.yaml; {hint}")


def load_cluster(name_or_path: str, overrides: list[str] = ()) -> tuple[ClusterConfig, Path]:
    path = find_cluster_file(name_or_path)
    data = read_yaml(path, "cluster config")
    data.setdefault("name", path.stem)
    overrides = list(overrides)
    for o in overrides:
        parts, value = parse_override(o)
        if parts[0] == "cluster" and len(parts) > 1:
            apply_override(data, parts[1:], value)
    try:
        cluster = ClusterConfig.model_validate(data)
    except ValidationError as e:
        raise explain_error(e, path, ClusterConfig, lambda loc: override_source(overrides, loc, ("cluster",))) from None
    if cluster.backend == "local" and cluster.nodes > 1:
        where = override_source(overrides, ["nodes"], ("cluster",))
        where = f"{where} (on {path})" if where else str(path)
        raise ConfigError(f"{where}: nodes: the local backend runs on this one machine, so nodes must be 1 "
                          f"(got {cluster.nodes}); use a slurm or ray cluster config for more nodes")
    return cluster, path

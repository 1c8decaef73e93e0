"""Which engine runs a cluster config: the one place that names every backend (base.py names none)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.backends.base import Backend
    from orchestrator.cluster_config import ClusterConfig


def get_backend(cluster: "ClusterConfig") -> "Backend":
    """The backend named by the cluster config; engines are imported only when asked for."""
    if cluster.backend == "local":
        from orchestrator.backends.local import LocalBackend

        return LocalBackend(cluster)
    if cluster.backend == "slurm":
        from orchestrator.backends.slurm import SlurmBackend

        return SlurmBackend(cluster)
    if cluster.backend == "ray":
        from orchestrator.backends.ray import RayBackend

        return RayBackend(cluster)
    raise ValueError(f"unknown backend {cluster.backend!r}")

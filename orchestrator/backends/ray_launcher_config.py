"""Rented nodes, read but not touched: the Ray cluster-launcher config of a cluster config, checked and described.

A config for rented machines is an ordinary cluster config (backend: ray) whose `ray.launcher` (inline)
or `ray.cluster_yaml` (a file) is a Ray cluster-launcher config. Here it is read (local file_mounts made
absolute), checked against the schema that ships with ray (ray/autoscaler/ray-schema.json) and against
our config (enough GPU nodes for `nodes:`), and described: which nodes `ray up` would start, where, and
at what hourly price. Nothing here contacts a provider or a cloud; `speedrun cluster up|down|status`,
which act on it, are backends/ray_launcher.py.

    cluster, path, config = load_rented("cluster_configs/ray-cluster-aws.yaml")  # ConfigError names the key
    provisioning(config)                 # [NodeGroup(role='head', instance='p5.48xlarge', count=1, ...)]
    hourly_cost(cluster, config, path)   # '$55.04/hour (1 node(s) x $55.04; cost_per_hour in ..., yours to set)'
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.table import Table

from orchestrator.cluster_config import ClusterConfig, load_cluster
from orchestrator.config import ConfigError, override_source


# ------------------------------------------------------------------------- the launcher config


def launcher_config(cluster: ClusterConfig, path: Path) -> tuple[dict[str, Any], str]:
    """The Ray launcher config of a cluster config, with local file_mounts made absolute. Returns (config, key)."""
    settings = cluster.ray
    if cluster.backend != "ray" or settings is None or (settings.launcher is None and settings.cluster_yaml is None):
        raise ConfigError(f"{path}: ray.launcher: this cluster config provisions nothing; `speedrun cluster up` "
                          "needs backend: ray and a ray.launcher section (see cluster_configs/ray-cluster-aws.yaml)")
    if settings.launcher is not None:
        config, key, base = copy.deepcopy(settings.launcher), "ray.launcher", path.parent
    else:
        file = Path(os.path.expanduser(settings.cluster_yaml))
        file = file if file.is_absolute() else path.parent / file
        if not file.is_file():
            raise ConfigError(f"{path}: ray.cluster_yaml: {file} does not exist; give the Ray cluster launcher YAML")
        try:
            config = yaml.safe_load(file.read_text())
        except yaml.YAMLError:
            raise ConfigError(f"{file}: not valid YAML; fix the syntax") from None
        key, base = "ray.cluster_yaml", file.parent
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: {key}: must be a mapping (a Ray cluster launcher config)")
    # Local sides of file_mounts are relative to the config file, not to wherever `speedrun` runs.
    mounts = config.get("file_mounts") or {}
    if isinstance(mounts, dict):
        config["file_mounts"] = {remote: str((base / os.path.expanduser(local)).resolve())
                                 if isinstance(local, str) and not os.path.isabs(os.path.expanduser(local)) else local
                                 for remote, local in mounts.items()}
    return config, key


def ray_schema() -> dict[str, Any]:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def check_launcher(config: dict[str, Any], cluster: ClusterConfig, path: Path, key: str) -> None:
    """Ray's schema, then our own consistency rules; one ConfigError sentence naming the key."""
    import jsonschema

    errors = sorted(jsonschema.Draft7Validator(ray_schema()).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        where = ".".join([key, *map(str, e.absolute_path)])
        raise ConfigError(f"{path}: {where}: {e.message} (Ray cluster launcher schema); fix it per ray/autoscaler/ray-schema.json")
    provider = config["provider"].get("type")
    if provider == "local":
        for field in ("head_ip", "worker_ips"):
            if field not in config["provider"] and "coordinator_address" not in config["provider"]:
                raise ConfigError(f"{path}: {key}.provider.{field}: required by the on-prem provider; "
                                  "give the SSH-reachable addresses of the machines")
    elif provider is not None and not config.get("available_node_types"):
        raise ConfigError(f"{path}: {key}.available_node_types: missing; declare the head (and worker) node types")
    check_node_count(config, cluster, path, key)


def check_node_count(config: dict[str, Any], cluster: ClusterConfig, path: Path, key: str, where: str = "") -> None:
    """`nodes:` must not ask for more GPU nodes than the launcher config starts (a head with no workers is one)."""
    gpu_nodes = sum(g.count for g in provisioning(config) if g.gpus is None or g.gpus >= cluster.gpus_per_node)
    if gpu_nodes < cluster.nodes:
        raise ConfigError(f"{where or path}: nodes: {cluster.nodes} nodes of {cluster.gpus_per_node} GPUs asked for, "
                          f"but {key} starts {gpu_nodes} such node(s); raise min_workers or lower nodes")


def check_launch_nodes(cluster: ClusterConfig, path: Path, overrides: list[str] = ()) -> None:
    """At launch (and --dry-run): a cluster config that provisions its own nodes must provide `nodes:` of them.
    Reads the launcher config only; contacts nothing."""
    if cluster.backend == "ray" and cluster.ray is not None and (cluster.ray.launcher or cluster.ray.cluster_yaml):
        config, key = launcher_config(cluster, path)
        given = override_source(list(overrides), ["nodes"], ("cluster",))
        check_node_count(config, cluster, path, key, f"{given} (on {path})" if given else "")


def load_rented(config_path: str, overrides: list[str] = ()) -> tuple[ClusterConfig, Path, dict[str, Any]]:
    cluster, path = load_cluster(config_path, overrides)
    config, key = launcher_config(cluster, path)
    check_launcher(config, cluster, path, key)
    return cluster, path, config


def is_rented(cluster: ClusterConfig) -> bool:
    return cluster.backend == "ray" and cluster.ray is not None and (cluster.ray.launcher is not None or
                                                                     cluster.ray.cluster_yaml is not None)


def saved_launcher_path(config: dict[str, Any]) -> Path:
    """Where `up` keeps the launcher YAML it used, so `ray attach|dashboard|exec FILE` work on it too."""
    home = Path(os.environ.get("SPEEDRUN_HOME", "~/.cache/speedrun")).expanduser()
    return home / "clusters" / f"{config['cluster_name']}.yaml"


# -------------------------------------------------------------------------- what it provisions


@dataclass
class NodeGroup:
    role: str            # head | worker
    node_type: str
    instance: str        # instance type, or the machine's address on-prem
    count: int
    where: str           # region / availability zone, or "on-prem"
    gpus: float | None   # declared GPU resources, None when Ray detects them


def provisioning(config: dict[str, Any]) -> list[NodeGroup]:
    """What `ray up` would start, read from the config alone (no cloud calls): head first."""
    provider = config.get("provider", {})
    if provider.get("type") == "local":
        head = provider.get("head_ip", "(coordinator)")
        workers = provider.get("worker_ips", [])
        groups = [NodeGroup("head", "on-prem", "existing machine", 1, head, None)]
        if workers:
            groups.append(NodeGroup("worker", "on-prem", "existing machine",
                                    min(config.get("min_workers", len(workers)), len(workers)), ", ".join(workers), None))
        return groups
    where = provider.get("region", "?")
    if provider.get("availability_zone"):
        where += f" ({provider['availability_zone']})"
    head_type = config.get("head_node_type")
    groups = []
    for name, spec in (config.get("available_node_types") or {}).items():
        node = spec.get("node_config", {})
        instance = node.get("InstanceType") or node.get("machineType") or node.get("vmSize") or "?"
        gpus = (spec.get("resources") or {}).get("GPU")
        if name == head_type:
            groups.insert(0, NodeGroup("head", name, instance, 1, where, gpus))
        if spec.get("min_workers", 0):
            groups.append(NodeGroup("worker", name, instance, int(spec["min_workers"]), where, gpus))
    return groups


def provisioning_table(cluster: ClusterConfig, config: dict[str, Any], title: str) -> Table:
    t = Table(title=title, title_justify="left")
    for col in ("role", "node type", "instance", "count", "where", "$/hour"):
        t.add_column(col, justify="right" if col in ("count", "$/hour") else "left")
    rate = cluster.cost_per_hour
    total = 0
    for g in provisioning(config):
        total += g.count
        t.add_row(g.role, g.node_type, g.instance, str(g.count), g.where, "-" if rate is None else f"{rate * g.count:,.2f}")
    t.add_row("total", "", "", str(total), "", "-" if rate is None else f"{rate * total:,.2f}", style="bold")
    return t


def provisioning_json(cluster: ClusterConfig, config: dict[str, Any], path: Path, action: str) -> dict[str, Any]:
    """`speedrun cluster up|down CONFIG --dry-run --json`: the provisioning table's rows and totals."""
    from dataclasses import asdict

    rate = cluster.cost_per_hour
    groups = [{**asdict(g), "usd_per_hour": None if rate is None else rate * g.count} for g in provisioning(config)]
    total = sum(g["count"] for g in groups)
    return {"config": str(path), "cluster_name": config["cluster_name"], "action": action, "nodes": groups,
            "total_nodes": total, "usd_per_hour": None if rate is None else rate * total}


def hourly_cost(cluster: ClusterConfig, config: dict[str, Any], path: Path) -> str:
    """`$32.00/hour (2 nodes x $16.00; cost_per_hour in FILE, yours to set)`, or that the price is unknown."""
    n = sum(g.count for g in provisioning(config))
    if cluster.cost_per_hour is None:
        return f"an unknown price per hour ({n} node(s); set cost_per_hour in {path} to see it)"
    return (f"${cluster.cost_per_hour * n:,.2f}/hour ({n} node(s) x ${cluster.cost_per_hour:,.2f}; "
            f"cost_per_hour in {path}, yours to set)")

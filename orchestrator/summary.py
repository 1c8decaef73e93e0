"""SweepSummary: what a sweep looks like from its objects in the store, for `launch`, `show` and `runs`.

The seeds and their shown state come from results.load_sweep_runs (train.log parsed, manifest = commit
marker); this adds the data's entropy rate (env.json) and the sweep's wall time (timings.json).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from orchestrator.cluster_config import ClusterConfig
from orchestrator.results import ResultsError, SeedSummary, load_sweep_runs
from orchestrator.sweep import seed_prefix


@dataclass
class SweepSummary:
    sweep_id: str
    seeds: list[SeedSummary] = field(default_factory=list)  # each with its shown state
    entropy_rate_nats: float | None = None
    wall_s: float | None = None


def json_or_none(store, key: str) -> dict | None:
    """A JSON record of the store, or None where it is missing or unreadable."""
    try:
        return json.loads(store.get_bytes(key)) if store.exists(key) else None
    except ValueError:
        return None


def sweep_summary(store, sweep_id: str) -> SweepSummary:
    s = SweepSummary(sweep_id)
    try:
        runs = load_sweep_runs(store, sweep_id)
    except ResultsError:
        return s
    walls = []
    for run in runs:
        r = run.summary
        prefix = seed_prefix(sweep_id, r.seed)
        s.seeds.append(r)
        timings = json_or_none(store, f"{prefix}/timings.json") or {}
        if timings.get("total_s") is not None:
            walls.append(timings["total_s"])
        if s.entropy_rate_nats is None:
            env = json_or_none(store, f"{prefix}/env.json") or {}
            s.entropy_rate_nats = (env.get("data") or {}).get("entropy_rate_nats")
    s.wall_s = max(walls) if walls else None
    return s


def cost_line(cluster: ClusterConfig, seconds: float) -> str:
    """`cost: 8 GPUs x 0.05 h = 0.37 GPU-hours; 1 node x $55.04/node-hour = $2.75` for run summaries."""
    hours = max(seconds, 0.0) / 3600
    gpus = cluster.nodes * cluster.gpus_per_node
    gpu_hours = gpus * hours
    line = f"cost: {gpus} GPUs x {hours:.2f} h = {gpu_hours:.2f} GPU-hours"
    if cluster.cost_per_hour is None:
        return line + f" (no cost_per_hour in cluster config {cluster.name!r}, so no $)"
    per_gpu_hour = cluster.cost_per_hour / cluster.gpus_per_node
    return (line + f" x ${per_gpu_hour:,.2f}/GPU-hour (${cluster.cost_per_hour:,.2f}/node-hour)"
            f" = ${gpu_hours * per_gpu_hour:,.2f}")

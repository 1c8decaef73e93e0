"""SweepSummary: what a finished (or half-finished) sweep looks like from its objects in the store.

A seed counts as done only when its manifest.json exists (the commit marker); its numbers come from
train.log through results.parse_log, and its state from timings.json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from orchestrator.results import parse_log
from orchestrator.runs import seed_ids


@dataclass
class SeedRow:
    seed: int
    state: str  # succeeded | failed | incomplete (no manifest yet) | running
    val_loss: float | None = None
    train_time_s: float | None = None
    step_avg_ms: float | None = None
    peak_mem_mib: float | None = None
    total_s: float | None = None


@dataclass
class SweepSummary:
    sweep_id: str
    seeds: list[SeedRow] = field(default_factory=list)
    entropy_rate_nats: float | None = None
    wall_s: float | None = None


def _json_or_none(store, key: str) -> dict | None:
    if not store.exists(key):
        return None
    try:
        return json.loads(store.get_bytes(key))
    except (ValueError, OSError):
        return None


def seed_row(store, sweep_id: str, seed: int) -> tuple[SeedRow, dict | None]:
    prefix = f"{sweep_id}/seed-{seed}"
    manifest = _json_or_none(store, f"{prefix}/manifest.json")
    timings = _json_or_none(store, f"{prefix}/timings.json") or {}
    row = SeedRow(seed=seed, state="incomplete")
    if manifest is not None:
        row.state = manifest.get("state") or timings.get("state") or "succeeded"
    if store.exists(f"{prefix}/train.log"):
        res = parse_log(store.get_bytes(f"{prefix}/train.log").decode(errors="replace"))
        row.val_loss = res.final_val_loss
        row.train_time_s = None if res.train_time_ms is None else res.train_time_ms / 1000
        row.step_avg_ms = res.step_avg_ms
        row.peak_mem_mib = res.peak_alloc_mib
        if manifest is None and not res.complete:
            row.state = "running" if res.steps_done else "incomplete"
    row.total_s = timings.get("total_s")
    return row, _json_or_none(store, f"{prefix}/env.json")


def sweep_summary(store, sweep_id: str) -> SweepSummary:
    s = SweepSummary(sweep_id)
    for seed in seed_ids(store, sweep_id):
        row, env = seed_row(store, sweep_id, seed)
        s.seeds.append(row)
        if env and s.entropy_rate_nats is None:
            s.entropy_rate_nats = (env.get("data") or {}).get("entropy_rate_nats")
    totals = [r.total_s for r in s.seeds if r.total_s is not None]
    s.wall_s = max(totals) if totals else None
    return s

"""A seed's results as the statistics and plots see them (SeedSummary, SeedLog), and a sweep's seeds read
from the store into them: each seed's train.log parsed, its manifest (the commit marker) and the node
runner's records (timings.json) deciding whether it counts.

The only I/O here is reading the store; the log parsing itself is orchestrator/train_log.py, and raw log
files on disk are loaded by orchestrator/log_files.py.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

from orchestrator.sweep import MANIFEST, plan_key, seed_dir, seed_done, seed_of_dir, seed_prefix, shown_state
from orchestrator.train_log import LogFormatError, SeedResult, parse_log

log = logging.getLogger(__name__)


@dataclass
class SeedSummary:
    """One seed's numbers as the statistics see them."""

    seed: int | None
    val_loss: float | None
    train_time_s: float | None
    step_avg_ms: float | None
    peak_mem_mib: int | None
    complete: bool
    reason: str = ""
    name: str = ""  # `seed-3` or the log file's name; what tables show
    state: str = ""  # a sweep's seed: succeeded | failed | incomplete (sweep.shown_state); "" for a log file
    total_steps: int | None = None  # the run's step count: runs of different lengths are not one pool

    @classmethod
    def from_result(cls, result: SeedResult, seed: int | None = None, name: str = "") -> "SeedSummary":
        return cls(
            seed=seed,
            val_loss=result.final_val_loss,
            train_time_s=None if result.train_time_ms is None else result.train_time_ms / 1000.0,
            step_avg_ms=result.step_avg_ms,
            peak_mem_mib=result.peak_alloc_mib,
            complete=result.complete,
            reason=result.reason,
            name=name or (seed_dir(seed) if seed is not None else ""),
            total_steps=result.total_steps,
        )

    @classmethod
    def failed(cls, reason: str, seed: int | None = None, name: str = "") -> "SeedSummary":
        return cls(seed, None, None, None, None, False, reason, name or (seed_dir(seed) if seed is not None else ""))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SeedSummary":
        return cls(**d)


class ResultsError(Exception):
    """One sentence naming the sweep or file, the cause and the fix."""


@dataclass
class SeedLog:
    """One seed (or one log file) with its parsed curves, for the statistics and the plots."""

    summary: SeedSummary
    result: SeedResult | None = None

    @property
    def name(self) -> str:
        return self.summary.name


# ---- loaders: a sweep in the store (the only I/O in this module) ----


def _record_field(store: Any, keys: set[str], key: str, name: str) -> Any:
    """One field of a JSON record the node runner wrote; None when the record is missing or unreadable."""
    if key not in keys:
        return None
    try:
        return json.loads(store.get_bytes(key)).get(name)
    except (ValueError, AttributeError):
        return None


def _seed_run(store: Any, sweep_id: str, seed: int, keys: set[str]) -> SeedLog:
    prefix = seed_prefix(sweep_id, seed)
    name = seed_dir(seed)
    if f"{prefix}/train.log" not in keys:
        why = "no train.log in the store" if keys else "no objects in the store (never started, or still staging)"
        return SeedLog(SeedSummary.failed(why, seed=seed, name=name))
    text = store.get_bytes(f"{prefix}/train.log").decode("utf-8", errors="replace")
    try:
        result = parse_log(text)
    except LogFormatError as e:
        return SeedLog(SeedSummary.failed(f"train.log {e}", seed=seed, name=name))
    summary = SeedSummary.from_result(result, seed=seed, name=name)
    if f"{prefix}/manifest.json" not in keys:
        # The manifest is written last: without it the upload is unfinished, whatever the log says.
        summary.complete = False
        summary.reason = "no manifest.json (upload unfinished or seed still running; `speedrun collect` finishes it)" + (
            f"; log: {result.reason}" if result.reason else "")
        return SeedLog(summary, result)
    # The node runner records the seed's fate in timings.json (state, exit_code); a log can look whole
    # while the trainer still crashed at exit, so a failed state wins.
    state = None
    for record in ("manifest.json", "timings.json"):
        if state is None:
            state = _record_field(store, keys, f"{prefix}/{record}", "state")
    if not seed_done(True, state):
        why = _record_field(store, keys, f"{prefix}/timings.json", "reason")   # why it stopped, if the node said
        summary.complete = False
        summary.reason = f"node runner marked it {state}" + (f" ({why})" if why else "") + (
            f"; log: {result.reason}" if result.reason else "")
    return SeedLog(summary, result)


def load_sweep_runs(store: Any, sweep_id: str) -> list[SeedLog]:
    """Every seed of a sweep: those found under `<sweep>/seed-<n>/` and those the plan lists but never wrote."""
    sweep_id = sweep_id.strip("/")
    listing = store.list(f"{sweep_id}/")
    keys = {getattr(o, "key", o) for o in listing}
    seeds: set[int] = set()
    for key in keys:
        parts = key[len(sweep_id) + 1:].split("/")
        seed = seed_of_dir(parts[0])
        if seed is not None and len(parts) > 1:
            seeds.add(seed)
    if plan_key(sweep_id) in keys:
        try:
            seeds.update(int(s) for s in json.loads(store.get_bytes(plan_key(sweep_id))).get("seeds", []))
        except (ValueError, TypeError, AttributeError):
            log.warning("%s/plan.json is not a readable plan; using the seeds found in the store", sweep_id)
    if not seeds:
        raise ResultsError(f"sweep {sweep_id!r}: no seed-<n>/ objects and no plan.json under {store.url(sweep_id)}; "
                           "check the sweep id (`speedrun status`) and the --store URL")
    runs = []
    for seed in sorted(seeds):
        seed_keys = {k for k in keys if k.startswith(f"{seed_prefix(sweep_id, seed)}/")}
        run = _seed_run(store, sweep_id, seed, seed_keys)
        committed = f"{seed_prefix(sweep_id, seed)}/{MANIFEST}" in seed_keys
        run.summary.state = shown_state(run.summary.complete, committed).value
        runs.append(run)
    return runs


def sweep_target(store: Any, sweep_id: str) -> float | None:
    """The job's `target_loss:` from the sweep's plan.json; None when the store has no readable plan."""
    key = plan_key(sweep_id.strip("/"))
    try:
        if not store.exists(key):
            return None
        value = json.loads(store.get_bytes(key)).get("job", {}).get("target_loss")
        return None if value is None else float(value)
    except (ValueError, TypeError, AttributeError):
        log.warning("%s is not a readable plan; using the default target", key)
        return None


def load_sweep(store: Any, sweep_id: str) -> list[SeedSummary]:
    return [r.summary for r in load_sweep_runs(store, sweep_id)]

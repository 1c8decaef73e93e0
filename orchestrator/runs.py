"""Where launched runs are found again: a local index on this machine and the run's own record in the store.

`speedrun status|logs|cancel RUN` look the handle up in the local index first (fast, works offline),
then in the store (`<sweep-id>/handle.json`), so another machine with the store can follow a run too.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from orchestrator.backends.base import Handle
from orchestrator.config import ConfigError
from orchestrator.sweep import handle_key, sweep_of_key


def speedrun_home() -> Path:
    return Path(os.environ.get("SPEEDRUN_HOME", "~/.cache/speedrun")).expanduser()


def index_path() -> Path:
    return speedrun_home() / "runs.json"


@dataclass
class RunRecord:
    sweep_id: str
    store_url: str
    cluster_file: str
    job_file: str
    created_at: float
    handle: dict[str, Any]

    @property
    def handle_obj(self) -> Handle:
        return Handle.from_dict(self.handle)


def _read_index() -> dict[str, Any]:
    p = index_path()
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return {}


def record_run(rec: RunRecord, store=None) -> None:
    """Remember a submitted run locally and, when a store is given, beside its artifacts."""
    p = index_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(p) + ".lock"):
        idx = _read_index()
        idx[rec.sweep_id] = rec.__dict__
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(idx, indent=2, sort_keys=True))
        tmp.replace(p)
    if store is not None:
        store.put_bytes(json.dumps(rec.__dict__, indent=2).encode(), handle_key(rec.sweep_id))


def find_run(sweep_id: str, store=None) -> RunRecord:
    rec = _read_index().get(sweep_id)
    if rec is None and store is not None and store.exists(handle_key(sweep_id)):
        rec = json.loads(store.get_bytes(handle_key(sweep_id)))
    if rec is None:
        known = sorted(_read_index())[-3:]
        hint = f" recent runs: {', '.join(known)}" if known else ""
        raise ConfigError(f"run {sweep_id!r}: not in {index_path()} nor in the store; "
                          f"check the id with `speedrun runs`.{hint}")
    return RunRecord(**rec)


def list_sweeps(store) -> list[str]:
    """Sweep ids present in a store: prefixes that hold a plan.json."""
    out = set()
    for obj in store.list(""):
        sweep = sweep_of_key(obj.key)
        if sweep:
            out.add(sweep)
    return sorted(out)

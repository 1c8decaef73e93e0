"""Where launched sweeps are found again: a local index on this machine and each sweep's own record in the
store (`<sweep-id>/handle.json`), so that any machine with the store URL can follow, list or cancel a sweep.

`speedrun status|logs|cancel|watch RUN [--store URL]` accept a whole id, an unambiguous prefix of one,
or `last` (the newest); `speedrun status` alone lists recent sweeps from both places, newest first.
"""
from __future__ import annotations

import calendar
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from filelock import FileLock

from orchestrator.backends.base import Handle
from orchestrator.config import ConfigError
from orchestrator.sweep import handle_key, sweep_of_key

LAST = "last"
_STAMP = re.compile(r"-(\d{8}T\d{6}Z)-[0-9a-f]+$")


def speedrun_home() -> Path:
    return Path(os.environ.get("SPEEDRUN_HOME", "~/.cache/speedrun")).expanduser()


def index_path() -> Path:
    return speedrun_home() / "runs.json"


@dataclass
class SweepRecord:
    """What `speedrun launch` remembers of a submitted sweep, locally and in the store."""

    sweep_id: str
    store_url: str
    cluster_file: str
    job_file: str
    created_at: float
    handle: dict[str, Any]

    @property
    def handle_obj(self) -> Handle:
        return Handle.from_dict(self.handle)


# ------------------------------------------------------------------------------- pure: which sweep


def launched_at(sweep_id: str) -> float | None:
    """The launch time written into `<job>-<YYYYmmddTHHMMSSZ>-<hash>`; None for other names."""
    m = _STAMP.search(sweep_id)
    return calendar.timegm(time.strptime(m.group(1), "%Y%m%dT%H%M%SZ")) if m else None


def newest_first(sweep_ids: Iterable[str]) -> list[str]:
    return sorted(set(sweep_ids), key=lambda s: (launched_at(s) or 0.0, s), reverse=True)


def resolve_sweep_id(query: str, known: Iterable[str], where: str) -> str:
    """`last`, a whole id, or an unambiguous prefix of one -> the id; one sentence when none or several match."""
    ids = newest_first(known)
    if query == LAST:
        if not ids:
            raise ConfigError(f"run 'last': no runs in {where}; launch one, or pass --store URL")
        return ids[0]
    if query in ids:
        return query
    matches = [s for s in ids if s.startswith(query)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        shown = ", ".join(matches[:4]) + (", ..." if len(matches) > 4 else "")
        raise ConfigError(f"run {query!r}: {len(matches)} runs in {where} start with it ({shown}); type more of the id")
    hint = f" recent runs: {', '.join(ids[:3])}" if ids else ""
    raise ConfigError(f"run {query!r}: not in {where}; list runs with `speedrun status"
                      f"{'' if 'store' in where else ' --store URL'}`.{hint}")


# ------------------------------------------------------------------------------- the local index and the store


def _read_index() -> dict[str, Any]:
    p = index_path()
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return {}


def record_sweep(rec: SweepRecord, store=None) -> None:
    """Remember a submitted sweep locally and, when a store is given, beside its artifacts."""
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


def _where(store) -> str:
    return f"{index_path()}" + (f" nor in the store {store.url()}" if store is not None else "")


def find_sweep(query: str, store=None) -> SweepRecord:
    """The record of sweep `query` (id, prefix or `last`), from the local index or the store's handle.json."""
    idx = _read_index()
    known = set(idx) | (set(list_sweeps(store)) if store is not None else set())
    sweep_id = resolve_sweep_id(query, known, _where(store))
    rec = idx.get(sweep_id)
    if rec is None and store is not None and store.exists(handle_key(sweep_id)):
        rec = json.loads(store.get_bytes(handle_key(sweep_id)))
    if rec is None:
        raise ConfigError(f"run {sweep_id!r}: its plan is in the store but not its {handle_key(sweep_id)}; "
                          "it was never submitted, or was launched by an older speedrun")
    return SweepRecord(**rec)


def recent_sweeps(store=None, limit: int = 10) -> list[SweepRecord]:
    """The newest sweeps of the local index and the store, newest first (those with a handle)."""
    idx = _read_index()
    known = set(idx) | (set(list_sweeps(store)) if store is not None else set())
    out = []
    for sweep_id in newest_first(known):
        if len(out) == limit:
            break
        rec = idx.get(sweep_id)
        if rec is None and store is not None and store.exists(handle_key(sweep_id)):
            rec = json.loads(store.get_bytes(handle_key(sweep_id)))
        if rec is not None:
            out.append(SweepRecord(**rec))
    return out


def list_sweeps(store) -> list[str]:
    """Sweep ids present in a store: prefixes that hold a plan.json."""
    out = set()
    for obj in store.list(""):
        sweep = sweep_of_key(obj.key)
        if sweep:
            out.add(sweep)
    return sorted(out)

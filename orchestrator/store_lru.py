"""Tars the store keeps under a size, least recently used out first: the compile caches (compile_cache.py) and the
shipped code (workdir.py: workdir and offline tars). Each use stamps the tar's time of use in a small object beside
it (`<key>.used`, the unix time as JSON); a prune removes the least recently used tars, each with its stamp, until
the rest fit.

    mark_used(store, key)                       # a failure only warns: the tar then looks older than it is
    tars = last_uses(store, ["compile-cache/"]) # -> [LastUse(key, size, unix, stamped)]
    prune(store, tars, max_bytes, keep={key}, young_since=unix) -> [removed keys], oldest first
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass

from orchestrator.store import Store, StoreError

log = logging.getLogger(__name__)

USED = ".used"   # beside each tar: the unix time it was last used


@dataclass(frozen=True)
class LastUse:
    key: str
    size: int
    unix: float      # its stamp's time; without a readable stamp, what last_uses counts instead
    stamped: bool    # a stamp object is beside it (removed with it)


def mark_used(store: Store, key: str, now: float | None = None, if_present: bool = False) -> None:
    """Stamp the tar at `key` as used now (a few bytes). if_present: only when the tar is in the store, so that no
    stamp outlives its tar. A failure only warns: the tar then looks older than it is."""
    try:
        if if_present and not store.exists(key):
            return
        store.put_bytes(json.dumps({"unix": time.time() if now is None else now}).encode(), key + USED)
    except StoreError as e:
        log.warning("could not stamp %s as used (%s)", store.url(key), e)


def _stamp_time(store: Store, key: str) -> float | None:
    try:
        return float(json.loads(store.get_bytes(key + USED))["unix"])
    except (StoreError, ValueError, KeyError, TypeError):
        return None


def last_uses(store: Store, prefixes: list[str], by_modified: bool = False) -> list[LastUse]:
    """Every tar under the prefixes with the time of its last use: its stamp's; without a readable one (a tar from
    before stamps), the object's modification time where by_modified and the store gives one, else 0 (the oldest)."""
    out = []
    for prefix in prefixes:
        objects = store.list(prefix)
        stamps = {o.key for o in objects if o.key.endswith(".tar" + USED)}
        for o in objects:
            if not o.key.endswith(".tar"):
                continue
            unix = _stamp_time(store, o.key) if o.key + USED in stamps else None
            if unix is None:
                unix = (o.modified or 0.0) if by_modified else 0.0
            out.append(LastUse(o.key, o.size, unix, o.key + USED in stamps))
    return out


def prune(store: Store, tars: list[LastUse], max_bytes: int, keep: Collection[str] = (),
          young_since: float | None = None) -> list[str]:
    """Remove the least recently used tars (each with its stamp) until the rest fit in max_bytes. Those in keep, and
    those used at or after young_since, are never removed: they stay, and count, even over the bound; a tar's stamp
    is read again just before it goes, so that one used since the listing stays too (this narrows a launcher's race
    with a prune to that one read; there is no lock). Returns the removed keys, oldest first."""
    total = sum(t.size for t in tars)
    removed = []
    for t in sorted(tars, key=lambda t: (t.unix, t.key)):
        if total <= max_bytes:
            break
        if t.key in keep or (young_since is not None and t.unix >= young_since):
            continue
        if young_since is not None and (_stamp_time(store, t.key) or 0.0) >= young_since:
            continue   # used since the listing (a launcher shipping it again): read once more just before it goes
        store.delete(t.key)
        if t.stamped:
            store.delete(t.key + USED)
        total -= t.size
        removed.append(t.key)
    return removed

"""What a node keeps between sweeps, under a size: the compile caches (work_dir/compile-cache/<code key>/, one per
version of the code) and the shipped code (work_dir/shipped/: workdir and offline tars, unpacked offline folders).
Without a bound they grow by hundreds of MB with every change to the code that is launched.

A node runner holds a shared lock on each entry its sweep uses (a `.<name>.inuse` file beside it, never removed)
and stamps the entry's time of use when it lets go. After its seeds, still holding, it removes the least recently
used entries until the rest fit the cluster's node_cache_gb; an entry that any run on the node holds (its own
included) stays, whatever its size.

    with hold([cache_root, shipped_tar]):
        ...                                    # the seeds
        prune([compile_cache_dir, shipped_dir], max_bytes) -> [removed paths]
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def _lock_file(entry: Path) -> Path:
    return entry.parent / f".{entry.name}.inuse"


def _size(entry: Path) -> int:
    if entry.is_file():
        return entry.stat().st_size
    return sum(f.stat().st_size for f in entry.rglob("*") if f.is_file() and not f.is_symlink())


@contextlib.contextmanager
def hold(entries: list[Path]) -> Iterator[None]:
    """Shared locks on the entries (which may not exist yet) for the block; each stamped as used when let go."""
    with contextlib.ExitStack() as stack:
        for entry in entries:
            stack.callback(_stamp, entry)
            try:
                entry.parent.mkdir(parents=True, exist_ok=True)
                f = stack.enter_context(open(_lock_file(entry), "a"))
                fcntl.flock(f, fcntl.LOCK_SH)
            except OSError as e:   # a filesystem without flock (some Lustre mounts): prune() then removes nothing
                log.warning("node cache: cannot lock %s (%s); it is not pruned while this runs", entry, e)
        yield


def _stamp(entry: Path) -> None:
    try:
        os.utime(entry)
    except OSError:   # never made by this run (a cold compile that failed, a script that shipped nothing)
        pass


def _remove_unless_held(entry: Path) -> bool:
    with open(_lock_file(entry), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:   # held by a run (BlockingIOError), or no locks on this filesystem: either way, in use
            return False
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)
        return True


def prune(roots: list[Path], max_bytes: int) -> list[Path]:
    """The entries directly under the roots, most recently used first, kept while they fit max_bytes; the rest
    removed, except those a run holds. Names starting with '.' (locks, half-written downloads) are not entries."""
    entries = [e for root in roots if root.is_dir() for e in root.iterdir() if not e.name.startswith(".")]
    entries.sort(key=lambda e: e.lstat().st_mtime, reverse=True)
    kept, removed = 0, []
    for entry in entries:
        size = _size(entry)
        if kept + size <= max_bytes or not _remove_unless_held(entry):
            kept += size
            continue
        removed.append(entry)
        log.info("node cache: removed %s (%.1f MB, least recently used)", entry, size / 1e6)
    return removed

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

SweepCaches is what one sweep's node runner uses of them: its compile cache (its key, its folder; restored from
the store before the seeds, saved after them, the store's caches then kept under store_cache_gb), its shipped
tars (stamped as used in the store when the sweep starts; the store's kept under store_code_gb after it) and
offline files, and the node's bound after the sweep. A cache never fails a run: errors are warnings.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from functools import cached_property
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


class SweepCaches:
    """The caches of one sweep on its node (see the module's docstring); the store is opened only when needed."""

    def __init__(self, plan, store_of: Callable, console, is_first_node: bool):
        from orchestrator.config import expand

        self.plan = plan
        self.store_of = store_of
        self.console = console
        self.is_first_node = is_first_node
        self.shipped = expand(plan.cluster.work_dir) / "shipped"   # workdir and offline tars, by sha256
        self.compile_cache_dir = expand(plan.cluster.work_dir) / "compile-cache"   # every code's, one folder each
        self.offline_dir: Path | None = None

    @cached_property
    def compile_cache_key(self) -> str:
        from orchestrator.compile_cache import cache_key, code_hash
        from orchestrator.provenance import describe_devices, package_version, trainer_code_hash

        gpu = describe_devices(self.plan.cluster.device)[0].split(",")[0]
        code = code_hash(self.plan.workdir.get("sha256"), trainer_code_hash())
        return cache_key(code, package_version("torch") or "none", gpu)

    @cached_property
    def cache_root(self) -> Path:
        """This code's compile caches on this node: one folder per key, so what is saved under a key holds
        only what that code compiled (a record script never saves our trainer's kernels, nor the reverse)."""
        return self.compile_cache_dir / Path(self.compile_cache_key).stem

    def restore_compile_cache(self) -> None:
        if self.plan.cluster.device != "cuda":
            return
        from orchestrator.compile_cache import restore_compile_cache

        try:
            hit = restore_compile_cache(self.store_of(), self.compile_cache_key, self.cache_root)
            self.console.print(f"[node] compile cache {'restored' if hit else 'not in store yet (cold compile)'}")
        except Exception as e:  # a cache is an optimisation: never fail a run over it
            log.warning("compile cache restore failed: %s", e)

    def save_compile_cache(self) -> None:
        """This code's cache into the store, then the store's caches back under cluster.store_cache_gb."""
        if self.plan.cluster.device != "cuda" or not self.is_first_node:
            return
        from orchestrator.compile_cache import prune_store_caches, save_compile_cache

        store = self.store_of()
        try:
            save_compile_cache(store, self.compile_cache_key, self.cache_root)
        except Exception as e:
            log.warning("compile cache save failed: %s", e)
        limit = self.plan.cluster.store_cache_gb
        try:
            removed = prune_store_caches(store, int(limit * 1e9), keep=self.compile_cache_key)
        except Exception as e:  # the bound is housekeeping: never fail a run over it
            log.warning("compile caches in the store not pruned: %s", e)
            return
        if removed:
            self.console.print(f"[node] compile caches in the store over store_cache_gb={limit:g}: removed "
                               f"{len(removed)}, least recently used first ({', '.join(removed)})")

    def shipped_keys(self) -> list[str]:
        """The store keys of this sweep's shipped tars (its workdir, its offline caches), if it has any."""
        return [shipped["key"] for shipped in (self.plan.workdir, self.plan.offline) if shipped]

    def mark_shipped_used(self) -> None:
        """Stamp this sweep's shipped tars as used in the store, once per sweep (the first node), whether this node
        fetches them or has them already: a sweep that starts days after its launch renews its code's keep."""
        if not self.is_first_node or not self.shipped_keys():
            return
        from orchestrator.store_lru import mark_used

        store = self.store_of()
        for key in self.shipped_keys():
            mark_used(store, key, if_present=True)   # a tar gone from the store gets no stamp: fetch says it is gone

    def prune_store_code(self) -> None:
        """The store's shipped tars back under cluster.store_code_gb, least recently used first; this sweep's, and
        any used within store_code_keep_days (a sweep still queued may need it), stay even over it."""
        if not self.is_first_node:
            return
        from orchestrator.workdir import prune_shipped

        c = self.plan.cluster
        try:
            removed = prune_shipped(self.store_of(), int(c.store_code_gb * 1e9), c.store_code_keep_days,
                                    keep=self.shipped_keys())
        except Exception as e:  # the bound is housekeeping: never fail a run over it
            log.warning("shipped code in the store not pruned: %s", e)
            return
        if removed:
            self.console.print(f"[node] shipped code in the store over store_code_gb={c.store_code_gb:g}: removed "
                               f"{len(removed)} unused for over store_code_keep_days={c.store_code_keep_days:g}, "
                               f"least recently used first ({', '.join(removed)})")

    def restore_offline(self) -> None:
        """The pre-fetched hub/tiktoken files (job `offline:`), unpacked once per node."""
        from orchestrator.offline import restore

        if self.plan.offline:
            self.offline_dir = restore(self.store_of(), self.plan.offline, self.shipped)
            self.console.print(f"[node] offline caches ({self.plan.offline['files']} files) in {self.offline_dir}")

    def entries(self) -> list[Path]:
        """What this sweep uses of the node's caches: its compile cache and its shipped tars."""
        from orchestrator.offline import unpacked_dir
        from orchestrator.workdir import cached_tar

        entries = [self.cache_root] if self.plan.cluster.device == "cuda" else []
        for shipped in (self.plan.workdir, self.plan.offline):
            if shipped:
                entries.append(cached_tar(self.shipped, shipped["sha256"]))
        if self.plan.offline:
            entries.append(unpacked_dir(self.shipped, self.plan.offline["sha256"]))
        return entries

    def prune_node(self) -> None:
        """The node's caches back under cluster.node_cache_gb, least recently used out first."""
        try:
            removed = prune([self.compile_cache_dir, self.shipped], int(self.plan.cluster.node_cache_gb * 1e9))
        except OSError as e:
            log.warning("node cache: not pruned (%s)", e)
            return
        if removed:
            self.console.print(f"[node] caches over node_cache_gb={self.plan.cluster.node_cache_gb:g}: removed "
                               f"{len(removed)} least recently used ({', '.join(p.name for p in removed)})")

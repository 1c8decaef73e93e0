"""The node's caches under a size (node_cache.py): least recently used out first, never what a run holds."""
import fcntl
import os
import time
from pathlib import Path

from orchestrator.node_cache import hold, prune


def entry(root: Path, name: str, mb: float, age_s: float) -> Path:
    """A compile-cache folder (name without a suffix) or a shipped tar, of this size, last used age_s ago."""
    p = root / name
    if name.endswith(".tar"):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * int(mb * 1e6))
    else:
        (p / "triton" / "k").mkdir(parents=True)
        (p / "triton" / "k" / "a.cubin").write_bytes(b"x" * int(mb * 1e6))
    t = time.time() - age_s
    os.utime(p, (t, t))
    return p


def test_the_least_recently_used_go_first_until_the_rest_fit(tmp_path):
    cc, shipped = tmp_path / "compile-cache", tmp_path / "shipped"
    new = entry(cc, "ours-new", 2, age_s=10)
    old = entry(cc, "ours-old", 2, age_s=3000)
    tar_recent = entry(shipped, "aa.tar", 1, age_s=100)
    tar_old = entry(shipped, "bb.tar", 1, age_s=2000)
    (shipped / ".part-123").write_bytes(b"x" * 5_000_000)   # a download in progress: not an entry
    removed = prune([cc, shipped], max_bytes=3_500_000)
    assert removed == [tar_old, old]
    assert new.is_dir() and tar_recent.is_file() and (shipped / ".part-123").exists()
    assert prune([cc, shipped], max_bytes=3_500_000) == []   # fits now
    assert prune([tmp_path / "none"], max_bytes=0) == []


def test_an_entry_a_run_holds_stays_whatever_its_age_and_size(tmp_path):
    cc = tmp_path / "compile-cache"
    held = entry(cc, "other-sweep", 5, age_s=9000)
    free = entry(cc, "stale", 5, age_s=8000)
    with hold([held]):   # a run in another process takes its shared lock the same way
        assert prune([cc], max_bytes=0) == [free]
        assert held.is_dir()
    assert prune([cc], max_bytes=0) == [held]   # let go: now it may go


def test_hold_stamps_the_time_of_use_so_a_used_entry_is_the_most_recent(tmp_path):
    cc = tmp_path / "compile-cache"
    used = entry(cc, "ours", 1, age_s=5000)
    other = entry(cc, "theirs", 1, age_s=100)
    missing = cc / "never-made"
    with hold([used, missing]):
        pass
    assert used.stat().st_mtime > other.stat().st_mtime
    assert prune([cc], max_bytes=1_500_000) == [other]
    assert not missing.exists() and (cc / ".never-made.inuse").exists()   # a lock file, not an entry


def test_a_lock_held_by_another_open_file_blocks_removal(tmp_path):
    """What another process's hold() amounts to: a shared flock on the entry's .inuse file."""
    cc = tmp_path / "compile-cache"
    e = entry(cc, "busy", 1, age_s=100)
    with open(cc / ".busy.inuse", "a") as f:
        fcntl.flock(f, fcntl.LOCK_SH)
        assert prune([cc], max_bytes=0) == [] and e.is_dir()


def test_without_file_locks_nothing_is_removed_and_the_run_goes_on(tmp_path, monkeypatch):
    """Some shared filesystems refuse flock: a run must not fail over it, nor may a prune remove what it cannot
    tell is unused."""
    import orchestrator.node_cache as node_cache

    def no_locks(f, op):
        raise OSError(37, "No locks available")

    cc = tmp_path / "compile-cache"
    e = entry(cc, "stale", 1, age_s=9000)
    monkeypatch.setattr(node_cache.fcntl, "flock", no_locks)
    with hold([e]):
        assert prune([cc], max_bytes=0) == [] and e.is_dir()

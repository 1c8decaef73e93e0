"""The user's code, shipped whole to the node: a `workdir:` folder (or the one `script:` file) as one tar.

The launcher lists the folder as git would ship it (every .gitignore in it honoured, through pathspec),
refuses it past the size guard, and packs it into a deterministic tar (sorted names, no owners or
times), so the same files always give the same sha256: the store keeps it once at `workdirs/<sha256>.tar`
and every seed, node and later sweep of the same code reuses it. The node runner unpacks it into the
seed's script folder, which becomes the script's working directory.

    snap = snapshot_workdir(root, entry="train_gpt.py", max_bytes=100e6, key="job.yaml: workdir")
    ship(snap, store)                     # uploads the tar unless the store has it already; stamps it as used
    archive = fetch(store, snap.key, snap.sha256, cache_dir)   # node side, cached by sha256
    unpack(archive, dest)                 # only regular files, dirs and in-tree links
    prune_shipped(store, max_bytes, keep_days, keep=[snap.key])   # after a sweep: the store's tars under a size

The store keeps the shipped tars (these and offline.py's) under cluster.store_code_gb, least recently used out
first (store_lru.py): the launcher stamps a tar's use when it ships it, the first node when a sweep starts. A tar
used within store_code_keep_days stays even over the bound, since a sweep queued on a busy cluster may start days
after its launch; a node whose tar is gone anyway fails with one sentence (ShippedCodeMissing).
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import tarfile
import tempfile
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import pathspec

from orchestrator.config import ConfigError
from orchestrator.store import StoreError, sha256_file
from orchestrator.store_lru import last_uses, mark_used, prune

log = logging.getLogger(__name__)

PREFIX = "workdirs"
OFFLINE_PREFIX = "offline"   # the store folder of the offline caches' tars (offline.py)
DAY_S = 86400
# Never shipped, .gitignore or not: git's own folder, the shards (the node links its staged ones there),
# and bytecode that the node's Python writes for itself.
ALWAYS_SKIPPED = [".git/", "/data/fineweb10B", "__pycache__/"]
_ALWAYS = pathspec.GitIgnoreSpec.from_lines(ALWAYS_SKIPPED)


@dataclass(frozen=True)
class Snapshot:
    """A folder's files as they would be shipped, and the sha256 of the tar they make."""

    root: str
    entry: str                                           # the script, relative to root
    files: list[str] = field(default_factory=list)       # relative posix paths, sorted
    links: dict[str, str] = field(default_factory=dict)  # in-tree symlinks kept as links: path -> target
    bytes: int = 0
    sha256: str = ""
    prefix: str = PREFIX                                 # the store folder of such tars

    @property
    def key(self) -> str:
        return f"{self.prefix}/{self.sha256}.tar"

    def summary(self) -> dict:
        """What the plan carries (the node needs only key and sha256; file lists stay on the launcher, so a
        big checkout does not bloat a plan that travels in an environment variable)."""
        return {"root": self.root, "entry": self.entry, "files": len(self.files) + len(self.links),
                "bytes": self.bytes, "sha256": self.sha256, "key": self.key}


# ------------------------------------------------------------------------------------ listing


def _ignored(specs: list[tuple[str, pathspec.PathSpec]], rel: str, is_dir: bool) -> bool:
    """git's verdict on rel: the deepest .gitignore with a matching pattern decides (later lines win)."""
    if _ALWAYS.check_file(rel + "/" if is_dir else rel).include:
        return True
    verdict = False
    for base, spec in specs:
        if base and not rel.startswith(base + "/"):
            continue
        sub = rel[len(base) + 1:] if base else rel
        res = spec.check_file(sub + "/" if is_dir else sub)
        if res.include is not None:
            verdict = res.include
    return verdict


def _read_gitignore(path: Path, key: str) -> pathspec.PathSpec:
    try:
        return pathspec.GitIgnoreSpec.from_lines(path.read_text(errors="replace").splitlines())
    except OSError as e:
        raise ConfigError(f"{key}: {path} cannot be read ({e.strerror}); fix its permissions") from None


def list_files(root: Path, key: str) -> tuple[list[str], dict[str, str]]:
    """(files, in-tree links) of root that git would ship: .gitignore files at every level honoured.
    A link to a file outside root is shipped as that file's content; a link to a folder is not followed."""
    root = root.resolve()
    specs: list[tuple[str, pathspec.PathSpec]] = []
    files: list[str] = []
    links: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, onerror=lambda e: _unreadable(e, key)):
        here = Path(dirpath)
        base = here.relative_to(root).as_posix()
        base = "" if base == "." else base
        if (here / ".gitignore").is_file():
            specs.append((base, _read_gitignore(here / ".gitignore", key)))
        keep = []
        for d in sorted(dirnames):
            rel = f"{base}/{d}" if base else d
            if _ignored(specs, rel, is_dir=True):
                continue
            if (here / d).is_symlink():
                if _inside(root, here / d):
                    links[rel] = _relative_target(here / d, here)
                else:
                    log.warning("%s: not shipped: a link to the folder %s outside the workdir", rel,
                                os.readlink(here / d))
                continue
            keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            rel = f"{base}/{f}" if base else f
            p = here / f
            if _ignored(specs, rel, is_dir=False):
                continue
            if p.is_symlink() and _inside(root, p) and p.exists():
                links[rel] = _relative_target(p, here)
                continue
            if not os.access(p, os.R_OK) or not p.is_file():
                why = "a broken link" if p.is_symlink() and not p.exists() else "not a readable file"
                raise ConfigError(f"{key}: {p} is {why}; fix it or add it to {root}/.gitignore")
            files.append(rel)
    return sorted(files), links


def _inside(root: Path, p: Path) -> bool:
    return p.resolve().is_relative_to(root)


def _relative_target(link: Path, here: Path) -> str:
    """An in-tree link's target relative to its folder: an absolute one would point nowhere on the node."""
    return Path(os.path.relpath(link.resolve(), here)).as_posix()


def _unreadable(e: OSError, key: str) -> None:
    raise ConfigError(f"{key}: {e.filename} cannot be read ({e.strerror}); fix its permissions or add it to .gitignore")


# ------------------------------------------------------------------------------------ packing


def _pack(root: Path, files: list[str], links: dict[str, str], fileobj) -> None:
    """A tar that depends only on names, contents, exec bits and link targets (sorted, no owners, no times)."""
    with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for rel in sorted([*files, *links]):
            info = tarfile.TarInfo(rel)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if rel in links:
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, links[rel], 0o777
                tar.addfile(info)
                continue
            p = root / rel
            with open(p, "rb") as fh:
                info.size = os.fstat(fh.fileno()).st_size
                info.mode = 0o755 if os.access(p, os.X_OK) else 0o644
                tar.addfile(info, fh)


class _Hasher(io.RawIOBase):
    """A write-only stream that keeps the sha256 of what is written: the tar's digest without the tar."""

    def __init__(self):
        self.h = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.h.update(b)
        return len(b)


def snapshot_workdir(root: str | os.PathLike, entry: str, max_bytes: float, key: str,
                     listing: tuple[list[str], dict[str, str]] | None = None, prefix: str = PREFIX) -> Snapshot:
    """The files that would be shipped and their tar's sha256; reads, creates nothing. `listing`: ship these
    (files, links) of root instead of what list_files finds (the one-file `script:` shorthand, the offline
    cache). ConfigError past max_bytes, on an unreadable file, or when the entry script is not shipped."""
    root = Path(root).resolve()
    files, links = listing if listing is not None else list_files(root, key)
    for rel in files:
        if not os.access(root / rel, os.R_OK):
            raise ConfigError(f"{key}: {root / rel} cannot be read; fix its permissions")
    if entry not in files and entry not in links:
        raise ConfigError(f"{key}: the entry script {entry} is not shipped from {root} (is it in a .gitignore?); "
                          "remove it from .gitignore or name another script")
    sizes = {rel: (root / rel).stat().st_size for rel in files}
    total = sum(sizes.values())
    if total > max_bytes:
        big = max(sizes, key=sizes.get)
        raise ConfigError(f"{key}: {root} ships {total / 1e6:.1f} MB (largest: {big}, {sizes[big] / 1e6:.1f} MB), "
                          f"more than workdir_max_mb: {max_bytes / 1e6:g}; add what the script does not need to "
                          ".gitignore or raise workdir_max_mb")
    sink = _Hasher()
    try:
        _pack(root, files, links, sink)
    except OSError as e:
        raise ConfigError(f"{key}: {e.filename or root} cannot be read ({e.strerror}); fix it or add it to "
                          ".gitignore") from None
    return Snapshot(str(root), entry, files, links, total, sink.h.hexdigest(), prefix)


def ship(snap: Snapshot, store) -> bool:
    """Put the snapshot's tar in the store unless it is there already; True when it was uploaded. Either way the
    tar is stamped as used (a launch of the same code again is a use)."""
    if store.exists(snap.key):
        mark_used(store, snap.key)
        return False
    with tempfile.TemporaryDirectory(prefix=".speedrun-workdir-") as tmp:
        archive = Path(tmp) / "workdir.tar"
        with open(archive, "wb") as fh:
            _pack(Path(snap.root), snap.files, snap.links, fh)
        digest = sha256_file(archive)
        if digest != snap.sha256:
            raise ConfigError(f"workdir: {snap.root} changed while it was being shipped; launch again")
        store.put_file(archive, snap.key, sha256=digest)
    log.info("workdir %s shipped to %s (%d files)", snap.root, store.url(snap.key), len(snap.files))
    mark_used(store, snap.key)
    return True


def ship_code(plan, store) -> None:
    """Everything a plan ships to its nodes (its workdir, its offline caches) into the store, once; the
    folders are listed again and must still be what the plan names."""
    from orchestrator.plan import snapshot_code, snapshot_offline

    for planned, snap in ((plan.workdir, snapshot_code(plan.job, plan.job_file)),
                          (plan.offline, snapshot_offline(plan.job, plan.job_file))):
        if snap is None:
            continue
        if snap.sha256 != planned.get("sha256"):
            raise ConfigError(f"{plan.job_file}: {snap.root} changed since the plan was made; launch again")
        ship(snap, store)


def prune_shipped(store, max_bytes: int, keep_days: float, keep: Collection[str],
                  now: float | None = None) -> list[str]:
    """Remove the least recently used shipped tars (workdirs/ and offline/, each with its stamp) until the rest fit
    in max_bytes; never those in keep (this sweep's), nor any used within keep_days. A tar without a stamp (shipped
    before stamps) counts from its upload. Returns the removed keys, oldest first."""
    now = time.time() if now is None else now
    tars = last_uses(store, [f"{PREFIX}/", f"{OFFLINE_PREFIX}/"], by_modified=True)
    return prune(store, tars, max_bytes, keep=keep, young_since=now - keep_days * DAY_S)


def unpack(archive: str | os.PathLike, dest: str | os.PathLike) -> list[str]:
    """Unpack a shipped tar into dest (files already there are replaced); returns the names unpacked."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for m in members:
            if not (m.isfile() or m.isdir() or m.issym()) or Path(m.name).is_absolute() or ".." in Path(m.name).parts:
                raise RuntimeError(f"{archive}: {m.name!r} is not a file inside the folder; not unpacking it")
            target = dest / m.name
            if target.is_symlink() or (target.exists() and not target.is_dir()):
                target.unlink()  # a replaced file or link, e.g. from an earlier attempt of the seed
        # the "data" filter (Python >= 3.11.4) also refuses links that point outside dest
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **kwargs)
    return [m.name for m in members if not m.isdir()]


def cached_tar(cache_dir: Path, sha256: str) -> Path:
    """Where this node keeps a shipped tar (node_cache.py bounds the folder)."""
    return cache_dir / f"{sha256}.tar"


class ShippedCodeMissing(RuntimeError):
    """A shipped tar the plan names is no longer in the store; the message says why and what to do."""


def _download(store, key: str, dest: Path) -> None:
    try:
        store.get_file(key, dest)
    except StoreError:
        if store.stat(key) is not None:
            raise
        raise ShippedCodeMissing(f"{store.url(key)} is no longer in the store: it was pruned, unused for more than "
                                 "store_code_keep_days days while the store's shipped code was over store_code_gb, "
                                 "or deleted; launch the sweep again") from None


def fetch(store, key: str, sha256: str, cache_dir: Path) -> Path:
    """A shipped tar on this node: cached by sha256 under cache_dir, downloaded once and checked."""
    local = cached_tar(cache_dir, sha256)
    if local.is_file():
        return local
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkstemp(dir=cache_dir, prefix=".part-")[1])
    try:
        _download(store, key, tmp)
        got = sha256_file(tmp)
        if got != sha256:
            raise RuntimeError(f"{store.url(key)}: sha256 {got[:12]}... is not the {sha256[:12]}... the "
                               "plan names; delete the object and launch again")
        os.replace(tmp, local)
    finally:
        tmp.unlink(missing_ok=True)
    return local


def prepare_script_dir(store, shipped: dict, rundir: Path, data_dir: Path, make_dirs: list[str],
                       cache_dir: Path) -> list[str]:
    """The script's working directory on the node: the shipped folder unpacked (from this node's cache of the
    store's tar), data/fineweb10B linked to the staged shards, where records read them (DATA_PATH names
    rundir), and the folders the script writes to made. Returns the shipped names (not uploaded per seed)."""
    names = unpack(fetch(store, shipped["key"], shipped["sha256"], cache_dir), rundir)
    link = rundir / "data" / "fineweb10B"
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.is_file():
        link.unlink()
    if not link.exists():
        link.symlink_to(Path(data_dir).absolute(), target_is_directory=True)
    for d in make_dirs:
        (rundir / d).mkdir(parents=True, exist_ok=True)
    return names

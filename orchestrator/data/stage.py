"""Stage shards from a source to a node-local directory: parallel, verified, resumable, locked.

Each shard is fetched into `.NAME.partial` in ranged parts (several files and several parts at once),
hashed in order while the parts land, fsynced, verified (header, size, sha256 when known) and renamed.
`.NAME.partial.json` remembers which parts are done, so a killed stage resumes where it stopped.
`.speedrun-shards.json` records every staged shard (source, size, sha256, mtime), which makes a repeated
stage a no-op without re-reading the files, and gives later stages the digest to check against.
Per-shard file locks keep two stages on one node from fetching the same shard twice.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock
from rich.filesize import decimal
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from orchestrator.data.parts import InOrderDigest, OrderedPool, PartWriter
from orchestrator.data.shards import DataError, parse_shard_name, shard_name, verify_shard
from orchestrator.data.sources import Remote, Source, SyntheticSource, TransferError, open_source

log = logging.getLogger(__name__)
STATE_FILE = ".speedrun-shards.json"
LOCK_DIR = ".locks"
FILES_AT_ONCE = 8
MIN_PART = 32 << 20
PART_ATTEMPTS = 4


@dataclass
class StageResult:
    dest: Path
    train_files: list[Path]
    val_files: list[Path]
    bytes_fetched: int
    seconds: float
    info: dict = field(default_factory=dict)


class _Aborted(Exception):
    """Another shard failed or the user interrupted: this transfer stops at its next write."""


class _Corrupt(Exception):
    """A fetched shard failed verification; it is fetched again once."""


# ---------------------------------------------------------------------------------- state file


class StageState:
    """The sidecar `.speedrun-shards.json`: what was staged, from where, with which digest."""

    def __init__(self, dest: Path):
        self.path = dest / STATE_FILE
        self.lock = FileLock(str(self.path) + ".lock")

    def load(self) -> dict[str, dict]:
        try:
            return json.loads(self.path.read_text()).get("shards", {})
        except FileNotFoundError:
            return {}
        except (json.JSONDecodeError, AttributeError):
            log.warning("%s is unreadable; every shard will be verified again", self.path)
            return {}

    def record(self, name: str, entry: dict | None) -> None:
        """Add or replace the record of `name`; None forgets it."""
        with self.lock:
            shards = self.load()
            if entry is None:
                shards.pop(name, None)
            else:
                shards[name] = entry
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps({"version": 1, "shards": shards}, indent=1, sort_keys=True))
            os.replace(tmp, self.path)

    def staged(self, name: str, source: str, expected_sha256: str | None = None) -> dict | None:
        """The record of `name` when the file on disk is still exactly what this source staged."""
        rec = self.load().get(name)
        if not rec or rec.get("source") != source:
            return None
        try:
            st = (self.path.parent / name).stat()
        except FileNotFoundError:
            return None
        if st.st_size != rec["size"] or st.st_mtime_ns != rec["mtime_ns"]:
            return None
        if expected_sha256 and rec.get("sha256") != expected_sha256:
            return None
        return rec


# ------------------------------------------------------------------------------------ staging


def wanted_names(src: Source, train_shards: int | None, val_shards: int) -> list[str]:
    """Train shards 1..N (all the source has when N is None) and val shards 0..V-1, in that order."""
    if train_shards is not None and train_shards < 1 or val_shards < 0:
        raise DataError(f"train_shards must be >= 1 and val_shards >= 0 (got {train_shards}, {val_shards})")
    if train_shards is None:
        train = [n for n in src.available() if parse_shard_name(n)[0] == "train"]
        if not train:
            raise DataError(f"{src.description}: no fineweb_train_*.bin shards found; check the source")
    else:
        train = [shard_name("train", i) for i in range(1, train_shards + 1)]
    return train + [shard_name("val", i) for i in range(val_shards)]


def unprovided_shards(source: str, train_shards: int | None, val_shards: int) -> tuple[list[str], str] | None:
    """(the wanted shards the source lacks, the fix) where that is known without downloading anything: the
    synthetic generator (its URL says what it makes) and a directory on this machine; None for the others."""
    scheme = source.split("://", 1)[0].lower() if "://" in source else "file"
    if scheme == "file" and not Path(source.removeprefix("file://")).expanduser().is_dir():
        return None  # a path on the nodes, not here: the node runner checks it there
    if scheme not in ("file", "synthetic"):
        return None
    src = open_source(source)
    have = set(src.available())
    lacking = [n for n in wanted_names(src, train_shards, val_shards) if n not in have]
    fix = ("raise train_shards/val_shards in the synthetic:// URL or lower data.train_shards/data.val_shards"
           if scheme == "synthetic" else "add the shards to the folder or lower data.train_shards/data.val_shards")
    return lacking, fix


def stage_shards(source: str | Source, dest: str | os.PathLike, train_shards: int | None = None,
                 val_shards: int = 1, progress: bool = True, console=None, workers: int = 16,
                 part_size: int | None = None) -> StageResult:
    """Make `dest` hold verified copies of the wanted shards; fetch only what is missing or damaged."""
    t0 = time.perf_counter()
    src = open_source(source) if isinstance(source, str) else source
    dest = Path(dest).expanduser()
    names = wanted_names(src, train_shards, val_shards)
    state = StageState(dest)
    todo = [n for n in names if not state.staged(n, src.description)]
    remotes = []
    if todo:
        with ThreadPoolExecutor(8) as pool:
            remotes = list(pool.map(src.describe, todo))
        _check_free_space(dest, remotes)
        try:
            dest.mkdir(parents=True, exist_ok=True)
            (dest / LOCK_DIR).mkdir(exist_ok=True)
        except OSError as e:
            raise DataError(f"{dest}: cannot create the data directory ({e.strerror}); choose a writable --dest") from None
    fetched = _Transfer(src, dest, state, workers, part_size).run(remotes, progress, console)
    _remove_foreign_shards(dest, state, src.description, names)
    files = [dest / n for n in names]
    result = StageResult(dest=dest, train_files=[f for f in files if "_train_" in f.name],
                         val_files=[f for f in files if "_val_" in f.name], bytes_fetched=fetched,
                         seconds=time.perf_counter() - t0, info={"source": src.description, **src.info()})
    log.info("staged %d shards in %s (%d bytes fetched, %.1fs)", len(names), dest, fetched, result.seconds)
    return result


def _remove_foreign_shards(dest: Path, state: StageState, source: str, names: list[str]) -> None:
    """Shards an earlier stage brought from ANOTHER source would be read by the trainer's glob next to
    these ones and silently mix two datasets; they are ours to remove (shards we did not stage stay)."""
    for name, rec in state.load().items():
        if name not in names and rec.get("source") != source:
            if str(rec.get("source", "")).startswith("prepare:"):  # hours of tokenizing: never delete
                log.warning("%s: %s was prepared here from other documents; the trainer will read it too",
                            dest, name)
                continue
            log.warning("%s: removing %s, staged earlier from %s", dest, name, rec.get("source"))
            (dest / name).unlink(missing_ok=True)
            state.record(name, None)


def _check_free_space(dest: Path, remotes: list[Remote]) -> None:
    need = 0
    for r in remotes:
        partial = dest / f".{r.name}.partial"
        need += r.size if not partial.exists() else max(0, r.size - partial.stat().st_blocks * 512)
    probe = dest
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise DataError(f"{dest}: not enough free disk space: {len(remotes)} shards need {decimal(need)} but "
                        f"{decimal(free)} are free; free some space or stage to another directory")


class _Transfer:
    def __init__(self, src: Source, dest: Path, state: StageState, workers: int, part_size: int | None):
        self.src, self.dest, self.state = src, dest, state
        self.workers, self.part_size = workers, part_size
        self.files_in_flight = 1
        self.abort = threading.Event()
        self.disk_full = False
        self.bytes = 0
        self._count_lock = threading.Lock()

    def run(self, remotes: list[Remote], progress: bool, console) -> int:
        if not remotes:
            return 0
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        bar = Progress(TextColumn("staging {task.description}"), BarColumn(), DownloadColumn(),
                       TransferSpeedColumn(), TimeRemainingColumn(), console=console, disable=not progress)
        self.order = {r.name: i for i, r in enumerate(remotes)}
        with bar, OrderedPool(self.workers) as self.parts, ThreadPoolExecutor(FILES_AT_ONCE) as files:
            self.task = bar.add_task(f"{len(remotes)} shards", total=sum(r.size for r in remotes))
            self.bar = bar
            self.files_in_flight = len(remotes)
            futures = [files.submit(self._stage_one, r) for r in remotes]
            try:
                wait(futures, return_when=FIRST_EXCEPTION)
                if any(f.done() and f.exception() for f in futures):
                    self.abort.set()
                    wait(futures)
                    errors = [f.exception() for f in futures if not f.cancelled() and f.exception()]
                    raise next((e for e in errors if not isinstance(e, _Aborted)), errors[0])
            except BaseException:  # a failed shard or Ctrl-C: stop the other transfers now, not when they end
                self.abort.set()
                for g in futures:
                    g.cancel()
                raise
        return self.bytes

    def _advance(self, n: int) -> None:
        if self.abort.is_set():
            raise _Aborted()
        with self._count_lock:
            self.bytes += n
        self.bar.advance(self.task, n)

    def _stage_one(self, remote: Remote) -> None:
        with FileLock(str(self.dest / LOCK_DIR / f"{remote.name}.lock")):
            if self.state.staged(remote.name, self.src.description, remote.sha256):
                self.bar.advance(self.task, remote.size)  # another stage on this node fetched it meanwhile
                return
            # a digest from an earlier stage of the same source still guards a re-fetch
            earlier = (self.state.load().get(remote.name) or {})
            expected = remote.sha256 or (earlier.get("sha256") if earlier.get("source") == self.src.description
                                         and earlier.get("size") == remote.size else None)
            try:
                self._fetch_twice(remote, expected)
            except _Aborted:
                if self.disk_full:  # a partial file would hold on to the space the user must free
                    self._discard(remote)
                raise
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                self.disk_full = True
                self.abort.set()
                self._discard(remote)
                raise DataError(f"{remote.name}: the disk under {self.dest} is full; free space or stage "
                                "to another directory") from None

    def _fetch_twice(self, remote: Remote, expected: str | None) -> None:
        """A shard that fails verification is fetched once more from scratch, then it is an error."""
        try:
            self._fetch_verified(remote, expected)
        except _Corrupt as first:
            log.warning("%s failed verification (%s); fetching it again", remote.name, first)
            self._discard(remote)
            try:
                self._fetch_verified(remote, expected, fresh=True)
            except _Corrupt as second:
                self._discard(remote)
                raise DataError(f"{remote.name}: fetched twice from {self.src.description} and still {second}; "
                                "the source copy is damaged") from None

    def _discard(self, remote: Remote) -> None:
        for p in (self.dest / f".{remote.name}.partial", self.dest / f".{remote.name}.partial.json"):
            p.unlink(missing_ok=True)

    def _fetch_verified(self, remote: Remote, expected: str | None, fresh: bool = False) -> None:
        partial = self.dest / f".{remote.name}.partial"
        if isinstance(self.src, SyntheticSource):
            digest = self.src.generate_into(remote.name, partial)
            self._advance(remote.size)
        else:
            digest = self._fetch_parts(remote, partial, fresh)
        try:
            info = verify_shard(partial, name=remote.name)
        except DataError as e:
            raise _Corrupt(str(e).split(": ", 1)[1]) from None
        if expected and digest != expected:
            raise _Corrupt(f"corrupted: sha256 {digest[:12]}… does not match the expected {expected[:12]}…")
        target = self.dest / remote.name
        os.replace(partial, target)
        _fsync_dir(self.dest)
        (self.dest / f".{remote.name}.partial.json").unlink(missing_ok=True)
        st = target.stat()
        self.state.record(remote.name, {"source": self.src.description, "size": st.st_size, "sha256": digest,
                                        "tokens": info.tokens, "mtime_ns": st.st_mtime_ns, "staged_at": time.time()})

    def _part_step(self, remote: Remote, old_meta: dict | None) -> int:
        """Bytes per ranged part: a resumed file keeps its parts; otherwise enough parts to keep every
        worker busy, and no more (part 0 is hashed as it streams in; later parts are read back to hash)."""
        if not self.src.ranged:
            return max(remote.size, 1)
        if old_meta:
            return old_meta["part_size"]
        if self.part_size:
            return self.part_size
        streams = max(1, self.workers // max(1, min(self.files_in_flight, FILES_AT_ONCE)))
        return max(MIN_PART, -(-remote.size // streams))

    def _fetch_parts(self, remote: Remote, partial: Path, fresh: bool) -> str:
        meta_path = self.dest / f".{remote.name}.partial.json"
        old = None
        if not fresh and meta_path.exists() and partial.exists():
            old = json.loads(meta_path.read_text())
            if old.get("source") != self.src.description or old.get("size") != remote.size:
                old = None
        step = self._part_step(remote, old)
        parts = [(i, start, min(step, remote.size - start)) for i, start in enumerate(range(0, remote.size, step))]
        meta = {"source": self.src.description, "size": remote.size, "part_size": step,
                "done": list(old["done"]) if old else []}
        done = set(meta["done"])
        if done:
            log.info("%s: resuming, %d of %d parts already here", remote.name, len(done), len(parts))
            self.bar.advance(self.task, sum(n for i, _, n in parts if i in done))
        fd = os.open(partial, os.O_RDWR | os.O_CREAT | (0 if done else os.O_TRUNC), 0o644)
        try:
            if not done and remote.size:
                os.posix_fallocate(fd, 0, remote.size)  # ENOSPC now rather than half-way
            digest = InOrderDigest(fd, parts, done)
            meta_lock = threading.Lock()

            def part(i: int, start: int, length: int) -> None:
                if self.abort.is_set():
                    raise _Aborted()
                self._fetch_range(remote, start, length, PartWriter(fd, digest, self._advance))
                with meta_lock:
                    meta["done"].append(i)
                    tmp = meta_path.with_suffix(".tmp")
                    tmp.write_text(json.dumps(meta))
                    os.replace(tmp, meta_path)
                digest.part_done(i)

            order = self.order[remote.name]
            futures = [self.parts.submit((order, p[0]), part, *p) for p in parts if p[0] not in done]
            wait(futures, return_when=FIRST_EXCEPTION)
            for f in futures:
                if f.done() and f.exception():
                    self.abort.set()  # a failed part fails the stage: every transfer stops
                    for g in futures:
                        g.cancel()
                    wait(futures)  # no thread may write to fd once it is closed
                    raise f.exception()
            os.fsync(fd)
            return digest.finish()
        finally:
            os.close(fd)

    def _fetch_range(self, remote: Remote, start: int, length: int, writer: PartWriter) -> None:
        @retry(retry=retry_if_exception_type(TransferError), stop=stop_after_attempt(PART_ATTEMPTS),
               wait=wait_exponential(multiplier=0.2, max=3), reraise=True)
        def attempt() -> None:
            if self.abort.is_set():
                raise _Aborted()
            writer.restart(start)  # a retried part starts over; the bar gives back what it had counted
            self.src.fetch_range(remote, start, length, writer)

        try:
            attempt()
        except TransferError as e:
            raise DataError(f"{remote.name}: transfer failed {PART_ATTEMPTS} times ({e}); check the source") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

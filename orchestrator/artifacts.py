"""A seed's artifacts reach the store, and nothing is lost.

API for the node runner (prefix = f"{sweep_id}/seed-{n}"):

    uploader = SeedUploader(store, spool_dir, console=None)           # spool_dir: node-local, same FS as work dir
    manifest = uploader.upload_seed(local_dir, prefix, keep_last_ckpt=2, state="succeeded")
        # -> Manifest (.prefix, .files[ManifestEntry(key, size, sha256)], .state, .total_bytes);
        # raises UploadIncomplete (files wait in the spool) or UploadConflict; both are StoreError.
        # write_manifest=False uploads without committing (a later call with True commits; unchanged
        # objects are not sent again).
    report = collect(store, spool_dir, sweep_id=None)                  # -> CollectReport (`speedrun collect RUN`)
    read_manifest(store, prefix) -> Manifest | None                    # None: the seed is incomplete

(The growing train.log goes up during the run through `log_sync.LogSync`; secrets: `redaction`.)

upload_seed first snapshots the seed into `spool_dir/<entry>/files` (hard links; text files are copied
through `redact_bytes`) and writes `pending.json`; then uploads every file concurrently (big ones multipart),
checks each against its sha256, writes `<prefix>/manifest.json` LAST (the commit marker), drops
checkpoints beyond the newest keep_last_ckpt from the store, and deletes the spool entry. Whatever fails
stays in the spool with its record, and `collect` finishes it later, idempotently: objects already
present with the right hash are skipped, a committed seed is never overwritten with different content
(UploadConflict), except that a newer attempt replaces a seed committed with a state other than "succeeded".
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

from orchestrator.redaction import redact_bytes
from orchestrator.store import PARTIAL_SUFFIX, Store, StoreError, sha256_file, validate_key
from orchestrator.sweep import MANIFEST, seed_done

log = logging.getLogger(__name__)

PENDING = "pending.json"
SKIP_NAMES = {MANIFEST, "CHECKPOINT_NOW"}
TEXT_SUFFIXES = {".log", ".txt", ".json", ".jsonl", ".yaml", ".yml", ".csv", ".out", ".err"}
TEXT_REDACT_LIMIT = 256 << 20  # larger "text" files are linked as they are


class UploadIncomplete(StoreError):
    """Some files could not be uploaded; they wait in the spool for `speedrun collect`."""


class UploadConflict(StoreError):
    """The store already holds a committed seed at this prefix with different content."""


# ----------------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class ManifestEntry:
    key: str  # relative to the seed prefix, e.g. "ckpt/final.pt"
    size: int
    sha256: str


@dataclass
class Manifest:
    prefix: str
    files: list[ManifestEntry]
    created_at: float = field(default_factory=time.time)
    state: str | None = None  # the node runner's verdict on the seed, e.g. "succeeded" or "failed"
    format: int = 1

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def content(self) -> set[tuple[str, int, str]]:
        return {(f.key, f.size, f.sha256) for f in self.files}

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "Manifest":
        try:
            d = json.loads(data)
            return cls(prefix=d["prefix"], files=[ManifestEntry(**f) for f in d["files"]],
                       created_at=d["created_at"], state=d.get("state"), format=d["format"])
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(f"{where}: malformed manifest ({type(e).__name__}: {e}); delete it and run speedrun collect") from None


def read_manifest(store: Store, prefix: str) -> Manifest | None:
    """The committed manifest of a seed, or None when the seed is incomplete (no manifest yet)."""
    key = f"{validate_key(prefix)}/{MANIFEST}"
    if not store.exists(key):
        return None
    return Manifest.from_json(store.get_bytes(key), store.url(key))


def verify_manifest(store: Store, manifest: Manifest) -> list[str]:
    """Keys (relative) whose object is missing or differs in size or sha256 from the manifest."""
    bad = []
    for f in manifest.files:
        key = f"{manifest.prefix}/{f.key}"
        info = store.stat(key)
        if info is None or info.size != f.size or store.sha256(key) != f.sha256:
            bad.append(f.key)
    return bad


# -------------------------------------------------------------------------------- checkpoints


def _ckpt_order(key: str) -> tuple:
    """Oldest first: step_NNNNNN.pt by step, then final.pt."""
    name = key.rsplit("/", 1)[-1]
    m = re.search(r"(\d+)", name)
    return (name.startswith("final"), int(m.group(1)) if m else -1, name)


def newest_checkpoints(keys: list[str], keep: int | None) -> set[str]:
    ckpts = sorted((k for k in keys if k.startswith("ckpt/")), key=_ckpt_order)
    return set(ckpts if keep is None else ckpts[len(ckpts) - keep:] if keep > 0 else [])


# ----------------------------------------------------------------------------------- uploading


def _entry_name(prefix: str) -> str:
    return prefix.replace("/", "__")


class SeedUploader:
    def __init__(self, store: Store, spool_dir: str | os.PathLike, max_workers: int = 8, console=None):
        self.store, self.spool = store, Path(spool_dir)
        self.max_workers, self.console = max_workers, console

    def upload_seed(self, local_dir: str | os.PathLike, prefix: str, keep_last_ckpt: int | None = None,
                    state: str | None = None, write_manifest: bool = True,
                    closing: Callable[[float], dict[str, bytes]] | None = None, skip: Collection[str] = ()) -> Manifest:
        """Upload a finished seed's directory to `prefix`; see the module docstring.

        closing(upload_s) returns small files (the node runner's timings.json, which states the upload
        time) that join the same pass after every other file is up, just before the manifest. skip: files
        (relative to local_dir) left out, e.g. the shipped workdir, which the store holds once already."""
        entry = self._snapshot(Path(local_dir), validate_key(prefix.strip("/")), keep_last_ckpt,
                               {"state": state, "write_manifest": write_manifest}, frozenset(skip))
        return self.finish(entry, closing)

    def _snapshot(self, local_dir: Path, prefix: str, keep: int | None, extra: dict,
                  skip: frozenset[str] = frozenset()) -> Path:
        if not local_dir.is_dir():
            raise StoreError(f"{local_dir}: the seed directory does not exist; nothing to upload for {prefix}")
        found: dict[str, Path] = {}
        for path in sorted(local_dir.rglob("*")):
            rel = path.relative_to(local_dir).as_posix()
            if path.is_file() and rel not in SKIP_NAMES and rel not in skip and not rel.endswith(PARTIAL_SUFFIX):
                found[validate_key(rel)] = path
        ckpts = newest_checkpoints(list(found), keep)
        chosen = {k: p for k, p in found.items() if not k.startswith("ckpt/") or k in ckpts}

        entry = self.spool / _entry_name(prefix)
        if (entry / PENDING).exists():  # an older attempt of the same seed: this snapshot replaces it
            log.info("replacing the spooled upload of %s", prefix)
        shutil.rmtree(entry, ignore_errors=True)
        files = entry / "files"
        for key, src in chosen.items():
            dest = files / key
            dest.parent.mkdir(parents=True, exist_ok=True)
            if src.suffix in TEXT_SUFFIXES and src.stat().st_size <= TEXT_REDACT_LIMIT:
                dest.write_bytes(redact_bytes(src.read_bytes()))
            else:
                try:
                    os.link(src, dest)  # free on one filesystem, and a snapshot if the trainer replaces the file
                except OSError:
                    shutil.copy2(src, dest)
        record = {"format": 1, "store": self.store.root_url, "prefix": prefix, "keep_last_ckpt": keep,
                  "files": sorted(chosen), "created_at": time.time(), **extra}
        tmp = entry / (PENDING + PARTIAL_SUFFIX)
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, entry / PENDING)  # the entry counts only once its record is complete
        return entry

    def finish(self, entry: Path, closing: Callable[[float], dict[str, bytes]] | None = None) -> Manifest:
        """Upload a spool entry, write its manifest, prune checkpoints, drop the entry. Idempotent."""
        record = json.loads((entry / PENDING).read_text())
        try:
            return self._finish(entry, record, closing)
        except (UploadIncomplete, UploadConflict):
            raise
        except StoreError as e:  # the store is unreachable or refusing: the entry stays for collect
            raise UploadIncomplete(f"{e}; the seed waits in {entry}; "
                                   f"run `speedrun collect {record['prefix'].split('/')[0]}` later") from e

    def _finish(self, entry: Path, record: dict, closing: Callable[[float], dict[str, bytes]] | None = None) -> Manifest:
        started = time.monotonic()
        prefix, keys = record["prefix"], record["files"]
        files = entry / "files"
        done = read_manifest(self.store, prefix)
        if done is not None and not seed_done(True, done.state) and record["created_at"] > done.created_at:
            # A newer attempt of a seed committed as failed: un-commit first, so that no manifest ever
            # lists objects that no longer match it, then upload as usual.
            log.warning("%s was committed as %s; replacing it with a newer attempt", self.store.url(prefix), done.state)
            self.store.delete(f"{prefix}/{MANIFEST}")
            done = None
        if done is not None:
            mine = {(k, (files / k).stat().st_size, sha256_file(files / k)) for k in keys}
            if done.content() != mine:
                raise UploadConflict(f"{self.store.url(prefix)}: already committed with different content; nothing was "
                                     f"overwritten and {entry} stays; upload under a new sweep id or delete that seed")
            shutil.rmtree(entry)
            return done
        self.store.abort_partial(prefix + "/")
        # One listing instead of a HEAD per file: only objects whose size already matches are hash-checked.
        present = {o.key: o.size for o in self.store.list(prefix + "/")}

        results: list[ManifestEntry] = []
        failures: list[str] = []
        total = sum((files / k).stat().st_size for k in keys)
        with self._progress(prefix, total) as advance, ThreadPoolExecutor(self.max_workers) as pool:
            futures = {pool.submit(self._upload_one, files / k, f"{prefix}/{k}", present): k for k in keys}
            for fut in as_completed(futures):
                key = futures[fut]
                if fut.cancelled():
                    failures.append(key)
                    continue
                try:
                    size, digest = fut.result()
                    results.append(ManifestEntry(key, size, digest))
                    advance(size)
                except (StoreError, OSError) as e:
                    if not failures:
                        log.warning("%s", e)
                        # One file outlasted the whole retry budget: the rest would too, one budget per
                        # worker round. They wait in the spool instead.
                        for other in futures:
                            other.cancel()
                    failures.append(key)
        if failures:
            raise UploadIncomplete(f"{self.store.url(prefix)}: {len(failures)} of {len(keys)} files were not uploaded "
                                   f"(first: {sorted(failures)[0]}); they wait in {entry}; run `speedrun collect {prefix.split('/')[0]}` later")
        if closing is not None:
            results += self._upload_closing(entry, record, closing(time.monotonic() - started), present)
        manifest = Manifest(prefix, sorted(results, key=lambda f: f.key), state=record.get("state"))
        if not record.get("write_manifest", True):
            shutil.rmtree(entry, ignore_errors=True)
            return manifest  # uploaded, not committed: the caller commits with a later upload_seed
        self.store.put_bytes(manifest.to_json(), f"{prefix}/{MANIFEST}")  # the commit marker, last
        self._prune_checkpoints(manifest)
        shutil.rmtree(entry, ignore_errors=True)
        log.info("uploaded %s: %d files, %.1f MB", self.store.url(prefix), len(results), manifest.total_bytes / 1e6)
        return manifest

    def _upload_closing(self, entry: Path, record: dict, extra: dict[str, bytes], present: dict[str, int]) -> list[ManifestEntry]:
        """The closing files into the spool entry (so that collect has them too), then to the store."""
        files, out = entry / "files", []
        for key, data in extra.items():
            (files / validate_key(key)).parent.mkdir(parents=True, exist_ok=True)
            (files / key).write_bytes(redact_bytes(data))
        record["files"] = sorted(set(record["files"]) | set(extra))
        tmp = entry / (PENDING + PARTIAL_SUFFIX)
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, entry / PENDING)
        for key in sorted(extra):
            size, digest = self._upload_one(files / key, f"{record['prefix']}/{key}", present)
            out.append(ManifestEntry(key, size, digest))
        return out

    def _upload_one(self, path: Path, key: str, present: dict[str, int]) -> tuple[int, str]:
        size, digest = path.stat().st_size, sha256_file(path)
        if present.get(key) == size and self.store.sha256(key) == digest:
            return size, digest  # already there from an earlier attempt
        info = self.store.put_file(path, key, sha256=digest)
        if info.size != size:  # the file changed under us: the spool snapshot must be immutable
            raise StoreError(f"{self.store.url(key)}: {path} changed while uploading; run speedrun collect again")
        return size, digest

    def _prune_checkpoints(self, manifest: Manifest) -> None:
        keep = {f"{manifest.prefix}/{f.key}" for f in manifest.files}
        try:
            for obj in self.store.list(f"{manifest.prefix}/ckpt/"):
                if obj.key not in keep:
                    self.store.delete(obj.key)
        except StoreError as e:  # the seed is committed; an old checkpoint left behind costs only space
            log.warning("could not prune old checkpoints: %s", e)

    def _progress(self, prefix: str, total: int):
        from contextlib import contextmanager

        @contextmanager
        def bar():
            if self.console is None:
                yield lambda n: None
                return
            from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

            with Progress("[bold]upload", "{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                          console=self.console, transient=True) as p:
                task = p.add_task(prefix, total=total)
                yield lambda n: p.advance(task, n)

        return bar()


# ------------------------------------------------------------------------------------- collect


@dataclass
class CollectReport:
    completed: list[str] = field(default_factory=list)  # finished from the spool now
    verified: list[str] = field(default_factory=list)  # committed, every object matches its manifest
    pending: list[str] = field(default_factory=list)  # still in the spool (store unreachable, ...)
    conflicts: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # committed, but an object is missing or differs
    incomplete: list[str] = field(default_factory=list)  # objects on the store, no manifest, nothing spooled here
    other_store: list[str] = field(default_factory=list)  # spooled for a different store URL

    @property
    def ok(self) -> bool:
        return not (self.pending or self.conflicts or self.mismatched or self.incomplete)

    def describe(self) -> str:
        """One line per outcome, in the words of `speedrun collect`."""
        lines = {
            "finished from the spool": self.completed, "complete, every hash matches": self.verified,
            "still waiting in the spool (store unreachable?); run collect again": self.pending,
            "refused: the store holds different committed content": self.conflicts,
            "DAMAGED: an object is missing or differs from its manifest": self.mismatched,
            "incomplete: no manifest and nothing spooled on this machine (collect on the node)": self.incomplete,
            "spooled for another store URL (pass --store)": self.other_store,
        }
        out = [f"{len(v)} seed(s) {k}: {', '.join(v)}" for k, v in lines.items() if v]
        return "\n".join(out) or "nothing to collect"


def _in_sweep(prefix: str, sweep_id: str | None) -> bool:
    return sweep_id is None or prefix == sweep_id or prefix.startswith(sweep_id.rstrip("/") + "/")


def collect(store: Store, spool_dir: str | os.PathLike, sweep_id: str | None = None, console=None) -> CollectReport:
    """Finish every spooled upload for `store` (of one sweep, if given), then check the sweep's seeds."""
    report = CollectReport()
    uploader = SeedUploader(store, spool_dir, console=console)
    spool = Path(spool_dir)
    entries = sorted(p.parent for p in spool.glob(f"*/{PENDING}")) if spool.is_dir() else []
    for entry in entries:
        record = json.loads((entry / PENDING).read_text())
        prefix = record["prefix"]
        if not _in_sweep(prefix, sweep_id):
            continue
        if record["store"] != store.root_url:
            report.other_store.append(prefix)
            continue
        try:
            uploader.finish(entry)
            report.completed.append(prefix)
        except UploadConflict as e:
            log.error("%s", e)
            report.conflicts.append(prefix)
        except StoreError as e:
            log.warning("%s", e)
            report.pending.append(prefix)
    if sweep_id is not None:
        seeds = sorted({"/".join(o.key.split("/")[:2]) for o in store.list(f"{validate_key(sweep_id)}/")
                        if o.key.count("/") >= 2})
        for prefix in seeds:
            manifest = read_manifest(store, prefix)
            if manifest is None:
                if prefix not in report.pending + report.conflicts:
                    report.incomplete.append(prefix)
            elif verify_manifest(store, manifest):
                report.mismatched.append(prefix)
            elif prefix not in report.completed:
                report.verified.append(prefix)
    return report


"""Raw training logs on disk (`speedrun stats logs/*.txt`, or a sweep folder downloaded from the store).

Which files are logs, each log read once, and names a reader can tell apart. A file that is not a log
(empty, compressed, binary, a README) is skipped with a note instead of showing as a run that "died
before training started"; the same content passed twice (a copy, or the path given twice) counts once.
The parsing itself is orchestrator/train_log.py.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from orchestrator.results import ResultsError, SeedLog, SeedSummary
from orchestrator.sweep import MANIFEST, seed_of_dir
from orchestrator.train_log import LogFormatError, parse_log

LOG_SUFFIXES = (".txt", ".log", ".out", ".err", "")  # torchrun/Slurm output files, and `train.log` itself
COMPRESSED = {b"\x1f\x8b": "gzip", b"\x28\xb5": "zstd", b"\xfd7": "xz", b"BZ": "bzip2", b"PK": "zip"}


@dataclass
class LogPool:
    """The runs read from log files, and what the reader should know about the files (skips, duplicates)."""

    runs: list[SeedLog] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def is_sweep_folder(path: Path) -> bool:
    """A sweep's folder as the store lays it out (plan.json, or seed-<n>/ folders holding a manifest.json)."""
    if not path.is_dir():
        return False
    return (path / "plan.json").is_file() or any(
        d.is_dir() and seed_of_dir(d.name) is not None and (d / MANIFEST).is_file() for d in path.iterdir())


def expand(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given; a folder gives its *.txt and *.log files and, for a downloaded sweep, seed-<n>/train.log."""
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            files.append(p)
            continue
        found = sorted([*p.glob("*.txt"), *p.glob("*.log")])
        seeds = [d for d in p.iterdir() if d.is_dir() and seed_of_dir(d.name) is not None and (d / "train.log").exists()]
        found += [d / "train.log" for d in sorted(seeds, key=lambda d: seed_of_dir(d.name))]
        if not found:
            raise ResultsError(f"{p}: no *.txt or *.log training logs and no seed-<n>/train.log in it; "
                               "pass log files, a folder of them, or a sweep id")
        files.extend(found)
    return files


def _not_a_log(path: Path, data: bytes) -> str | None:
    """Why this file is not a training log to read, or None when it may be one."""
    if not data:
        return "empty file"
    for magic, kind in COMPRESSED.items():
        if data.startswith(magic):
            return f"{kind}-compressed; decompress it first (e.g. gunzip) and pass the log"
    if path.suffix.lower() not in LOG_SUFFIXES:
        return f"a {path.suffix} file, not a training log (logs are .txt or .log)"
    if b"\x00" in data[:65536]:
        return "binary, not a text log"
    return None


def _names(paths: list[Path]) -> list[str]:
    """Each file's name, with as many parent folders as it takes to tell equal names apart (seed-3/train.log)."""
    depth = 1
    while True:
        names = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(names)) == len(names) or depth >= max(len(p.parts) for p in paths):
            return names
        depth += 1


def load_log_files(paths: Sequence[str | os.PathLike]) -> LogPool:
    """Every file (folders expanded) read and parsed; bad input (a missing or unreadable file, a line the
    parser cannot read) is a ResultsError naming the file."""
    files = expand(paths)
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise ResultsError(f"log file {missing[0]} does not exist or is not a file; pass training logs "
                           "(ours or modded-nanogpt's) or a sweep id")
    pool = LogPool()
    kept: list[tuple[Path, bytes]] = []
    seen: dict[str, Path] = {}
    for p in files:
        try:
            data = p.read_bytes()
        except OSError as e:
            raise ResultsError(f"log file {p}: cannot be read ({e.strerror or e}); check that it is a readable file") from None
        why = _not_a_log(p, data)
        if why:
            pool.notes.append(f"{p}: skipped: {why}")
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            first = seen[digest]
            why = "given twice" if first.resolve() == p.resolve() else f"same content as {first}"
            pool.notes.append(f"{p}: {why}; counted once")
            continue
        seen[digest] = p
        kept.append((p, data))
    results = []
    for p, data in kept:
        try:
            result = parse_log(data.decode("utf-8", errors="replace"))
        except LogFormatError as e:
            raise ResultsError(f"log file {p}, line {e.line}: {e.message}") from None
        if not (result.val_points or result.train_points or result.error or result.peak_alloc_mib):
            pool.notes.append(f"{p}: skipped: no step lines and no error in it, so not a training log")
            continue
        results.append((p, result))
    if not results:
        raise ResultsError(f"no training logs among the {len(files)} file(s) given ({'; '.join(pool.notes)[:300]}); "
                           "pass logs with step lines (ours, modded-nanogpt's or llm.c's)")
    for (p, result), name in zip(results, _names([p for p, _ in results])):
        pool.runs.append(SeedLog(SeedSummary.from_result(result, seed=None, name=name), result))
    return pool


def runs_from_logs(paths: Sequence[str | os.PathLike]) -> list[SeedLog]:
    """The runs of load_log_files, without its notes."""
    return load_log_files(paths).runs


def summaries_from_logs(paths: Sequence[str | os.PathLike]) -> list[SeedSummary]:
    return [r.summary for r in runs_from_logs(paths)]

"""The torch inductor + Triton compile caches, carried between nodes through the store.

A cold torch.compile of the record recipe takes minutes; with the caches of an earlier node that ran
the same code on the same torch and GPU model, most kernels load from disk instead. The node runner
points TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR under one root (`compile_cache_env(root)`), calls
`restore_compile_cache` before the first seed and `save_compile_cache` after it.

    key = cache_key(code_hash(script_sha256, trainer_hash), torch.__version__, "NVIDIA H100 80GB HBM3")
        # -> "compile-cache/<code-hash>-<torch-version>-<gpu-model>.tar", sanitised
    ptxas_env(os.environ) -> {"TRITON_PTXAS_PATH": ...}  # one ptxas, so one set of Triton keys, in every process
    restore_compile_cache(store, key, root) -> bool   # False: not in the store yet (cold compile)
    save_compile_cache(store, key, root) -> int       # bytes uploaded (0: nothing to save)
    prune_store_caches(store, max_bytes, keep=key) -> [removed keys]

Every version of the code launched adds a cache of hundreds of MB to the store, so the store keeps them under a
size (cluster.store_cache_gb): each restore and save stamps its key's time of use in a small object beside it
(`<key>.used`, store_lru.py), and after a sweep saves its cache the least recently used others go until the rest
fit. A cache is only an optimisation: one removed while another node was about to read it costs that node a cold
compile.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import tarfile
import tempfile
from pathlib import Path

from orchestrator.store import Store, StoreError, validate_key
from orchestrator.store_lru import last_uses, mark_used, prune

log = logging.getLogger(__name__)

PREFIX = "compile-cache"
MARKER = ".speedrun-restored.json"  # what restore unpacked, so save can skip an unchanged cache
# Lock files and half-written temp files are per-process state, not cache content.
SKIP = re.compile(r"(\.lock$|\.tmp|^tmp|\.pid$)")


def _clean(part: str) -> str:
    part = re.sub(r"[^A-Za-z0-9._+-]+", "_", part.strip()).strip("._")
    return part[:80] or "unknown"


def code_hash(script_sha256: str | None, trainer_hash: str) -> str:
    """What compiles: an external script's shipped folder (the sha256 of its tar: every file it imports) or,
    without one, our trainer (the hash of trainer/). A script never shares our trainer's cache, nor another's."""
    return f"script-{script_sha256[:16]}" if script_sha256 else trainer_hash


def cache_key(code_hash: str, torch_version: str, gpu_name: str) -> str:
    """`compile-cache/<code-hash>-<torch-version>-<gpu-model>.tar`, each part reduced to [A-Za-z0-9._+-]."""
    return validate_key(f"{PREFIX}/{_clean(code_hash)}-{_clean(torch_version)}-{_clean(gpu_name)}.tar")


def compile_cache_env(root: str | os.PathLike) -> dict[str, str]:
    """The environment variables that put both caches under `root` (what save/restore carry)."""
    root = Path(root)
    return {"TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"), "TRITON_CACHE_DIR": str(root / "triton")}


def ptxas_env(environ: dict[str, str] | os._Environ, torch_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """TRITON_PTXAS_PATH set to the ptxas torch ships (torch/bin/ptxas), unless the node or the job chose one.

    Triton keys every cached kernel on its ptxas's version, and inductor points TRITON_PTXAS_PATH at torch's
    ptxas only on its way to compiling a kernel itself: in a cold process, before our custom ops' kernels
    compile, but not in a process whose graphs all load from the cache. The two ptxas builds differ, so every
    kernel the first process compiled was compiled again under a new key by the second (issue 26: 22 kernels,
    7 s of its warm-up). Set for every process, it gives all of them the same keys. {} where torch has none."""
    if environ.get("TRITON_PTXAS_PATH"):
        return {}
    if torch_dir is None:
        spec = importlib.util.find_spec("torch")   # located, not imported: the node runner never needs torch
        if spec is None or not spec.submodule_search_locations:
            return {}
        torch_dir = next(iter(spec.submodule_search_locations))
    ptxas = Path(torch_dir) / "bin" / "ptxas"
    return {"TRITON_PTXAS_PATH": str(ptxas)} if ptxas.is_file() and os.access(ptxas, os.X_OK) else {}


def _cache_files(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()
                  and p.name != MARKER and not SKIP.search(p.name))


def _fingerprint(root: Path, files: list[Path]) -> str:
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(root).as_posix()}\0{p.stat().st_size}\n".encode())
    return h.hexdigest()


def _safe_members(tar: tarfile.TarFile, dest: Path):
    """Regular files and directories that land inside dest; anything else in a cache tar is dropped."""
    for m in tar.getmembers():
        target = (dest / m.name).resolve()
        if not (m.isfile() or m.isdir()) or not target.is_relative_to(dest.resolve()):
            log.warning("compile cache: skipping unsafe member %r", m.name)
            continue
        yield m


def restore_compile_cache(store: Store, key: str, dest_dir: str | os.PathLike) -> bool:
    """Unpack the cache at `key` into dest_dir (existing files are kept); False when the store has none."""
    validate_key(key)
    if not store.exists(key):
        return False
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".compile-cache-") as tmp:
        archive = store.get_file(key, Path(tmp) / "cache.tar")
        try:
            with tarfile.open(archive) as tar:
                members = list(_safe_members(tar, dest))
                kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(dest, members=members, **kwargs)
        except tarfile.TarError as e:
            raise StoreError(f"{store.url(key)}: not a readable tar ({e}); delete it so the next node saves a fresh one") from None
    (dest / MARKER).write_text(json.dumps({"key": key, "fingerprint": _fingerprint(dest, _cache_files(dest))}))
    log.info("compile cache restored from %s (%d files)", store.url(key), len(members))
    mark_used(store, key)
    return True


def save_compile_cache(store: Store, key: str, src_dir: str | os.PathLike) -> int:
    """Upload src_dir as an uncompressed tar at `key` (one atomic PUT replaces the old one); returns bytes,
    0 when there is nothing to save or nothing changed since this key was restored here."""
    validate_key(key)
    src = Path(src_dir)
    files = _cache_files(src)
    if not files:
        log.info("compile cache: %s is empty, nothing to save", src)
        return 0
    try:
        restored = json.loads((src / MARKER).read_text())
    except (OSError, ValueError):
        restored = {}
    if restored.get("key") == key and restored.get("fingerprint") == _fingerprint(src, files) and store.exists(key):
        log.info("compile cache unchanged since it was restored from %s; not uploaded again", store.url(key))
        return 0   # its restore stamped it
    with tempfile.TemporaryDirectory(prefix=".compile-cache-") as tmp:
        archive = Path(tmp) / "cache.tar"
        # Uncompressed: cubins and Python sources compress little, and the node's time matters more.
        with tarfile.open(archive, "w") as tar:
            for p in files:
                try:
                    tar.add(p, arcname=p.relative_to(src).as_posix(), recursive=False)
                except OSError as e:  # a file a concurrent compile removed meanwhile
                    log.debug("compile cache: skipped %s (%s)", p, e)
        size = archive.stat().st_size
        store.put_file(archive, key)
    log.info("compile cache saved to %s (%d files, %.1f MB)", store.url(key), len(files), size / 1e6)
    mark_used(store, key)
    return size


def prune_store_caches(store: Store, max_bytes: int, keep: str) -> list[str]:
    """Remove the least recently used compile caches from the store (each with its stamp) until the rest, `keep`
    included (this sweep's, never removed), fit in max_bytes; a cache without a stamp counts as the oldest. Returns
    the removed keys, oldest first."""
    return prune(store, last_uses(store, [PREFIX + "/"]), max_bytes, keep={keep})

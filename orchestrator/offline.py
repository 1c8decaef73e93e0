"""Offline nodes: what a script fetches from the internet at run time, fetched beforehand on the launcher.

Many clusters give compute nodes no internet. A record script that calls
`kernels.get_kernel('kernels-community/flash-attn3')` (a Hugging Face hub download) or
`tiktoken.get_encoding('gpt2')` dies there. A job's `offline:` section names those fetches;
`speedrun prefetch JOB` fills the launcher's cache folder with them (hf/ is an HF_HOME, tiktoken/ a
TIKTOKEN_CACHE_DIR); `speedrun launch` checks that everything named is in it, ships the needed part
of the folder through the store like a workdir (content-addressed, once), and the node runner unpacks
it and starts the script with HF_HOME, HF_HUB_OFFLINE=1 and TIKTOKEN_CACHE_DIR pointing at it.

A hub entry is `owner/name` (the repo's main revision) or `owner/name@REV`, a branch or tag. kernels (0.12 on)
loads `get_kernel(repo, version=N)` from the repo's branch vN: the current record asks for flash-attn3 version 1, so
its entry is `kernels-community/flash-attn3@v1`. The cache then holds refs/v1, which is where kernels' releases that
resolve versions offline look (older ones ask the hub for the repo's branches, and cannot run offline at all). The
repo is kept in both of the hub cache's layouts (HUB_KINDS: one folder, the other name a link), since kernels
releases differ in which one they read.

    missing(spec)            -> [what is not in the cache, in words]       (pure reads)
    snapshot_cache(spec, key) -> workdir.Snapshot of the needed files      (ConfigError when incomplete)
    prefetch(spec, say)      -> downloads into spec.cache                  (`speedrun prefetch`)
    restore(store, shipped, cache_dir) -> the unpacked folder on the node (unpacked_dir(cache_dir, sha256))
    node_env(unpacked_dir, spec)      -> the environment variables for the script
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from orchestrator.config import ConfigError, OfflineSpec, expand
from orchestrator.workdir import OFFLINE_PREFIX, Snapshot, list_files, snapshot_workdir

log = logging.getLogger(__name__)

HF = "hf"                   # an HF_HOME: the hub cache is hf/hub/models--owner--name/
TIKTOKEN = "tiktoken"       # a TIKTOKEN_CACHE_DIR
TIKTOKEN_RECORD = "speedrun-encodings.json"  # the encodings prefetch loaded into tiktoken/ (its files are hashed URLs)


# The hub cache's folder of a repo is named by its repo type: kernels up to 0.13 fetched kernel repos as models
# (models--owner--name), later releases as the hub's own kernel type (kernels--owner--name), offline included
HUB_KINDS = ("models", "kernels")


def hub_folder(repo: str, kind: str = "models") -> str:
    """`hf/hub/<kind>--owner--name`: where the hub cache keeps a repo of that type."""
    return f"{HF}/hub/{kind}--{repo.replace('/', '--')}"


def hub_layouts(root: Path, repo: str) -> tuple[list[str], list[str]]:
    """(the repo's folders that hold files, the other layouts' names, shipped as links to the first of them): one
    download serves kernels releases of either layout."""
    names = [hub_folder(repo, kind) for kind in HUB_KINDS]
    real = [n for n in names if (root / n).is_dir() and not (root / n).is_symlink()]
    if not real:   # nothing fetched yet
        return names[:1], []
    return real, [n for n in names if n not in real]


def hub_entry(entry: str) -> tuple[str, str]:
    """(repo, revision) of an hf_kernels entry: owner/name[@REV], main when no REV is given."""
    repo, _, rev = entry.partition("@")
    return repo, rev or "main"


def _hub_snapshot(root: Path, entry: str, variants: list[str]) -> Path | None:
    """The cached snapshot of the entry's revision, if the cache holds one with files (and the variants)."""
    repo, rev = hub_entry(entry)
    for folder in hub_layouts(root, repo)[0]:
        try:
            commit = (root / folder / "refs" / rev).read_text().strip()
        except OSError:
            continue
        snap = root / folder / "snapshots" / commit
        if snap.is_dir() and any(snap.iterdir()) and all((snap / "build" / v).is_dir() for v in variants):
            return snap
    return None


def _encodings(root: Path) -> list[str]:
    try:
        return list(json.loads((root / TIKTOKEN / TIKTOKEN_RECORD).read_text()))
    except (OSError, ValueError):
        return []


def missing(spec: OfflineSpec) -> list[str]:
    """What the spec names that the cache folder does not hold, each in words."""
    root = expand(spec.cache)
    variants = f" (build variants {', '.join(spec.hf_variants)})" if spec.hf_variants else ""
    out = [f"the hub repo {repo}{variants}" for repo in spec.hf_kernels
           if _hub_snapshot(root, repo, spec.hf_variants) is None]   # entries named as written (with @REV)
    have = _encodings(root)
    out += [f"the tiktoken encoding {name}" for name in spec.tiktoken if name not in have]
    return out


def snapshot_cache(spec: OfflineSpec, key: str, job_file: str) -> Snapshot:
    """The part of the cache folder the nodes need, as one content-addressed tar (reads, creates nothing)."""
    root = expand(spec.cache)
    gone = missing(spec)
    if gone:
        raise ConfigError(f"{key}: {', '.join(gone)} {'is' if len(gone) == 1 else 'are'} not in {root}; pre-fetch on a "
                          f"machine with internet with `speedrun prefetch {job_file}` and copy {root} here, or point "
                          "offline.cache at a folder that holds them")
    files: list[str] = []
    links: dict[str, str] = {}
    subs: list[str] = []
    for repo in dict.fromkeys(hub_entry(e)[0] for e in spec.hf_kernels):   # a repo once, whatever its revisions
        real, others = hub_layouts(root, repo)
        subs += real
        links.update({other: Path(real[0]).name for other in others})   # the other layout: a link to the first
    for sub in subs + ([TIKTOKEN] if spec.tiktoken else []):
        f, lk = list_files(root / sub, key)
        files += [f"{sub}/{p}" for p in f]
        links.update({f"{sub}/{p}": t for p, t in lk.items()})
    entry = files[0] if files else ""
    return snapshot_workdir(root, entry, float("inf"), key, listing=(files, links), prefix=OFFLINE_PREFIX)


def prefetch(spec: OfflineSpec, say: Callable[[str], None] = log.info) -> Path:
    """Download what the spec names into its cache folder (needs internet); ConfigError names what failed."""
    root = expand(spec.cache)
    for entry in spec.hf_kernels:
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise ConfigError("offline.hf_kernels: pre-fetching needs huggingface_hub; pip install 'speedrun[hf]'") from None
        repo, rev = hub_entry(entry)
        say(f"pre-fetching the hub repo {repo} at {rev} into {root / HF}")
        try:
            # kernels.get_kernel loads build/<variant>/ of one revision; the others need not travel. The hub cache
            # records the revision's name in refs/<rev>, which is what an offline get_kernel resolves
            patterns = [f"build/{v}/*" for v in spec.hf_variants] or None
            _download(snapshot_download, repo, rev, root, patterns)
        except Exception as e:  # noqa: BLE001  offline, unknown repo, gated: one sentence either way
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ConfigError(f"offline.hf_kernels: cannot download {entry} from the Hugging Face hub ({first}); run "
                              f"`speedrun prefetch` on a machine with internet and copy {root} here") from None
    if spec.tiktoken:
        try:
            import tiktoken
        except ImportError:
            raise ConfigError("offline.tiktoken: pre-fetching needs tiktoken; pip install 'speedrun[prepare]'") from None
        cache = root / TIKTOKEN
        cache.mkdir(parents=True, exist_ok=True)
        loaded = set(_encodings(root))
        old = os.environ.get("TIKTOKEN_CACHE_DIR")
        os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)  # tiktoken reads it on every load
        try:
            for name in spec.tiktoken:
                say(f"pre-fetching the tiktoken encoding {name} into {cache}")
                try:
                    tiktoken.get_encoding(name)
                except Exception as e:  # noqa: BLE001
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                    raise ConfigError(f"offline.tiktoken: cannot load the encoding {name} ({first}); run `speedrun "
                                      f"prefetch` on a machine with internet and copy {root} here") from None
                loaded.add(name)
                (cache / TIKTOKEN_RECORD).write_text(json.dumps(sorted(loaded)))
        finally:
            if old is None:
                os.environ.pop("TIKTOKEN_CACHE_DIR", None)
            else:
                os.environ["TIKTOKEN_CACHE_DIR"] = old
    return root


def _download(snapshot_download, repo: str, rev: str, root: Path, patterns: list[str] | None) -> None:
    """The repo's revision into the cache as the hub's kernel type where this hub client has it (what later kernels
    releases read), else as a model; then the other layout's folder name as a link to it."""
    from huggingface_hub import constants

    kinds = ["kernel", "model"] if "kernel" in getattr(constants, "REPO_TYPES_WITH_KERNEL", ()) else ["model"]
    for i, kind in enumerate(kinds):
        try:
            snapshot_download(repo, revision=rev, repo_type=kind, cache_dir=root / HF / "hub", allow_patterns=patterns)
            break
        except Exception:  # noqa: BLE001  a hub that serves the repo as the other type: try it, else the last error
            if i == len(kinds) - 1:
                raise
    real, others = hub_layouts(root, repo)
    for other in others:
        if not (root / other).is_symlink():
            (root / other).symlink_to(Path(real[0]).name)


def unpacked_dir(cache_dir: Path, sha256: str) -> Path:
    """Where this node keeps a shipped offline cache unpacked (node_cache.py bounds the folder)."""
    return cache_dir / f"offline-{sha256[:16]}"


def restore(store, shipped: dict, cache_dir: Path) -> Path:
    """The shipped offline caches unpacked on this node, once (later seeds and sweeps reuse the folder)."""
    from orchestrator.workdir import fetch, unpack

    dest = unpacked_dir(cache_dir, shipped["sha256"])
    if not (dest / ".complete").is_file():
        unpack(fetch(store, shipped["key"], shipped["sha256"], cache_dir), dest)
        (dest / ".complete").touch()
    return dest


def node_env(unpacked: Path, spec: OfflineSpec) -> dict[str, str]:
    """The script's environment on the node: hub and tiktoken caches from the shipped folder, no downloads."""
    env: dict[str, str] = {}
    if spec.hf_kernels:
        hub = str(unpacked / HF / "hub")
        # kernels passes HF_KERNELS_CACHE (older releases) or KERNELS_CACHE (newer) to the hub as its cache folder,
        # and reads a version's branch from it offline: all four name the same one
        env.update(HF_HOME=str(unpacked / HF), HF_HUB_CACHE=hub, HF_KERNELS_CACHE=hub, KERNELS_CACHE=hub,
                   HF_HUB_OFFLINE="1")
    if spec.tiktoken:
        env["TIKTOKEN_CACHE_DIR"] = str(unpacked / TIKTOKEN)
    return env

"""Compile cache: a fresh node gets the inductor and Triton files an earlier node saved, and nothing else."""
from __future__ import annotations

import io
import json
import os
import tarfile

import pytest

from orchestrator.compile_cache import (MARKER, cache_key, compile_cache_env, prune_store_caches, ptxas_env,
                                       restore_compile_cache, save_compile_cache)
from orchestrator.store import LocalStore, StoreError, validate_key
from orchestrator.store_lru import USED, mark_used


def test_key_is_sanitised_and_valid():
    k = cache_key("ab12cd", "2.11.0+cu130", "NVIDIA H100 80GB HBM3")
    assert k == "compile-cache/ab12cd-2.11.0+cu130-NVIDIA_H100_80GB_HBM3.tar"
    evil = cache_key("../../x", "2.1/../..", "gpu\n/etc")
    assert validate_key(evil) == evil and ".." not in evil.split("/") and evil.count("/") == 1
    assert cache_key("", "", "") == "compile-cache/unknown-unknown-unknown.tar"


def test_save_then_restore_on_a_fresh_node(tmp_path):
    store = LocalStore(tmp_path / "store")
    node_a = tmp_path / "a"
    env = compile_cache_env(node_a)
    (tmp_path / "a" / "inductor" / "fx").mkdir(parents=True)
    (tmp_path / "a" / "triton" / "HASH").mkdir(parents=True)
    (node_a / "inductor" / "fx" / "graph.py").write_text("def call(): pass\n")
    (node_a / "triton" / "HASH" / "kernel.cubin").write_bytes(b"\x7fELF" + bytes(1000))
    (node_a / "triton" / "HASH" / "kernel.lock").write_text("")  # per-process state: not carried
    assert env["TRITON_CACHE_DIR"].endswith("/a/triton")

    key = cache_key("code", "2.13.0", "cpu")
    assert not restore_compile_cache(store, key, tmp_path / "b")  # cold: nothing in the store yet
    assert save_compile_cache(store, key, node_a) > 0
    assert restore_compile_cache(store, key, tmp_path / "b")
    got = sorted(p.relative_to(tmp_path / "b").as_posix() for p in (tmp_path / "b").rglob("*")
                 if p.is_file() and p.name != MARKER)
    assert got == ["inductor/fx/graph.py", "triton/HASH/kernel.cubin"]
    assert (tmp_path / "b" / "triton" / "HASH" / "kernel.cubin").read_bytes() == b"\x7fELF" + bytes(1000)


def test_empty_cache_saves_nothing(tmp_path):
    store = LocalStore(tmp_path / "store")
    assert save_compile_cache(store, cache_key("c", "t", "g"), tmp_path / "missing") == 0
    assert store.list() == []


def test_hostile_archive_cannot_write_outside_the_cache(tmp_path):
    store = LocalStore(tmp_path / "store")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("../escaped.txt", "ok.txt"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))
        link = tarfile.TarInfo("link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    key = cache_key("c", "t", "g")
    store.put_bytes(buf.getvalue(), key)
    assert restore_compile_cache(store, key, tmp_path / "dest")
    assert (tmp_path / "dest" / "ok.txt").read_text() == "hi"
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "dest" / "link").exists()


def test_corrupt_archive_is_one_clear_error(tmp_path):
    store = LocalStore(tmp_path / "store")
    key = cache_key("c", "t", "g")
    store.put_bytes(b"not a tar at all" * 100, key)
    with pytest.raises(StoreError, match="not a readable tar"):
        restore_compile_cache(store, key, tmp_path / "dest")


def test_unchanged_cache_is_not_uploaded_again(tmp_path):
    store = LocalStore(tmp_path / "store")
    key = cache_key("code", "2.13.0", "cpu")
    (tmp_path / "a" / "triton").mkdir(parents=True)
    (tmp_path / "a" / "triton" / "k.cubin").write_bytes(b"1" * 100)
    assert save_compile_cache(store, key, tmp_path / "a") > 0
    assert restore_compile_cache(store, key, tmp_path / "b")
    assert save_compile_cache(store, key, tmp_path / "b") == 0  # the seeds compiled nothing new
    (tmp_path / "b" / "triton" / "new.cubin").write_bytes(b"2" * 50)  # a new kernel: worth saving
    assert save_compile_cache(store, key, tmp_path / "b") > 0
    assert restore_compile_cache(store, key, tmp_path / "c")
    assert (tmp_path / "c" / "triton" / "new.cubin").read_bytes() == b"2" * 50


def _fake_torch(tmp_path, executable=True):
    ptxas = tmp_path / "torch" / "bin" / "ptxas"
    ptxas.parent.mkdir(parents=True)
    ptxas.write_text("#!/bin/sh\n")
    ptxas.chmod(0o755 if executable else 0o644)
    return tmp_path / "torch", ptxas


def one_cache(store, tmp_path, code: str, nbytes: int) -> str:
    """A node's cache of one kernel of nbytes, saved under code's key; returns the key."""
    src = tmp_path / f"node-{code}"
    (src / "triton" / "H").mkdir(parents=True)
    (src / "triton" / "H" / "k.cubin").write_bytes(bytes(nbytes))
    key = cache_key(code, "2.13.0", "cpu")
    assert save_compile_cache(store, key, src) > nbytes
    return key


def test_the_store_keeps_its_compile_caches_under_a_size_least_recently_used_out_first(tmp_path):
    store = LocalStore(tmp_path / "store")
    keys = {code: one_cache(store, tmp_path, code, 100_000) for code in ("a", "b", "c", "d")}
    size = store.size(keys["a"])
    assert all(store.exists(k + USED) for k in keys.values())   # each save stamps its use
    for when, code in enumerate(("c", "a", "d", "b"), start=1):   # used in this order: c oldest, b newest
        mark_used(store, keys[code], now=1000.0 + when)
    assert prune_store_caches(store, 4 * size, keep=keys["c"]) == []   # all four fit
    # room for two: the oldest other than the kept one go first (c is this sweep's, so a and d go)
    assert prune_store_caches(store, 2 * size + 10, keep=keys["c"]) == [keys["a"], keys["d"]]
    left = sorted(o.key for o in store.list("compile-cache/"))
    assert left == sorted([keys["b"], keys["b"] + USED, keys["c"], keys["c"] + USED])
    # the kept cache stays even when it alone is over the bound; a restore stamps the cache it reads
    assert prune_store_caches(store, 1, keep=keys["c"]) == [keys["b"]]
    assert [o.key for o in store.list("compile-cache/")] == [keys["c"], keys["c"] + USED]
    mark_used(store, keys["c"], now=5.0)
    assert restore_compile_cache(store, keys["c"], tmp_path / "fresh")
    assert json.loads(store.get_bytes(keys["c"] + USED))["unix"] > 5.0


def test_caches_without_a_stamp_count_as_the_oldest(tmp_path):
    """Caches saved before stamps existed (or whose stamp is unreadable) go before any stamped one."""
    store = LocalStore(tmp_path / "store")
    old, bad, new, mine = (one_cache(store, tmp_path, c, 50_000) for c in ("old", "bad", "new", "mine"))
    store.delete(old + USED)
    store.put_bytes(b"not json", bad + USED)
    size = store.size(mine)
    assert prune_store_caches(store, 2 * size + 10, keep=mine) == sorted([bad, old])
    assert store.exists(new) and store.exists(mine) and not store.exists(bad + USED)


def test_ptxas_is_pinned_to_the_one_torch_ships(tmp_path):
    torch_dir, ptxas = _fake_torch(tmp_path)
    assert ptxas_env({}, torch_dir) == {"TRITON_PTXAS_PATH": str(ptxas)}


def test_ptxas_chosen_by_the_node_or_job_is_kept(tmp_path):
    torch_dir, _ = _fake_torch(tmp_path)
    assert ptxas_env({"TRITON_PTXAS_PATH": "/opt/cuda/bin/ptxas"}, torch_dir) == {}


def test_no_ptxas_pinned_where_torch_ships_none(tmp_path):
    assert ptxas_env({}, tmp_path / "torch") == {}
    torch_dir, _ = _fake_torch(tmp_path, executable=False)
    assert ptxas_env({}, torch_dir) == {}


def test_ptxas_env_finds_the_installed_torch_without_importing_it():
    import importlib.util
    import sys

    had_torch = "torch" in sys.modules
    found = ptxas_env({})
    assert ("torch" in sys.modules) == had_torch
    torch_dir = importlib.util.find_spec("torch").submodule_search_locations[0]
    expected = os.path.join(torch_dir, "bin", "ptxas")
    assert found == ({"TRITON_PTXAS_PATH": expected} if os.access(expected, os.X_OK) else {})

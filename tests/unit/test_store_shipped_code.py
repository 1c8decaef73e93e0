"""The store keeps the shipped code (workdirs/ and offline/ tars) under cluster.store_code_gb: launches and sweep
starts stamp the tars they use, the first node prunes the least recently used after a sweep, never this sweep's
nor one used within store_code_keep_days; a node whose tar is gone says so in one sentence."""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from orchestrator.cluster_config import ClusterConfig, load_cluster
from orchestrator.config import ConfigError, load_job
from orchestrator.node_cache import SweepCaches
from orchestrator.store import LocalStore, StoreError
from orchestrator.store_lru import USED, last_uses, mark_used
from orchestrator.workdir import (OFFLINE_PREFIX, ShippedCodeMissing, fetch, prune_shipped, ship, ship_code,
                                  snapshot_workdir)

REPO = Path(__file__).resolve().parents[2]
DAY = 86400.0
NOW = 1_800_000_000.0


def shipped_tar(store, tmp_path: Path, name: str, prefix: str = "workdirs") -> str:
    """One version of a user's code (about 20 kB of tar) shipped to the store; returns its key."""
    root = tmp_path / "code" / name
    root.mkdir(parents=True)
    (root / "train_gpt.py").write_text(f"# {name}\n" + "x" * 10_000)
    snap = snapshot_workdir(root, "train_gpt.py", 1e6, "k", prefix=prefix)
    assert ship(snap, store)
    return snap.key


def stamp(store, key: str) -> float:
    return json.loads(store.get_bytes(key + USED))["unix"]


def stamped_just_now(store, key: str) -> bool:
    return abs(time.time() - stamp(store, key)) < 60


def used_days_ago(store, keys_and_days: dict[str, float]) -> None:
    for key, days in keys_and_days.items():
        mark_used(store, key, now=NOW - days * DAY)


def tars(store) -> list[str]:
    return sorted(o.key for o in store.list("") if o.key.endswith(".tar"))


# ------------------------------------------------------------------------------------ stamps


def test_shipping_stamps_the_tar_as_used_and_so_does_shipping_it_again(tmp_path):
    store = LocalStore(tmp_path / "store")
    key = shipped_tar(store, tmp_path, "a")
    assert stamped_just_now(store, key)
    mark_used(store, key, now=5.0)
    root = tmp_path / "code" / "a"
    assert ship(snapshot_workdir(root, "train_gpt.py", 1e6, "k"), store) is False   # in the store already
    assert stamp(store, key) > 5.0   # a launch of the same code again is a use


class NoStamps(LocalStore):
    """A store that refuses to write stamps (a read-only prefix, a flaky endpoint)."""

    def put_bytes(self, data, key):
        if key.endswith(USED):
            raise StoreError(f"{self.url(key)}: cannot write: Permission denied")
        return super().put_bytes(data, key)


def test_a_stamp_that_cannot_be_written_only_warns(tmp_path, caplog):
    store = NoStamps(tmp_path / "store")
    with caplog.at_level(logging.WARNING):
        key = shipped_tar(store, tmp_path, "a")
    assert store.exists(key) and not store.exists(key + USED)
    assert f"could not stamp {store.url(key)} as used" in caplog.text


def job(tmp_path: Path, offline_cache: Path | None = None) -> Path:
    """A user's record folder and a job that ships it (and the offline cache, if given)."""
    code = tmp_path / "my-record"
    code.mkdir()
    for p in (REPO / "tests" / "data" / "fake_record").glob("*.py"):
        (code / p.name).write_bytes(p.read_bytes())
    spec = {"name": "mine", "workdir": "../my-record", "script": "train_gpt.py",
            "data": {"source": "synthetic://markov?seed=0&train_shards=1&shard_tokens=4096", "train_shards": 1}}
    if offline_cache:
        spec["offline"] = {"tiktoken": ["gpt2"], "cache": str(offline_cache)}
    (tmp_path / "jobs").mkdir()
    path = tmp_path / "jobs" / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def script_plan(tmp_path: Path, offline_cache: Path | None = None, **cluster):
    from orchestrator.plan import build_plan

    path = job(tmp_path, offline_cache)
    config = ClusterConfig(name="c", backend="local", device="cpu", work_dir=str(tmp_path / "work"),
                           data_dir=str(tmp_path / "data"), store=str(tmp_path / "store"), **cluster)
    return build_plan(load_job(path), config, path, Path("c.yaml"))


def sweep_caches(plan, store, first: bool = True) -> SweepCaches:
    return SweepCaches(plan, lambda: store, Console(file=io.StringIO(), width=400, markup=False, highlight=False),
                       first)


def test_a_sweep_start_stamps_its_tars_whether_the_node_fetches_them_or_has_them(tmp_path, offline_cache):
    plan = script_plan(tmp_path, offline_cache)
    store = LocalStore(plan.store_url)
    ship_code(plan, store)
    keys = [plan.workdir["key"], plan.offline["key"]]
    caches = sweep_caches(plan, store)
    used_days_ago(store, dict.fromkeys(keys, 6))
    caches.mark_shipped_used()   # this node has neither tar yet
    assert all(stamped_just_now(store, k) for k in keys)
    for shipped in (plan.workdir, plan.offline):
        fetch(store, shipped["key"], shipped["sha256"], caches.shipped)
    used_days_ago(store, dict.fromkeys(keys, 6))
    caches.mark_shipped_used()   # both in this node's cache now: still a use of the store's tars
    assert all(stamped_just_now(store, k) for k in keys)

    used_days_ago(store, dict.fromkeys(keys, 6))
    sweep_caches(plan, store, first=False).mark_shipped_used()   # the first node stamps, once per sweep
    assert all(stamp(store, k) == NOW - 6 * DAY for k in keys)
    store.delete(keys[0])
    store.delete(keys[0] + USED)
    caches.mark_shipped_used()   # a tar gone from the store gets no stamp that would outlive it
    assert not store.exists(keys[0] + USED) and stamped_just_now(store, keys[1])


# ------------------------------------------------------------------------------------ the prune


def test_the_least_recently_used_go_first_until_the_rest_fit_and_keep_stays(tmp_path):
    store = LocalStore(tmp_path / "store")
    a, b, c = (shipped_tar(store, tmp_path, n) for n in "abc")
    d = shipped_tar(store, tmp_path, "d", prefix=OFFLINE_PREFIX)
    size = store.size(a)
    assert {store.size(k) for k in (b, c, d)} == {size}
    used_days_ago(store, {c: 40, d: 30, a: 20, b: 10})   # c the oldest, b the newest; all past the keep
    assert prune_shipped(store, 4 * size, 7, keep=[], now=NOW) == []   # all four fit
    assert prune_shipped(store, 2 * size + 10, 7, keep=[c], now=NOW) == [d, a]   # c is this sweep's: it stays
    assert sorted(o.key for o in store.list("")) == sorted([b, b + USED, c, c + USED])
    assert prune_shipped(store, 1, 7, keep=[c], now=NOW) == [b]   # the kept tar stays, alone over the bound
    assert tars(store) == [c]


def test_a_tar_used_within_the_keep_days_stays_even_over_the_bound(tmp_path):
    """A sweep queued on a busy cluster starts days after its launch: its tar must still be there."""
    store = LocalStore(tmp_path / "store")
    old, queued, fresh = (shipped_tar(store, tmp_path, n) for n in ("old", "queued", "fresh"))   # fresh: just now
    now = time.time()
    mark_used(store, old, now=now - 8 * DAY)
    mark_used(store, queued, now=now - 6.9 * DAY)
    assert prune_shipped(store, 1, 7, keep=[], now=now) == [old]
    assert tars(store) == sorted([queued, fresh])
    assert prune_shipped(store, 1, 7, keep=[], now=now + 0.1 * DAY + 60) == [queued]   # a week unused: it goes
    assert tars(store) == [fresh]


def test_a_tar_stamped_after_the_listing_stays(tmp_path):
    """A launcher ships (stamps) an old tar again while a node's prune is running: the prune's listing said old,
    its second read just before the delete says just used, and the tar stays."""
    from orchestrator.store_lru import prune

    store = LocalStore(tmp_path / "store")
    old, other = (shipped_tar(store, tmp_path, n) for n in ("old", "other"))
    used_days_ago(store, {old: 30, other: 20})
    listed = last_uses(store, ["workdirs/"])
    mark_used(store, old, now=NOW)   # the launcher, between the listing and the delete
    assert prune(store, listed, 1, young_since=NOW - 7 * DAY) == [other]
    assert tars(store) == [old]


def test_tars_shipped_before_stamps_count_from_their_upload(tmp_path):
    store = LocalStore(tmp_path / "store")
    unstamped_old, unstamped_new, stamped = (shipped_tar(store, tmp_path, n) for n in ("u-old", "u-new", "stamped"))
    for key, days in ((unstamped_old, 30), (unstamped_new, 1)):
        store.delete(key + USED)
        os.utime(store.root / key, (NOW - days * DAY, NOW - days * DAY))
    used_days_ago(store, {stamped: 10})
    assert prune_shipped(store, 1, 7, keep=[], now=NOW) == [unstamped_old, stamped]
    assert tars(store) == [unstamped_new]   # uploaded yesterday: within the keep


class NoTimes(LocalStore):
    """A store whose listing gives no modification times."""

    def list(self, prefix=""):
        return [dataclasses.replace(o, modified=None) for o in super().list(prefix)]


def test_without_a_modification_time_an_unstamped_tar_counts_as_the_oldest(tmp_path):
    store = NoTimes(tmp_path / "store")
    unstamped, stamped = (shipped_tar(store, tmp_path, n) for n in ("unstamped", "stamped"))
    store.delete(unstamped + USED)
    used_days_ago(store, {stamped: 30})
    assert {t.key: t.unix for t in last_uses(store, ["workdirs/"], by_modified=True)} == {
        stamped: NOW - 30 * DAY, unstamped: 0.0}
    assert prune_shipped(store, store.size(stamped) + 10, 7, keep=[], now=NOW) == [unstamped]


def test_after_a_sweep_the_first_node_prunes_the_stores_code_and_says_what_went(tmp_path, offline_cache):
    plan = script_plan(tmp_path, offline_cache, store_code_gb=1e-9)
    store = LocalStore(plan.store_url)
    ship_code(plan, store)
    old_code = shipped_tar(store, tmp_path, "old")
    old_offline = shipped_tar(store, tmp_path, "old-offline", prefix=OFFLINE_PREFIX)
    mark_used(store, old_code, now=time.time() - 9 * DAY)
    mark_used(store, old_offline, now=time.time() - 8 * DAY)
    used_days_ago(store, {plan.workdir["key"]: 300, plan.offline["key"]: 300})   # this sweep's: kept however old

    sweep_caches(plan, store, first=False).prune_store_code()   # only the first node prunes
    assert len(tars(store)) == 4
    caches = sweep_caches(plan, store)
    caches.prune_store_code()
    assert tars(store) == sorted([plan.workdir["key"], plan.offline["key"]])
    assert caches.console.file.getvalue() == (
        "[node] shipped code in the store over store_code_gb=1e-09: removed 2 unused for over "
        f"store_code_keep_days=7, least recently used first ({old_code}, {old_offline})\n")


class Unlistable(LocalStore):
    def list(self, prefix=""):
        raise StoreError(f"{self.url()}: list failed (AccessDenied); check the credentials' permissions")


def test_a_prune_that_fails_only_warns(tmp_path, caplog):
    plan = script_plan(tmp_path)
    caches = sweep_caches(plan, Unlistable(plan.store_url))
    with caplog.at_level(logging.WARNING):
        caches.prune_store_code()
    assert "shipped code in the store not pruned: " in caplog.text and caches.console.file.getvalue() == ""


# ------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("override, message", [
    ("cluster.store_code_gb=0", "store_code_gb: must be > 0 (got 0)"),
    ("cluster.store_code_keep_days=-1", "store_code_keep_days: must be > 0 (got -1)"),
    ("cluster.store_code_keep_days=forever", "store_code_keep_days: must be a valid number"),
])
def test_a_bad_store_code_key_is_one_sentence(override, message):
    with pytest.raises(ConfigError) as e:
        load_cluster("local", [override])
    assert str(e.value).startswith(f"--set {override} (on {REPO / 'cluster_configs' / 'local.yaml'}): {message}")


def test_the_store_code_keys_default_to_5_gb_and_a_week():
    cluster, _ = load_cluster("local")
    assert (cluster.store_code_gb, cluster.store_code_keep_days) == (5.0, 7.0)


# ------------------------------------------------------------------------------------ a tar gone


def missing_sentence(store, key: str) -> str:
    return (f"{store.url(key)} is no longer in the store: it was pruned, unused for more than store_code_keep_days "
            "days while the store's shipped code was over store_code_gb, or deleted; launch the sweep again")


def test_fetching_a_pruned_tar_is_one_sentence(tmp_path):
    store = LocalStore(tmp_path / "store")
    key = shipped_tar(store, tmp_path, "a")
    sha = key.removeprefix("workdirs/").removesuffix(".tar")
    store.delete(key)
    with pytest.raises(ShippedCodeMissing) as e:
        fetch(store, key, sha, tmp_path / "node")
    assert str(e.value) == missing_sentence(store, key)
    assert [p.name for p in (tmp_path / "node").iterdir()] == []   # no half-written download left


def test_a_node_whose_tar_was_pruned_fails_in_one_sentence_without_a_traceback(tmp_path, offline_cache, capsys,
                                                                                 caplog):
    from orchestrator.node import main

    plan = script_plan(tmp_path, offline_cache)
    store = LocalStore(plan.store_url)
    ship_code(plan, store)
    store.delete(plan.workdir["key"])
    used_days_ago(store, {plan.offline["key"]: 6})
    (tmp_path / "plan.json").write_text(plan.to_json())
    assert main(["--plan", str(tmp_path / "plan.json")]) == 1
    assert capsys.readouterr().err == f"[node] failed: {missing_sentence(store, plan.workdir['key'])}\n"
    assert not [r for r in caplog.records if r.exc_info]
    assert stamped_just_now(store, plan.offline["key"])   # the sweep started: what is there was stamped

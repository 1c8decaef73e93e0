"""The S3 store against a real S3 HTTP endpoint (moto_server on loopback): round trip with hashes,
multipart, listings, checkpoint pruning, log sync, the compile caches and the shipped code and their bounds, and
throttling (503 SlowDown) retried."""
from __future__ import annotations

import hashlib
import os
import re
import time
import uuid

import pytest
from s3_server import FaultProxy, moto_s3, s3_env  # noqa: F401 (fixtures)

from orchestrator.artifacts import SeedUploader, UploadIncomplete, collect, read_manifest
from orchestrator.compile_cache import cache_key, prune_store_caches, restore_compile_cache, save_compile_cache
from orchestrator.log_sync import LogSync
from orchestrator.store import StoreError, open_store
from orchestrator.store_lru import USED, last_uses, mark_used
from orchestrator.workdir import OFFLINE_PREFIX, ShippedCodeMissing, fetch, prune_shipped, ship, snapshot_workdir

pytestmark = pytest.mark.integration
MB = 1 << 20


def make_seed(d, big_mb=12, small=40):
    (d / "ckpt").mkdir(parents=True)
    for step in (100, 200, 300):
        (d / "ckpt" / f"step_{step:06d}.pt").write_bytes(os.urandom(MB // 4))
    (d / "ckpt" / "final.pt").write_bytes(os.urandom(big_mb * MB))  # multipart at 5 MB parts
    for i in range(small):
        (d / "metrics" / f"part-{i:03d}.jsonl").parent.mkdir(exist_ok=True)
        (d / "metrics" / f"part-{i:03d}.jsonl").write_text(f'{{"step": {i}}}\n' * (i + 1))
    (d / "train.log").write_text("step:1/1 val_loss:3.2800 train_time:1ms step_avg:1.00ms\n")
    return d


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def bucket(s3) -> str:
    return s3.create_bucket(f"b-{uuid.uuid4().hex[:10]}")


def test_seed_round_trip_with_hashes(moto_s3, s3_env, tmp_path):
    b = bucket(moto_s3)
    store = open_store(f"s3://{b}/runs/team?endpoint_url={moto_s3.endpoint}", part_mb=5)
    seed = make_seed(tmp_path / "seed")
    store.put_bytes(b"old", "sw/seed-0/ckpt/step_000001.pt")  # a stale checkpoint from an earlier attempt
    m = SeedUploader(store, tmp_path / "spool").upload_seed(seed, "sw/seed-0", keep_last_ckpt=2)

    assert [f.key for f in m.files if f.key.startswith("ckpt/")] == ["ckpt/final.pt", "ckpt/step_000300.pt"]
    assert len(m.files) == 2 + 40 + 1
    client = moto_s3.client()
    for f in m.files:
        body = client.get_object(Bucket=b, Key=f"runs/team/sw/seed-0/{f.key}")["Body"].read()
        assert sha(body) == f.sha256 == sha((seed / f.key).read_bytes()) and len(body) == f.size
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=b, Prefix="runs/team/sw/seed-0/ckpt/")["Contents"]}
    assert keys == {"runs/team/sw/seed-0/ckpt/final.pt", "runs/team/sw/seed-0/ckpt/step_000300.pt"}
    assert read_manifest(store, "sw/seed-0").content() == m.content()
    assert client.list_multipart_uploads(Bucket=b).get("Uploads", []) == []
    report = collect(store, tmp_path / "spool", "sw")
    assert report.ok and report.verified == ["sw/seed-0"]

    # The plain Store calls, end to end.
    assert store.get_file("sw/seed-0/ckpt/final.pt", tmp_path / "back.pt").read_bytes() == (seed / "ckpt/final.pt").read_bytes()
    assert store.stat("sw/seed-0/ckpt/final.pt").size == 12 * MB and store.stat("sw/seed-0/nope") is None
    store.delete("sw/seed-0/train.log")
    assert not store.exists("sw/seed-0/train.log")
    assert collect(store, tmp_path / "spool", "sw").mismatched == ["sw/seed-0"]  # a committed object went missing


def test_log_sync_and_compile_cache_over_s3(moto_s3, s3_env, tmp_path):
    store = open_store(f"s3://{bucket(moto_s3)}?endpoint_url={moto_s3.endpoint}")
    log = tmp_path / "train.log"
    with LogSync(store, log, "sw/seed-0/train.log", every_s=3600):
        log.write_text("step:1/2\n")
    assert store.get_bytes("sw/seed-0/train.log") == b"step:1/2\n"

    (tmp_path / "cache" / "triton" / "H").mkdir(parents=True)
    (tmp_path / "cache" / "triton" / "H" / "k.cubin").write_bytes(os.urandom(5000))
    key = cache_key("abc", "2.11.0", "NVIDIA H100 80GB HBM3")
    assert save_compile_cache(store, key, tmp_path / "cache") > 5000
    assert restore_compile_cache(store, key, tmp_path / "fresh")
    assert (tmp_path / "fresh/triton/H/k.cubin").read_bytes() == (tmp_path / "cache/triton/H/k.cubin").read_bytes()
    # a second version of the code's cache, then the store bound: the older stamp goes with its cache
    newer = cache_key("def", "2.11.0", "NVIDIA H100 80GB HBM3")
    assert save_compile_cache(store, newer, tmp_path / "cache") > 5000
    mark_used(store, key, now=1.0)
    assert prune_store_caches(store, store.size(newer) + 10, keep=newer) == [key]
    assert sorted(o.key for o in store.list("compile-cache/")) == [newer, newer + USED]


def test_shipped_code_over_s3_goes_least_recently_used_first_but_not_within_the_keep_days(moto_s3, s3_env, tmp_path):
    store = open_store(f"s3://{bucket(moto_s3)}/runs?endpoint_url={moto_s3.endpoint}")
    keys = {}
    shipped = {"old": "workdirs", "unstamped": "workdirs", "mine": OFFLINE_PREFIX, "young": "workdirs"}
    for name, prefix in shipped.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "train_gpt.py").write_text(name * 1000)
        snap = snapshot_workdir(tmp_path / name, "train_gpt.py", 1e6, "k", prefix=prefix)
        assert ship(snap, store) and store.exists(snap.key + USED)   # shipping stamps it
        keys[name] = snap.key
    now, day = time.time(), 86400
    mark_used(store, keys["old"], now=now - 30 * day)
    mark_used(store, keys["mine"], now=now - 60 * day)   # this sweep's: kept however old
    store.delete(keys["unstamped"] + USED)   # shipped before stamps: counts from S3's LastModified, just now
    (unstamped,) = [t for t in last_uses(store, ["workdirs/"], by_modified=True) if t.key == keys["unstamped"]]
    assert abs(unstamped.unix - now) < 120 and not unstamped.stamped
    assert prune_shipped(store, 1, 7, keep=[keys["mine"]], now=now) == [keys["old"]]   # the young stay over the bound
    sha = keys["old"].removeprefix("workdirs/").removesuffix(".tar")
    with pytest.raises(ShippedCodeMissing, match=f"^{re.escape(store.url(keys['old']))} is no longer in the store"):
        fetch(store, keys["old"], sha, tmp_path / "node")   # a node of a sweep that still named it
    assert sorted(prune_shipped(store, 1, 7, keep=[keys["mine"]], now=now + 8 * day)) == sorted(
        [keys["unstamped"], keys["young"]])   # a week later nothing protects them
    assert sorted(o.key for o in store.list("")) == [keys["mine"], keys["mine"] + USED]


def test_missing_bucket_is_one_clear_error(moto_s3, s3_env):
    store = open_store(f"s3://no-such-bucket-{uuid.uuid4().hex[:6]}/p?endpoint_url={moto_s3.endpoint}")
    with pytest.raises(StoreError, match="does not exist; create it or fix the store URL"):
        store.put_bytes(b"x", "a/b")


def test_throttling_is_retried_until_it_passes(moto_s3, s3_env, tmp_path):
    b = bucket(moto_s3)
    with FaultProxy(moto_s3.port, throttle_first=5) as proxy:
        store = open_store(f"s3://{b}/p?endpoint_url={proxy.endpoint}", part_mb=5)
        m = SeedUploader(store, tmp_path / "spool").upload_seed(make_seed(tmp_path / "seed", small=5), "sw/seed-0")
    assert proxy.throttled == 5 and proxy.requests > 5
    client = moto_s3.client()
    for f in m.files:
        assert sha(client.get_object(Bucket=b, Key=f"p/sw/seed-0/{f.key}")["Body"].read()) == f.sha256


def test_throttling_beyond_the_budget_spools_and_collect_finishes(moto_s3, s3_env, tmp_path):
    b = bucket(moto_s3)
    seed = make_seed(tmp_path / "seed", big_mb=6, small=3)
    with FaultProxy(moto_s3.port, throttle_first=-1) as proxy:
        store = open_store(f"s3://{b}/p?endpoint_url={proxy.endpoint}", retry_budget_s=1.0)
        with pytest.raises(UploadIncomplete, match="run `speedrun collect sw` later"):
            SeedUploader(store, tmp_path / "spool").upload_seed(seed, "sw/seed-0")
    assert proxy.throttled > 1  # botocore and tenacity both tried again
    assert moto_s3.client().list_objects_v2(Bucket=b).get("KeyCount") == 0

    direct = open_store(f"s3://{b}/p?endpoint_url={moto_s3.endpoint}")
    report = collect(direct, tmp_path / "spool", "sw")
    assert report.completed == ["sw/seed-0"] and report.ok
    m = read_manifest(direct, "sw/seed-0")
    for f in m.files:
        assert sha(direct.get_bytes(f"sw/seed-0/{f.key}")) == f.sha256 == sha((seed / f.key).read_bytes())


def test_put_new_creates_an_object_once(moto_s3, s3_env):
    # what keeps two watchers from both re-submitting a dead job (orchestrator/watch.py)
    store = open_store(f"s3://{bucket(moto_s3)}/sweeps?endpoint_url={moto_s3.endpoint}")
    assert store.put_new(b"first", "s/attempts/7.json")
    assert not store.put_new(b"second", "s/attempts/7.json")
    assert store.get_bytes("s/attempts/7.json") == b"first"

"""Seed upload, manifest, spool and collect against the local directory store."""
from __future__ import annotations

import hashlib
import json
import shutil
import time

import pytest

from orchestrator.artifacts import (
    SeedUploader,
    UploadConflict,
    UploadIncomplete,
    collect,
    newest_checkpoints,
    read_manifest,
)
from orchestrator.log_sync import LogSync
from orchestrator.store import LocalStore, StoreError


def make_seed(d, ckpts=(100, 200, 300), big=0):
    (d / "ckpt").mkdir(parents=True)
    (d / "train.log").write_text("step:1/10 train_loss:10.0 train_time:1ms step_avg:1.00ms\n")
    (d / "metrics.jsonl").write_text('{"step": 1}\n')
    (d / "timings.json").write_text("{}")
    for s in ckpts:
        (d / "ckpt" / f"step_{s:06d}.pt").write_bytes(bytes([s % 256]) * (1000 + s + big))
    (d / "ckpt" / "final.pt").write_bytes(b"F" * 5000)
    (d / "CHECKPOINT_NOW").write_text("")  # a control file, never uploaded
    return d


def sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_upload_writes_manifest_with_every_hash(tmp_path):
    store = LocalStore(tmp_path / "store")
    seed = make_seed(tmp_path / "seed")
    m = SeedUploader(store, tmp_path / "spool").upload_seed(seed, "sw/seed-0", keep_last_ckpt=2)
    keys = [f.key for f in m.files]
    assert keys == ["ckpt/final.pt", "ckpt/step_000300.pt", "metrics.jsonl", "timings.json", "train.log"]
    for f in m.files:
        assert store.get_bytes(f"sw/seed-0/{f.key}") == (seed / f.key).read_bytes()
        assert f.sha256 == sha(seed / f.key) and f.size == (seed / f.key).stat().st_size
    assert read_manifest(store, "sw/seed-0").content() == m.content()
    assert not list((tmp_path / "spool").iterdir())  # nothing left waiting


def test_keep_last_checkpoints_on_the_store(tmp_path):
    store = LocalStore(tmp_path / "store")
    store.put_bytes(b"stale", "sw/seed-0/ckpt/step_000050.pt")  # from an earlier attempt of the seed
    SeedUploader(store, tmp_path / "spool").upload_seed(make_seed(tmp_path / "s"), "sw/seed-0", keep_last_ckpt=3)
    assert [o.key.rsplit("/", 1)[1] for o in store.list("sw/seed-0/ckpt/")] == [
        "final.pt", "step_000200.pt", "step_000300.pt"]
    assert newest_checkpoints(["ckpt/step_000010.pt", "ckpt/step_000009.pt", "train.log"], 1) == {"ckpt/step_000010.pt"}
    assert newest_checkpoints(["ckpt/a.pt"], 0) == set()


def test_unreachable_store_keeps_the_seed_in_the_spool_and_collect_finishes(tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "store")
    seed = make_seed(tmp_path / "seed")
    real_put = LocalStore.put_file

    def flaky(self, path, key, sha256=None):
        if key.endswith("step_000300.pt"):
            raise StoreError(f"{key}: endpoint unreachable")
        return real_put(self, path, key, sha256)

    monkeypatch.setattr(LocalStore, "put_file", flaky)
    with pytest.raises(UploadIncomplete, match=r"\d of 7 files were not uploaded"):
        SeedUploader(store, tmp_path / "spool").upload_seed(seed, "sw/seed-0")
    assert read_manifest(store, "sw/seed-0") is None  # incomplete, and visibly so
    seed_files = {p.relative_to(seed).as_posix(): p.read_bytes() for p in seed.rglob("*") if p.is_file()}
    shutil.rmtree(seed)  # the node cleans its work dir: the spool alone must suffice
    report = collect(store, tmp_path / "spool", "sw")
    assert report.pending == ["sw/seed-0"] and not report.ok
    monkeypatch.setattr(LocalStore, "put_file", real_put)
    report = collect(store, tmp_path / "spool", "sw")
    assert report.completed == ["sw/seed-0"] and report.ok
    m = read_manifest(store, "sw/seed-0")
    for f in m.files:
        assert hashlib.sha256(store.get_bytes(f"sw/seed-0/{f.key}")).hexdigest() == f.sha256
        assert store.get_bytes(f"sw/seed-0/{f.key}") == seed_files[f.key]
    # Idempotent: a second collect finds nothing to do and verifies the committed seed.
    again = collect(store, tmp_path / "spool", "sw")
    assert again.completed == [] and again.verified == ["sw/seed-0"] and again.ok


def test_committed_seed_is_never_overwritten_with_different_content(tmp_path):
    store = LocalStore(tmp_path / "store")
    SeedUploader(store, tmp_path / "spool").upload_seed(make_seed(tmp_path / "a"), "sw/seed-0")
    before = {o.key: store.get_bytes(o.key) for o in store.list("sw/")}
    other = make_seed(tmp_path / "b", ckpts=(7,))
    with pytest.raises(UploadConflict, match="different content"):
        SeedUploader(store, tmp_path / "spool").upload_seed(other, "sw/seed-0")
    assert {o.key: store.get_bytes(o.key) for o in store.list("sw/")} == before
    assert collect(store, tmp_path / "spool", "sw").conflicts == ["sw/seed-0"]


def test_collect_reports_incomplete_and_tampered_seeds(tmp_path):
    store = LocalStore(tmp_path / "store")
    SeedUploader(store, tmp_path / "spool").upload_seed(make_seed(tmp_path / "a"), "sw/seed-0")
    store.put_bytes(b"log only", "sw/seed-1/train.log")  # a node that died: its log, no manifest
    store.put_bytes(b"tampered", "sw/seed-0/metrics.jsonl")
    r = collect(store, tmp_path / "spool", "sw")
    assert r.incomplete == ["sw/seed-1"] and r.mismatched == ["sw/seed-0"] and not r.ok


def test_malformed_manifest_is_one_clear_error(tmp_path):
    store = LocalStore(tmp_path)
    store.put_bytes(b"{not json", "sw/seed-0/manifest.json")
    with pytest.raises(StoreError, match="malformed manifest"):
        read_manifest(store, "sw/seed-0")


def test_log_sync_uploads_the_growing_log(tmp_path):
    store = LocalStore(tmp_path / "store")
    log = tmp_path / "train.log"
    with LogSync(store, log, "sw/seed-0/train.log", every_s=0.05) as sync:
        log.write_text("step:1\n")
        deadline = time.monotonic() + 10
        while not store.exists("sw/seed-0/train.log") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert store.get_bytes("sw/seed-0/train.log") == b"step:1\n"  # uploaded while still running
        with log.open("a") as f:
            f.write("step:2\n")
    assert store.get_bytes("sw/seed-0/train.log") == b"step:1\nstep:2\n"  # final sync at exit
    assert sync.uploads >= 2


def test_two_pass_upload_commits_once_and_resends_only_changes(tmp_path, monkeypatch):
    """The node runner uploads, then rewrites timings.json (with the upload time) and commits."""
    store = LocalStore(tmp_path / "store")
    seed = make_seed(tmp_path / "seed")
    up = SeedUploader(store, tmp_path / "spool")
    up.upload_seed(seed, "sw/seed-0", write_manifest=False)
    assert read_manifest(store, "sw/seed-0") is None and store.exists("sw/seed-0/ckpt/final.pt")

    sent = []
    real_put = LocalStore.put_file
    monkeypatch.setattr(LocalStore, "put_file", lambda self, p, k, sha256=None: sent.append(k) or real_put(self, p, k, sha256))
    (seed / "timings.json").write_text('{"upload_s": 1.5}')
    m = up.upload_seed(seed, "sw/seed-0", state="succeeded")
    assert sent == ["sw/seed-0/timings.json"]
    assert read_manifest(store, "sw/seed-0").state == "succeeded" == m.state
    assert store.get_bytes("sw/seed-0/timings.json") == b'{"upload_s": 1.5}'


def test_a_seed_committed_as_failed_is_replaced_by_a_newer_attempt(tmp_path):
    store = LocalStore(tmp_path / "store")
    up = SeedUploader(store, tmp_path / "spool")
    up.upload_seed(make_seed(tmp_path / "a", ckpts=(1,)), "sw/seed-0", state="failed")
    retry = make_seed(tmp_path / "b", ckpts=(9,))
    m = up.upload_seed(retry, "sw/seed-0", state="succeeded", keep_last_ckpt=1)
    assert read_manifest(store, "sw/seed-0").state == "succeeded" == m.state
    assert [o.key for o in store.list("sw/seed-0/ckpt/")] == ["sw/seed-0/ckpt/final.pt"]  # the failed try's step_1 pruned
    assert collect(store, tmp_path / "spool", "sw").verified == ["sw/seed-0"]
    with pytest.raises(UploadConflict):  # a succeeded seed stays as committed
        up.upload_seed(make_seed(tmp_path / "c", ckpts=(5,)), "sw/seed-0", state="succeeded")


def test_closing_files_join_the_one_pass_before_the_manifest(tmp_path, monkeypatch):
    """The node runner's single upload: files, then timings.json stating that upload's time, then the manifest."""
    store = LocalStore(tmp_path / "store")
    seed = make_seed(tmp_path / "seed")
    (seed / "timings.json").unlink(missing_ok=True)  # the node runner writes it only in closing()
    order = []
    real_put = LocalStore.put_file
    monkeypatch.setattr(LocalStore, "put_file", lambda self, p, k, sha256=None: order.append(k) or real_put(self, p, k, sha256))
    real_bytes = LocalStore.put_bytes
    monkeypatch.setattr(LocalStore, "put_bytes", lambda self, d, k: order.append(k) or real_bytes(self, d, k))
    seen = []

    def closing(upload_s):
        seen.append(upload_s)
        assert read_manifest(store, "sw/seed-0") is None  # not committed yet
        return {"timings.json": json.dumps({"upload_s": upload_s}).encode()}

    m = SeedUploader(store, tmp_path / "spool").upload_seed(seed, "sw/seed-0", state="succeeded", closing=closing)
    assert len(seen) == 1 and seen[0] >= 0
    assert order[-2:] == ["sw/seed-0/timings.json", "sw/seed-0/manifest.json"]
    assert len(order) == len(set(order))  # every object sent once
    assert "timings.json" in {f.key for f in m.files}
    assert json.loads(store.get_bytes("sw/seed-0/timings.json"))["upload_s"] == seen[0]

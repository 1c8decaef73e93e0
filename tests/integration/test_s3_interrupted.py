"""Nothing is lost when the upload is interrupted: the S3 endpoint dies mid-upload and comes back, or the
uploader itself is SIGKILLed mid-way. No manifest is written, and a later collect completes the seed
with every hash matching, no partial multipart upload left and no extra object."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading

import pytest
from s3_server import FaultProxy, MotoServer, moto_binary, s3_env  # noqa: F401 (fixtures)

from orchestrator.artifacts import PENDING, SeedUploader, UploadIncomplete, collect, read_manifest
from orchestrator.store import open_store

pytestmark = pytest.mark.integration
MB = 1 << 20


@pytest.fixture
def fresh_moto():
    if not os.path.exists(moto_binary()):
        pytest.skip("moto_server is not installed next to this python")
    with MotoServer() as server:
        yield server


def make_seed(d):
    (d / "ckpt").mkdir(parents=True)
    (d / "ckpt" / "step_000100.pt").write_bytes(os.urandom(11 * MB))
    (d / "ckpt" / "final.pt").write_bytes(os.urandom(11 * MB))
    for i in range(60):
        (d / f"shard-{i:03d}.jsonl").write_bytes(os.urandom(2000 + i))
    (d / "train.log").write_text("step:1/1 val_loss:3.2700 train_time:5ms step_avg:5.00ms\n")
    return d


def assert_complete(server: MotoServer, bucket: str, seed_dir, prefix: str = "p/sw/seed-0") -> None:
    client = server.client()
    objects = {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    local = {p.relative_to(seed_dir).as_posix() for p in seed_dir.rglob("*") if p.is_file()}
    assert objects == {f"{prefix}/{k}" for k in local} | {f"{prefix}/manifest.json"}  # no duplicates, no strays
    store = open_store(f"s3://{bucket}/p?endpoint_url={server.endpoint}")
    manifest = read_manifest(store, "sw/seed-0")
    assert {f.key for f in manifest.files} == local
    for f in manifest.files:
        body = client.get_object(Bucket=bucket, Key=f"{prefix}/{f.key}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == f.sha256 == hashlib.sha256((seed_dir / f.key).read_bytes()).hexdigest()
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_endpoint_killed_mid_upload_then_restarted_collect_completes(fresh_moto, s3_env, tmp_path):
    fresh_moto.create_bucket("runs")
    seed = make_seed(tmp_path / "seed")
    outcome: dict = {}
    with FaultProxy(fresh_moto.port, hold_after_parts=2) as proxy:
        store = open_store(f"s3://runs/p?endpoint_url={proxy.endpoint}", part_mb=5, retry_budget_s=2, max_attempts=2)

        def upload():
            try:
                outcome["manifest"] = SeedUploader(store, tmp_path / "spool").upload_seed(seed, "sw/seed-0")
            except Exception as e:  # noqa: BLE001 (the test inspects it)
                outcome["error"] = e

        t = threading.Thread(target=upload)
        t.start()
        assert proxy.holding.wait(60), "the upload never reached its second multipart part"
        listed = {o["Key"] for o in fresh_moto.client().list_objects_v2(Bucket="runs").get("Contents", [])}
        assert "p/sw/seed-0/manifest.json" not in listed  # mid-way: some objects, no commit marker
        fresh_moto.kill()
        proxy.release()  # the held requests now meet a dead endpoint
        t.join(120)
    assert not t.is_alive()
    assert isinstance(outcome.get("error"), UploadIncomplete), outcome
    assert (tmp_path / "spool" / "sw__seed-0" / PENDING).is_file()

    fresh_moto.start()  # same port; moto forgot everything, so the whole seed must come from the spool
    fresh_moto.create_bucket("runs")
    direct = open_store(f"s3://runs/p?endpoint_url={fresh_moto.endpoint}")
    report = collect(direct, tmp_path / "spool", "sw")
    assert report.completed == ["sw/seed-0"] and report.ok, report
    assert_complete(fresh_moto, "runs", seed)
    assert not any((tmp_path / "spool").iterdir())


CHILD = """
import sys
from orchestrator.artifacts import SeedUploader
from orchestrator.store import open_store
endpoint, seed_dir, spool = sys.argv[1:]
store = open_store(f"s3://runs/p?endpoint_url={endpoint}", part_mb=5)
SeedUploader(store, spool).upload_seed(seed_dir, "sw/seed-0")
print("UPLOAD FINISHED", flush=True)
"""


def test_uploader_sigkilled_mid_way_leaves_no_manifest_and_collect_completes(fresh_moto, s3_env, tmp_path):
    fresh_moto.create_bucket("runs")
    seed = make_seed(tmp_path / "seed")
    client = fresh_moto.client()
    with FaultProxy(fresh_moto.port, hold_after_parts=2) as proxy:
        child = subprocess.Popen([sys.executable, "-c", CHILD, proxy.endpoint, str(seed), str(tmp_path / "spool")],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert proxy.holding.wait(60), "the child never reached its second multipart part"
            os.kill(child.pid, signal.SIGKILL)
        finally:
            out, _ = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL and "UPLOAD FINISHED" not in out

    listed = {o["Key"] for o in client.list_objects_v2(Bucket="runs").get("Contents", [])}
    assert "p/sw/seed-0/manifest.json" not in listed
    assert client.list_multipart_uploads(Bucket="runs").get("Uploads"), "a multipart upload was cut off"
    store = open_store(f"s3://runs/p?endpoint_url={fresh_moto.endpoint}")
    assert read_manifest(store, "sw/seed-0") is None  # visibly incomplete
    before = collect(store, tmp_path / "nowhere", "sw")
    assert before.incomplete == ["sw/seed-0"] and not before.ok  # the laptop sees it is incomplete

    report = collect(store, tmp_path / "spool", "sw")
    assert report.completed == ["sw/seed-0"] and report.ok, report
    assert_complete(fresh_moto, "runs", seed)
    again = collect(store, tmp_path / "spool", "sw")  # idempotent
    assert again.completed == [] and again.verified == ["sw/seed-0"]
    assert_complete(fresh_moto, "runs", seed)

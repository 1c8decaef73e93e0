"""Staging from S3: a real moto_server on loopback (s3_server.MotoServer: started and stopped by its PID), once
for this module."""
import hashlib
from pathlib import Path

import pytest

from orchestrator.data import DataError, stage_shards
from s3_server import MotoServer, free_port

pytestmark = pytest.mark.integration
SYN = "synthetic://markov?seed=11&states=64&branch=4&doc_len=32&train_shards=2&shard_tokens=300000"


@pytest.fixture(scope="module")
def moto():
    """s3_server.MotoServer's endpoint, waited for until it answers (its first answer can take seconds on a loaded
    machine: a one-second read timeout here once failed all three tests' set-up)."""
    with MotoServer() as s3:
        yield s3.endpoint


@pytest.fixture
def bucket(moto, monkeypatch, tmp_path):
    import boto3

    for k, v in {"AWS_ENDPOINT_URL": moto, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    s3 = boto3.client("s3")
    name = f"shards-{tmp_path.name[-20:].lower().replace('_', '-')}"
    s3.create_bucket(Bucket=name)
    src = tmp_path / "src"
    stage_shards(SYN, src, progress=False)
    sums = ""
    for p in sorted(src.glob("fineweb_*")):
        s3.upload_file(str(p), name, f"fineweb10B/{p.name}")
        sums += f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n"
    return s3, name, src, sums


def test_s3_stage_lists_the_prefix_and_fetches_ranged_parts(bucket, tmp_path):
    s3, name, src, _ = bucket
    r = stage_shards(f"s3://{name}/fineweb10B", tmp_path / "d", part_size=200_000, progress=False)
    assert [f.name for f in r.train_files] == ["fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    for f in r.train_files + r.val_files:
        assert f.read_bytes() == (src / f.name).read_bytes()
    assert stage_shards(f"s3://{name}/fineweb10B", tmp_path / "d", progress=False).bytes_fetched == 0


def test_s3_index_catches_a_corrupted_object(bucket, tmp_path):
    s3, name, src, sums = bucket
    s3.put_object(Bucket=name, Key="fineweb10B/SHA256SUMS", Body=sums.encode())
    raw = bytearray((src / "fineweb_val_000000.bin").read_bytes())
    raw[5000] ^= 0x10
    s3.put_object(Bucket=name, Key="fineweb10B/fineweb_val_000000.bin", Body=bytes(raw))
    with pytest.raises(DataError, match=r"fineweb_val_000000\.bin: fetched twice .* corrupted"):
        stage_shards(f"s3://{name}/fineweb10B", tmp_path / "d", progress=False)


def test_s3_missing_shard_bucket_and_endpoint_are_clear_errors(bucket, tmp_path, monkeypatch):
    _, name, _, _ = bucket
    with pytest.raises(DataError, match=r"fineweb_train_000003\.bin: missing from s3://"):
        stage_shards(f"s3://{name}/fineweb10B", tmp_path / "d", train_shards=3, progress=False)
    with pytest.raises(DataError, match="NoSuchBucket"):
        stage_shards("s3://no-such-bucket/x", tmp_path / "d", progress=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(DataError, match="cannot reach the S3 endpoint"):
        stage_shards(f"s3://{name}/fineweb10B", tmp_path / "d", progress=False)
    assert not (tmp_path / "d").exists()

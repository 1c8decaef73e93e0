"""LocalStore and object-key validation: what a user notices when a key is bad or a write is interrupted."""
from __future__ import annotations

import pytest

from orchestrator.store import PARTIAL_SUFFIX, InvalidKey, LocalStore, StoreError, open_store, sha256_file, validate_key


@pytest.mark.parametrize("key", ["a", "sweep/seed-0/train.log", "s/ckpt/step_000100.pt", "x y/é.txt"])
def test_good_keys_pass(key):
    assert validate_key(key) == key


@pytest.mark.parametrize(
    "key, why",
    [
        ("", "empty"),
        ("../etc/passwd", "'..'"),
        ("a/../../b", "'..'"),
        ("a/./b", "'.'"),
        ("/abs/key", "absolute"),
        ("C:/x", "absolute"),
        ("a//b", "empty path segment"),
        ("a/b/", "empty path segment"),
        ("a\nb", "control"),
        ("a\x00b", "control"),
        ("a\\b", "backslash"),
        ("a" * 1100, "1024"),
        ("x" + PARTIAL_SUFFIX, "reserved"),
    ],
)
def test_bad_keys_name_the_cause(key, why):
    with pytest.raises(InvalidKey, match=why):
        validate_key(key)


def test_round_trip_and_listing(tmp_path):
    store = LocalStore(tmp_path / "store")
    src = tmp_path / "big.bin"
    src.write_bytes(b"x" * 3_000_001)
    store.put_file(src, "sw/seed-0/ckpt/big.bin")
    store.put_bytes(b"hello", "sw/seed-0/train.log")
    store.put_bytes(b"other", "sw/seed-10/train.log")

    assert store.get_bytes("sw/seed-0/train.log") == b"hello"
    assert store.size("sw/seed-0/ckpt/big.bin") == 3_000_001
    assert store.sha256("sw/seed-0/ckpt/big.bin") == sha256_file(src)
    out = store.get_file("sw/seed-0/ckpt/big.bin", tmp_path / "back" / "big.bin")
    assert out.read_bytes() == src.read_bytes()
    # A string prefix, as S3 has it: "seed-1" also matches "seed-10", "seed-0/" only that seed.
    assert [o.key for o in store.list("sw/seed-0/")] == ["sw/seed-0/ckpt/big.bin", "sw/seed-0/train.log"]
    assert [o.key for o in store.list("sw/seed-1")] == ["sw/seed-10/train.log"]
    assert len(store.list()) == 3
    assert store.exists("sw/seed-0/train.log") and not store.exists("sw/seed-0/nope")
    assert store.stat("nope") is None

    store.delete("sw/seed-10/train.log")
    assert not (store.root / "sw" / "seed-10").exists()  # empty directories go with their last object
    assert [o.key for o in store.list("sw/")] == ["sw/seed-0/ckpt/big.bin", "sw/seed-0/train.log"]


def test_overwrite_is_atomic_and_leaves_no_partial(tmp_path, monkeypatch):
    store = LocalStore(tmp_path)
    store.put_bytes(b"old", "k/obj")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("orchestrator.store.os.replace", boom)
    with pytest.raises(StoreError, match="No space left"):
        store.put_bytes(b"new", "k/obj")
    monkeypatch.undo()
    assert store.get_bytes("k/obj") == b"old"
    assert [p.name for p in (tmp_path / "k").iterdir()] == ["obj"]


def test_partial_leftovers_are_hidden_and_removed(tmp_path):
    store = LocalStore(tmp_path)
    store.put_bytes(b"ok", "s/seed-0/a")
    (tmp_path / "s" / "seed-0" / f".b.1234{PARTIAL_SUFFIX}").write_bytes(b"half")  # a killed writer's temp
    assert [o.key for o in store.list("s/")] == ["s/seed-0/a"]
    assert store.abort_partial("s/seed-0/") == 1
    assert store.abort_partial("s/seed-0/") == 0


def test_missing_object_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="no such object"):
        LocalStore(tmp_path).get_bytes("a/b")


def test_open_store_forms(tmp_path):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert open_store(tmp_path.as_uri()).root == tmp_path
    assert open_store(f"file://{tmp_path}").url("a/b") == (tmp_path / "a" / "b").as_uri()
    with pytest.raises(InvalidKey):
        open_store(tmp_path).put_bytes(b"x", "../escape")
    assert not (tmp_path.parent / "escape").exists()


@pytest.mark.parametrize(
    "url, why",
    [
        ("s3://AKIAXXXX:secret@bucket/p", "credentials in a store URL are refused"),
        ("s3:///prefix", "names no bucket"),
        ("s3://bucket/a/../b", "'..'"),
        ("gs://bucket/p", "unknown scheme"),
        ("s3://bucket/p?token=1", "unknown option"),
        ("file://host/x", "file:///absolute"),
    ],
)
def test_open_store_rejects_bad_urls(url, why):
    with pytest.raises(StoreError, match=why) as e:
        open_store(url)
    assert "secret" not in str(e.value)


def test_s3_store_reads_endpoint_from_url_and_environment(monkeypatch):
    pytest.importorskip("boto3")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    s = open_store("s3://bucket/runs/x")
    assert (s.bucket, s.prefix, s.endpoint_url) == ("bucket", "runs/x", "http://127.0.0.1:1")
    assert s.url("sw/seed-0/train.log") == "s3://bucket/runs/x/sw/seed-0/train.log"
    s = open_store("s3://bucket?endpoint_url=http://127.0.0.1:2")
    assert (s.prefix, s.endpoint_url, s.root_url) == ("", "http://127.0.0.1:2", "s3://bucket")

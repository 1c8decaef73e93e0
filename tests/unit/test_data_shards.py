"""The shard format: what we write is what the trainer and the staging checks read back."""
import numpy as np
import pytest

from orchestrator.data import DataError
from orchestrator.data.shards import (BOS, HEADER_BYTES, MAGIC, encode_header, parse_shard_name, read_header,
                                      read_tokens, shard_name, verify_shard, write_shard)


def test_write_then_read_round_trips_header_and_tokens(tmp_path):
    tokens = np.array([BOS, 1, 2, 3, 50255], dtype=np.uint16)
    info = write_shard(tmp_path / "fineweb_train_000001.bin", tokens)
    raw = (tmp_path / "fineweb_train_000001.bin").read_bytes()
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert list(header[:3]) == [MAGIC, 1, 5] and not header[3:].any()
    assert info.size == len(raw) == HEADER_BYTES + 10
    assert read_header(tmp_path / "fineweb_train_000001.bin") == 5
    assert list(read_tokens(tmp_path / "fineweb_train_000001.bin")) == list(tokens)
    assert verify_shard(tmp_path / "fineweb_train_000001.bin", sha256=info.sha256).tokens == 5
    assert not list(tmp_path.glob(".*tmp"))


def test_names_follow_the_hub_layout():
    assert shard_name("train", 1) == "fineweb_train_000001.bin"
    assert shard_name("val", 0) == "fineweb_val_000000.bin"
    assert parse_shard_name("fineweb_val_000000.bin") == ("val", 0)
    assert parse_shard_name("fineweb_train_1.bin") is None


def test_truncated_shard_is_named_with_the_cause(tmp_path):
    path = tmp_path / "fineweb_train_000002.bin"
    write_shard(path, np.arange(100, dtype=np.uint16))
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DataError, match=r"fineweb_train_000002\.bin: truncated"):
        verify_shard(path)


def test_flipped_byte_fails_the_sha256_check(tmp_path):
    path = tmp_path / "fineweb_val_000000.bin"
    info = write_shard(path, np.arange(100, dtype=np.uint16))
    raw = bytearray(path.read_bytes())
    raw[2000 % len(raw) if len(raw) > 2000 else -1] ^= 0xFF
    path.write_bytes(bytes(raw))
    verify_shard(path)  # header and size still look right...
    with pytest.raises(DataError, match="corrupted"):
        verify_shard(path, sha256=info.sha256)  # ...the digest does not


def test_wrong_magic_and_short_header_are_rejected(tmp_path):
    path = tmp_path / "fineweb_train_000003.bin"
    path.write_bytes(b"\0" * 10)
    with pytest.raises(DataError, match="truncated header"):
        verify_shard(path)
    path.write_bytes(encode_header(0)[:4][::-1] + encode_header(0)[4:])
    with pytest.raises(DataError, match="bad magic"):
        verify_shard(path)


def test_out_of_vocabulary_tokens_are_refused(tmp_path):
    with pytest.raises(DataError, match="token ids"):
        write_shard(tmp_path / "fineweb_train_000001.bin", np.array([50257]))
    assert not any(tmp_path.iterdir())

"""stage_shards from the two local sources (synthetic generator, a directory): verified, cached, strict."""
import hashlib
import os

import numpy as np
import pytest

from orchestrator.data import DataError, stage_shards
from orchestrator.data.shards import read_tokens, verify_shard, write_shard
from orchestrator.data.synthetic import MarkovSource

SYN = "synthetic://markov?seed=1&states=64&branch=4&doc_len=32&train_shards=3&shard_tokens=50000"


def _sums(files):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.fixture
def source_dir(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    stage_shards(SYN, src, progress=False)
    return src


def test_synthetic_stage_writes_verified_shards_and_reports_the_entropy_rate(tmp_path):
    r = stage_shards(SYN, tmp_path / "d", train_shards=2, progress=False)
    assert [f.name for f in r.train_files] == ["fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert [f.name for f in r.val_files] == ["fineweb_val_000000.bin"]
    assert r.info["entropy_rate_nats"] == pytest.approx(MarkovSource.from_url(SYN).entropy_rate_nats)
    assert np.array_equal(read_tokens(r.train_files[1]), MarkovSource.from_url(SYN).generate("train", 2))
    for f in r.train_files + r.val_files:
        verify_shard(f)
    assert r.bytes_fetched == 3 * (1024 + 2 * 50000)
    assert not [p for p in (tmp_path / "d").iterdir() if p.name.endswith((".partial", ".tmp"))]


def test_staging_again_is_a_no_op(tmp_path):
    stage_shards(SYN, tmp_path / "d", progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "d").glob("fineweb_*")}
    again = stage_shards(SYN, tmp_path / "d", progress=False)
    assert again.bytes_fetched == 0
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "d").glob("fineweb_*")}


def test_another_seed_into_the_same_directory_replaces_the_shards(tmp_path):
    a = _sums(stage_shards(SYN, tmp_path / "d", progress=False).train_files)
    (tmp_path / "d" / "notes.txt").write_text("mine")
    write_shard(tmp_path / "d" / "fineweb_train_000009.bin", np.arange(5, dtype=np.uint16))  # not staged by us
    r = stage_shards(SYN.replace("seed=1", "seed=2"), tmp_path / "d", train_shards=2, progress=False)
    assert r.bytes_fetched > 0 and not set(_sums(r.train_files).values()) & set(a.values())
    # the old source's third shard would mix two datasets under the trainer's glob: gone; the rest stays
    assert sorted(p.name for p in (tmp_path / "d").glob("fineweb_*")) == [
        "fineweb_train_000001.bin", "fineweb_train_000002.bin", "fineweb_train_000009.bin", "fineweb_val_000000.bin"]
    assert (tmp_path / "d" / "notes.txt").exists()


def test_directory_stage_copies_in_parts_and_repairs_a_damaged_copy(source_dir, tmp_path):
    r = stage_shards(str(source_dir), tmp_path / "d", part_size=8192, progress=False)
    assert _sums(r.train_files + r.val_files) == _sums(sorted(source_dir.glob("fineweb_*")))
    victim = r.train_files[0]
    victim.write_bytes(victim.read_bytes()[:5000])  # someone truncated it
    again = stage_shards(str(source_dir), tmp_path / "d", progress=False)
    assert again.bytes_fetched == victim.stat().st_size == (source_dir / victim.name).stat().st_size


def test_a_damaged_source_copy_is_fetched_twice_then_named(source_dir, tmp_path):
    good = _sums(sorted(source_dir.glob("fineweb_*")))
    (source_dir / ".speedrun-shards.json").unlink()
    (source_dir / "SHA256SUMS").write_text("".join(f"{d}  {n}\n" for n, d in good.items()))
    bad = source_dir / "fineweb_train_000002.bin"
    raw = bytearray(bad.read_bytes())
    raw[-1] ^= 1
    bad.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"fineweb_train_000002\.bin: fetched twice .* corrupted"):
        stage_shards(str(source_dir), tmp_path / "d", progress=False)
    assert not (tmp_path / "d" / "fineweb_train_000002.bin").exists()


def test_a_source_without_the_shard_names_it_and_creates_nothing(source_dir, tmp_path):
    with pytest.raises(DataError, match=r"fineweb_train_000004\.bin: missing from the source directory"):
        stage_shards(str(source_dir), tmp_path / "d", train_shards=4, progress=False)
    assert not (tmp_path / "d").exists()
    with pytest.raises(DataError, match="does not exist"):
        stage_shards(str(tmp_path / "nowhere"), tmp_path / "d", progress=False)
    with pytest.raises(DataError, match="has no such shard"):
        stage_shards(SYN, tmp_path / "d", train_shards=9, progress=False)
    with pytest.raises(DataError, match="unknown source scheme"):
        stage_shards("ftp://x/y", tmp_path / "d", progress=False)


def test_a_shard_with_a_bad_header_in_the_source_is_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_shard(src / "fineweb_train_000001.bin", np.arange(10, dtype=np.uint16))
    (src / "fineweb_val_000000.bin").write_bytes(os.urandom(3000))
    with pytest.raises(DataError, match=r"fineweb_val_000000\.bin: fetched twice .* bad magic"):
        stage_shards(str(src), tmp_path / "d", progress=False)


def test_in_order_digest_matches_sha256_whatever_order_the_parts_land_in(tmp_path):
    from orchestrator.data.parts import InOrderDigest, PartWriter

    data = np.random.default_rng(0).integers(0, 256, 1_000_003, dtype=np.uint8).tobytes()
    parts = [(i, s, min(65536, len(data) - s)) for i, s in enumerate(range(0, len(data), 65536))]
    order = np.random.default_rng(1).permutation(len(parts))
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        digest = InOrderDigest(fd, parts, set())
        for k, i in enumerate(order):
            _, s, n = parts[i]
            w = PartWriter(fd, digest, lambda n: None)
            w.write(s, data[s: s + n // 2])
            if k % 5 == 0:  # a retried part: what was hashed must not be trusted any more
                w.restart(s)
            w.write(s + (0 if k % 5 == 0 else n // 2), data[s + (0 if k % 5 == 0 else n // 2): s + n])
            digest.part_done(i)
        assert digest.finish() == hashlib.sha256(data).hexdigest()
    finally:
        os.close(fd)

"""Shard reading, BOS-aligned micro-batches and the fixed validation slice."""
import numpy as np
import pytest

from trainer.data import (BOS, ShardError, TrainBatches, load_tokens, one_chunk_per_shape, read_header,
                          validation_chunks, write_shard)


def docs_stream(n_docs=400, seed=0):
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(n_docs):
        parts.append([BOS] + list(rng.integers(0, BOS, rng.integers(1, 60))))
    return np.array([t for p in parts for t in p], dtype=np.int64)


@pytest.fixture
def shards(tmp_path):
    tokens = docs_stream()
    half = len(tokens) // 2
    write_shard(str(tmp_path / "fineweb_train_000001.bin"), tokens[:half])
    write_shard(str(tmp_path / "fineweb_train_000002.bin"), tokens[half:])
    write_shard(str(tmp_path / "fineweb_val_000000.bin"), tokens)
    return tmp_path, tokens


def test_header_round_trip(shards):
    d, tokens = shards
    path = str(d / "fineweb_val_000000.bin")
    assert read_header(path) == len(tokens)
    assert np.array_equal(load_tokens(path), tokens)


@pytest.mark.parametrize("corrupt, words", [
    (lambda b: b"\x00" * 4 + b[4:], "magic"),
    (lambda b: b[:4] + (2).to_bytes(4, "little") + b[8:], "version"),
    (lambda b: b[:-2], "bytes but the header declares"),
    (lambda b: b[:100], "truncated"),
])
def test_malformed_shard_is_named_with_its_cause(shards, corrupt, words):
    d, _ = shards
    bad = d / "fineweb_train_000009.bin"
    bad.write_bytes(corrupt((d / "fineweb_train_000001.bin").read_bytes()))
    with pytest.raises(ShardError, match=words) as e:
        read_header(str(bad))
    assert str(bad) in str(e.value)


def test_every_micro_batch_starts_at_a_document(shards):
    d, _ = shards
    files = sorted(str(p) for p in d.glob("fineweb_train_*.bin"))
    batches = TrainBatches(files, seq_len=64, rank=0, world=1, grad_accum_total=4)
    for _ in range(20):   # long enough to cross the shard boundary and wrap around
        for seq in batches.next_step():
            assert seq[0] == BOS and len(seq) == 65


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_split_the_same_global_batch(shards, world):
    d, _ = shards
    files = sorted(str(p) for p in d.glob("fineweb_train_*.bin"))
    single = TrainBatches(files, 64, 0, 1, 4)
    ranks = [TrainBatches(files, 64, r, world, 4) for r in range(world)]
    for _ in range(5):
        want = single.next_step()
        got = [r.next_step() for r in ranks]
        assert all(len(g) == 4 // world for g in got)
        for k, seq in enumerate(want):
            assert np.array_equal(got[k % world][k // world], seq)


def test_loader_state_resumes_the_stream(shards):
    d, _ = shards
    files = sorted(str(p) for p in d.glob("fineweb_train_*.bin"))
    a = TrainBatches(files, 64, 0, 1, 2)
    a.next_step()
    b = TrainBatches(files, 64, 0, 1, 2)
    b.load_state_dict(a.state_dict())
    assert all(np.array_equal(x, y) for x, y in zip(a.next_step(), b.next_step()))


def test_grad_accum_must_split_over_ranks(shards):
    d, _ = shards
    with pytest.raises(ValueError, match="not divisible by 3 ranks"):
        TrainBatches([str(d / "fineweb_train_000001.bin")], 64, 0, 3, 8)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_validation_uses_exactly_the_first_tokens(shards, world):
    d, tokens = shards
    files = [str(d / "fineweb_val_000000.bin")]
    chunks = [c for r in range(world) for c in validation_chunks(files, 1000, 256, r, world)]
    predicted = sum(len(c) - 1 for c in chunks)
    assert predicted == 1000
    starts = sorted(range(0, 1000, 256))
    by_start = {s: c for s, c in zip([s for r in range(world) for s in starts[r::world]], chunks)}
    for s in starts:
        assert np.array_equal(by_start[s], tokens[s:min(s + 256, 1000) + 1])


def test_validation_needs_enough_tokens(shards):
    d, tokens = shards
    with pytest.raises(ShardError, match="fewer than val_tokens"):
        validation_chunks([str(d / "fineweb_val_000000.bin")], len(tokens), 256, 0, 1)


def test_warm_up_validates_one_chunk_of_each_shape(shards):
    d, tokens = shards
    chunks = validation_chunks([str(d / "fineweb_val_000000.bin")], 1000, 256, 0, 1)
    assert [len(c) for c in chunks] == [257, 257, 257, 233]
    picked = one_chunk_per_shape(chunks)
    assert [len(c) for c in picked] == [257, 233]
    assert picked[0] is chunks[0] and picked[1] is chunks[3]

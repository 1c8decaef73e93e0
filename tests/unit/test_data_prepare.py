"""prepare_shards and verify_dir on small jsonl/parquet inputs, with a local toy BPE (no network)."""
import base64
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.data import DataError, prepare_shards, verify_dir
from orchestrator.data.prepare import load_encoding
from orchestrator.data.shards import BOS, read_tokens

DOCS = [f"document {i}: the theory of the thing, {'word ' * (i % 7)}end." for i in range(300)]


@pytest.fixture
def encoding_file(tmp_path):
    """Byte-level BPE with a few merges; ranks < 50256 like GPT-2's, <|endoftext|> = 50256."""
    tokens = [bytes([b]) for b in range(256)] + [b"th", b"the", b" the", b"en", b"end"]
    path = tmp_path / "toy.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    return path


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    return path


def _docs_in(files):
    tokens = np.concatenate([read_tokens(f) for f in files])
    starts = np.flatnonzero(tokens == BOS)
    return np.split(tokens, starts[1:]), tokens


def test_jsonl_becomes_val_then_train_shards_with_bos_before_each_document(jsonl, encoding_file, tmp_path):
    enc = load_encoding(encoding_file)
    r = prepare_shards([jsonl], tmp_path / "out", encoding_file=str(encoding_file), val_docs=20,
                       shard_tokens=3000, workers=2)
    assert [f.name for f in r.val_files] == ["fineweb_val_000000.bin"]
    assert r.train_files[0].name == "fineweb_train_000001.bin" and len(r.train_files) > 1
    val_docs, _ = _docs_in(r.val_files)
    train_docs, train_tokens = _docs_in(r.train_files)
    assert len(val_docs) == 20 and len(train_docs) == 280 and r.documents == 300
    assert enc.decode(val_docs[3][1:].tolist()) == DOCS[3]
    assert enc.decode(train_docs[-1][1:].tolist()) == DOCS[-1]
    assert all(read_tokens(f).size == 3000 for f in r.train_files[:-1])  # full shards but the last
    assert r.tokens == train_tokens.size + sum(d.size for d in val_docs)
    assert [c.ok for c in verify_dir(tmp_path / "out")] == [True] * (len(r.train_files) + 1)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".prepare")]


def test_parquet_and_jsonl_give_the_same_tokens(jsonl, encoding_file, tmp_path):
    pq.write_table(pa.table({"body": DOCS}), tmp_path / "docs.parquet", row_group_size=64)
    a = prepare_shards([tmp_path / "docs.parquet"], tmp_path / "a", encoding_file=str(encoding_file),
                       val_docs=5, text_field="body", workers=1)
    b = prepare_shards([jsonl], tmp_path / "b", encoding_file=str(encoding_file), val_docs=5, workers=2)
    assert np.array_equal(read_tokens(a.train_files[0]), read_tokens(b.train_files[0]))


def test_default_validation_takes_whole_documents_up_to_the_token_budget(jsonl, encoding_file, tmp_path):
    r = prepare_shards([jsonl], tmp_path / "out", encoding_file=str(encoding_file), val_tokens=1000)
    val = read_tokens(r.val_files[0])
    assert val.size >= 1001 and read_tokens(r.train_files[0])[0] == BOS


def test_bad_inputs_are_one_sentence_and_leave_nothing(jsonl, encoding_file, tmp_path):
    out = tmp_path / "out"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n{oops\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        prepare_shards([bad], out, encoding_file=str(encoding_file), val_docs=0)
    assert not out.exists()
    with pytest.raises(DataError, match="no string field 'content'"):
        prepare_shards([jsonl], out, encoding_file=str(encoding_file), text_field="content")
    pq.write_table(pa.table({"body": DOCS}), tmp_path / "docs.parquet")
    with pytest.raises(DataError, match=r"no column 'text' \(columns: body\)"):
        prepare_shards([tmp_path / "docs.parquet"], tmp_path / "never", encoding_file=str(encoding_file))
    with pytest.raises(DataError, match="unknown input format"):
        prepare_shards([encoding_file], tmp_path / "never", encoding_file=str(encoding_file))
    with pytest.raises(DataError, match="all went to validation"):
        prepare_shards([jsonl], tmp_path / "never2", encoding_file=str(encoding_file), val_docs=1000)
    with pytest.raises(DataError, match="no such encoding file"):
        prepare_shards([jsonl], tmp_path / "never", encoding_file=str(tmp_path / "nope.tiktoken"))
    assert not (tmp_path / "never").exists()


def test_without_network_or_a_cache_the_gpt2_download_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    import tiktoken.registry

    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    with pytest.raises(DataError, match="could not download the GPT-2 BPE.*--encoding-file"):
        load_encoding(None)


def test_verify_dir_names_the_damaged_shard(jsonl, encoding_file, tmp_path):
    r = prepare_shards([jsonl], tmp_path / "out", encoding_file=str(encoding_file), val_docs=10, shard_tokens=4000)
    victim = r.train_files[1]
    raw = bytearray(victim.read_bytes())
    raw[2000] ^= 0x01
    victim.write_bytes(bytes(raw))
    checks = {c.name: c for c in verify_dir(tmp_path / "out")}
    assert not checks[victim.name].ok and "corrupted" in checks[victim.name].error
    assert sum(not c.ok for c in checks.values()) == 1
    with pytest.raises(DataError, match="holds no fineweb"):
        verify_dir(tmp_path)

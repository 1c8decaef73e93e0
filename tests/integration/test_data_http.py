"""Staging from a real HTTP server on loopback and from a fake Hugging Face hub: ranges, faults, resume, locks."""
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_http import Fault, ShardServer  # noqa: E402

from orchestrator.data import DataError, stage_shards  # noqa: E402

pytestmark = pytest.mark.integration
SYN = "synthetic://markov?seed=7&states=128&branch=4&doc_len=64&train_shards=4&shard_tokens=200000"
SIZE = 1024 + 2 * 200_000
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("mirror")
    stage_shards(SYN, root, progress=False)
    (root / ".speedrun-shards.json").unlink()
    return root


@pytest.fixture
def server(shards):
    with ShardServer(shards) as s:
        yield s


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _write_index(root: Path) -> None:
    (root / "SHA256SUMS").write_text("".join(f"{_sha(p)}  {p.name}\n" for p in sorted(root.glob("fineweb_*"))))


def _stage_in_subprocess(url: str, dest: Path, **kw) -> subprocess.Popen:
    code = ("import sys; from orchestrator.data import stage_shards; "
            f"stage_shards({url!r}, {str(dest)!r}, progress=False, **{kw!r})")
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.PIPE, text=True)


def test_http_stage_lists_by_probing_and_fetches_ranged_parts(server, shards, tmp_path):
    r = stage_shards(server.url + "/", tmp_path / "d", part_size=100_000, progress=False)
    assert [f.name for f in r.train_files] == [f"fineweb_train_00000{i}.bin" for i in (1, 2, 3, 4)]
    assert all(_sha(f) == _sha(shards / f.name) for f in r.train_files + r.val_files)
    gets = [q for q in server.requests if q.method == "GET" and "fineweb_train_000001" in q.path]
    assert len(gets) == 5 and all(q.range for q in gets)  # 401,024 bytes in 100 kB parts
    state = json.loads((tmp_path / "d" / ".speedrun-shards.json").read_text())["shards"]
    assert state["fineweb_train_000001.bin"]["sha256"] == _sha(shards / "fineweb_train_000001.bin")
    assert stage_shards(server.url, tmp_path / "d", train_shards=4, progress=False).bytes_fetched == 0


def test_credentials_in_the_url_are_used_but_never_recorded(server, tmp_path):
    url = server.url.replace("http://", "http://reader:s3cret@") + "/"
    r = stage_shards(url, tmp_path / "d", train_shards=1, val_shards=0, progress=False)
    assert any(q.authorization and q.authorization.startswith("Basic ") for q in server.requests)
    assert "s3cret" not in str(r.info) and "s3cret" not in (tmp_path / "d" / ".speedrun-shards.json").read_text()
    with pytest.raises(DataError) as e:
        stage_shards(url, tmp_path / "d", train_shards=9, progress=False)
    assert "s3cret" not in str(e.value)


def test_a_server_without_ranges_still_works(server, tmp_path):
    server.faults["fineweb_train_000001.bin"] = Fault(no_ranges=True)
    r = stage_shards(server.url, tmp_path / "d", train_shards=1, val_shards=0, part_size=100_000, progress=False)
    assert r.bytes_fetched == SIZE


def test_a_dropped_connection_is_retried_and_a_corrupted_answer_fetched_again(server, shards, tmp_path):
    _write_index(shards)
    try:
        server.faults["fineweb_train_000001.bin"] = Fault(truncate=True, times=2)
        server.faults["fineweb_train_000002.bin"] = Fault(corrupt=True, times=1)
        r = stage_shards(server.url, tmp_path / "d", train_shards=2, val_shards=0, progress=False)
        assert all(_sha(f) == _sha(shards / f.name) for f in r.train_files)
        gets2 = [q for q in server.requests if q.method == "GET" and q.path.endswith("fineweb_train_000002.bin")]
        assert len(gets2) == 2
    finally:
        (shards / "SHA256SUMS").unlink()


def test_a_shard_corrupted_at_the_source_fails_with_its_name(server, shards, tmp_path):
    _write_index(shards)
    try:
        server.faults["fineweb_train_000003.bin"] = Fault(corrupt=True)
        with pytest.raises(DataError, match=r"fineweb_train_000003\.bin: fetched twice .* corrupted: sha256"):
            stage_shards(server.url, tmp_path / "d", train_shards=3, progress=False)
        assert not (tmp_path / "d" / "fineweb_train_000003.bin").exists()
    finally:
        (shards / "SHA256SUMS").unlink()


def test_one_failed_shard_stops_the_other_transfers(server, tmp_path):
    server.faults["fineweb_train_000001.bin"] = Fault(gone=True)
    for name in ("fineweb_train_000002.bin", "fineweb_train_000003.bin"):
        server.faults[name] = Fault(delay=1.0)  # 1 s per 64 KiB part: 7 s per shard
    with pytest.raises(DataError, match=r"fineweb_train_000001\.bin: disappeared from the source"):
        stage_shards(server.url, tmp_path / "d", train_shards=3, val_shards=0, part_size=65536, workers=3,
                     progress=False)
    assert server.bytes_served("fineweb_train_000002.bin") < SIZE
    assert server.bytes_served("fineweb_train_000003.bin") < SIZE
    assert not (tmp_path / "d" / "fineweb_train_000002.bin").exists()


def test_a_shard_truncated_by_the_server_every_time_is_a_clear_error(server, tmp_path):
    server.faults["fineweb_val_000000.bin"] = Fault(truncate=True)
    with pytest.raises(DataError, match=r"fineweb_val_000000\.bin: transfer failed 4 times"):
        stage_shards(server.url, tmp_path / "d", train_shards=1, progress=False)


def test_missing_shard_and_unreachable_server_are_one_sentence(server, tmp_path):
    with pytest.raises(DataError, match=r"fineweb_train_000005\.bin: not found at http://127\.0\.0\.1:\d+/fineweb"):
        stage_shards(server.url, tmp_path / "d", train_shards=9, progress=False)
    assert not (tmp_path / "d").exists()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but never listening: connection refused
        with pytest.raises(DataError, match=r"cannot reach the source .* refused"):
            stage_shards(f"http://127.0.0.1:{port}/shards", tmp_path / "d", progress=False)


def test_a_stage_killed_mid_transfer_resumes_without_fetching_done_parts_again(server, shards, tmp_path):
    dest = tmp_path / "d"
    server.faults["fineweb_train_000001.bin"] = Fault(delay=0.25)  # each 64 KiB part takes 0.25 s
    proc = _stage_in_subprocess(server.url, dest, train_shards=1, val_shards=0, part_size=65536, workers=2)
    meta = dest / ".fineweb_train_000001.bin.partial.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if meta.exists() and len(json.loads(meta.read_text())["done"]) >= 2:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_parts = len(json.loads(meta.read_text())["done"])
    assert 2 <= done_parts < 7 and not (dest / "fineweb_train_000001.bin").exists()
    server.faults.clear()
    served_before = server.bytes_served("fineweb_train_000001.bin")
    r = stage_shards(server.url, dest, train_shards=1, val_shards=0, part_size=65536, progress=False)
    assert _sha(r.train_files[0]) == _sha(shards / "fineweb_train_000001.bin")
    assert server.bytes_served("fineweb_train_000001.bin") - served_before <= SIZE - done_parts * 65536
    assert not meta.exists()


def test_two_concurrent_stages_fetch_each_shard_once(server, shards, tmp_path):
    dest = tmp_path / "d"
    for name in ("fineweb_train_000001.bin", "fineweb_train_000002.bin"):
        server.faults[name] = Fault(delay=0.005)
    procs = [_stage_in_subprocess(server.url, dest, train_shards=2) for _ in range(2)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    for name in ("fineweb_train_000001.bin", "fineweb_train_000002.bin", "fineweb_val_000000.bin"):
        assert server.bytes_served(name) == SIZE, name
        assert _sha(dest / name) == _sha(shards / name)


# ------------------------------------------------------------------------------------------ hub


@pytest.fixture
def hub(shards, tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "kjj0" / "fineweb10B-gpt2"
    repo.mkdir(parents=True)
    for p in shards.glob("fineweb_*"):
        os.link(p, repo / p.name)
    with ShardServer(tmp_path / "hub", hub=True) as s:
        monkeypatch.setenv("HF_ENDPOINT", s.url)
        monkeypatch.setenv("HF_TOKEN", "hf_secret_for_test")
        yield s


def test_hub_source_follows_resolve_redirects_and_checks_the_linked_etag(hub, shards, tmp_path):
    r = stage_shards("hf://datasets/kjj0/fineweb10B-gpt2", tmp_path / "d", train_shards=2, progress=False)
    assert all(_sha(f) == _sha(shards / f.name) for f in r.train_files + r.val_files)
    resolves = [q for q in hub.requests if "/resolve/main/" in q.path]
    cdn = [q for q in hub.requests if q.path.startswith("/cdn/")]
    assert resolves and all(q.authorization == "Bearer hf_secret_for_test" for q in resolves)
    assert cdn and all(q.authorization is None for q in cdn)  # the token never leaves the hub
    assert all(q.range for q in cdn if q.method == "GET")
    state = json.loads((tmp_path / "d" / ".speedrun-shards.json").read_text())["shards"]
    assert state["fineweb_val_000000.bin"]["sha256"] == _sha(shards / "fineweb_val_000000.bin")


def test_hub_lists_all_train_shards_and_detects_corruption_by_etag(hub, tmp_path):
    hub.faults["fineweb_train_000004.bin"] = Fault(corrupt=True)
    with pytest.raises(DataError, match=r"fineweb_train_000004\.bin: fetched twice .* corrupted"):
        stage_shards("hf://datasets/kjj0/fineweb10B-gpt2", tmp_path / "d", progress=False)
    staged = sorted(p.name for p in (tmp_path / "d").glob("fineweb_*"))
    assert "fineweb_train_000004.bin" not in staged and "fineweb_train_000001.bin" in staged  # earlier shards go first
    assert all(_sha(tmp_path / "d" / n) == _sha(hub.root / "kjj0" / "fineweb10B-gpt2" / n) for n in staged)
    with pytest.raises(DataError, match="fineweb_train_000001.bin: not found"):
        stage_shards("hf://datasets/kjj0/no-such-repo", tmp_path / "e", train_shards=1, progress=False)

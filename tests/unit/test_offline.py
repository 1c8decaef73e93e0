"""Issue 26: what a script fetches at run time, pre-fetched on the launcher (no internet needed here: the
cache folder is made as `speedrun prefetch` leaves it) and restored on the node for the Hugging Face hub
client itself to find offline."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.config import ConfigError, OfflineSpec
from orchestrator.offline import missing, node_env, snapshot_cache
from orchestrator.store import open_store
from orchestrator.workdir import fetch, ship, unpack

REPO = Path(__file__).resolve().parents[2]


def test_a_complete_cache_ships_its_hub_repo_with_links_and_the_hub_client_reads_it_offline(offline_cache, tmp_path):
    spec = OfflineSpec(hf_kernels=["testorg/fake-kernel"], tiktoken=["gpt2"], cache=str(offline_cache))
    assert missing(spec) == []
    snap = snapshot_cache(spec, "job.yaml: offline", "job.yaml")
    assert any(f.startswith("hf/hub/models--testorg--fake-kernel/blobs/") for f in snap.files)
    assert "tiktoken/speedrun-encodings.json" in snap.files
    assert [k for k in snap.links if k.endswith("fake_kernel/__init__.py")]   # the hub's snapshot links stay links

    store = open_store(tmp_path / "store")
    ship(snap, store)
    node = tmp_path / "node"
    unpack(fetch(store, snap.key, snap.sha256, node / "cache"), node / "offline")
    env = node_env(node / "offline", spec)
    assert env["HF_HUB_OFFLINE"] == "1" and env["TIKTOKEN_CACHE_DIR"] == str(node / "offline" / "tiktoken")
    # The hub client, in a fresh process with that environment and a dead endpoint, finds the repo offline.
    assert "def flash_attn_func" in hub_client_reads(env, "main")


def test_a_version_branch_is_its_own_entry_and_the_hub_client_resolves_it_offline(tmp_path):
    """get_kernel(repo, version=1) loads the repo's branch v1 (kernels 0.12 on): `repo@v1` is checked and shipped
    by that ref, which is what the hub client (and kernels' offline version lookup) reads from refs/."""
    from conftest import make_offline_cache

    cache = make_offline_cache(tmp_path / "c", refs=("v1",))
    assert missing(OfflineSpec(hf_kernels=["testorg/fake-kernel@v1"], cache=str(cache))) == []
    assert missing(OfflineSpec(hf_kernels=["testorg/fake-kernel", "testorg/fake-kernel@v2"], cache=str(cache))) == [
        "the hub repo testorg/fake-kernel", "the hub repo testorg/fake-kernel@v2"]
    spec = OfflineSpec(hf_kernels=["testorg/fake-kernel@v1"], cache=str(cache))
    snap = snapshot_cache(spec, "job.yaml: offline", "job.yaml")
    assert "hf/hub/models--testorg--fake-kernel/refs/v1" in snap.files
    # later kernels releases keep kernel repos under the hub's kernel type: the same folder, linked
    assert snap.links["hf/hub/kernels--testorg--fake-kernel"] == "models--testorg--fake-kernel"
    node = tmp_path / "node"
    unpack(snap_to_node(snap, tmp_path), node)
    env = node_env(node, spec)
    assert env["KERNELS_CACHE"] == env["HF_HUB_CACHE"] == str(node / "hf" / "hub")
    assert "def flash_attn_func" in hub_client_reads(env, "v1")
    assert "def flash_attn_func" in hub_client_reads(env, "v1", repo_type="kernel")


def hub_client_reads(env: dict, revision: str, repo_type: str = "model") -> str:
    """The fake kernel's module as the hub client finds it at this revision, in a fresh process with the node's
    environment and a dead endpoint: what get_kernel's download step does offline (kernels up to 0.13 as a model
    repo; later ones as the hub's kernel type, from KERNELS_CACHE, local files only)."""
    code = ("from huggingface_hub import snapshot_download; import os, pathlib; "
            f"p = pathlib.Path(snapshot_download('testorg/fake-kernel', revision={revision!r}, "
            f"repo_type={repo_type!r}, cache_dir=os.environ['KERNELS_CACHE'], local_files_only=True)); "
            "print((p / 'build/torch-universal/fake_kernel/__init__.py').read_text())")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env, "HF_ENDPOINT": "http://127.0.0.1:9"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def snap_to_node(snap, tmp_path: Path) -> Path:
    """The snapshot shipped through a store and fetched back, as the node runner gets it."""
    store = open_store(tmp_path / "store")
    ship(snap, store)
    return fetch(store, snap.key, snap.sha256, tmp_path / "node-cache")


@pytest.mark.parametrize("hub_has_kernel_type", [True, False])
def test_prefetch_takes_the_hubs_kernel_type_else_a_model_and_links_the_other(tmp_path, monkeypatch,
                                                                               hub_has_kernel_type):
    from huggingface_hub import constants

    from orchestrator import offline

    calls = []

    def fake_download(repo, revision, repo_type, cache_dir, allow_patterns):
        calls.append((repo_type, revision, allow_patterns))
        if repo_type == "kernel" and not hub_has_kernel_type:
            raise ValueError("Invalid repo type")
        folder = Path(cache_dir) / f"{repo_type}s--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / revision).write_text("c0ffee")
        (folder / "snapshots" / "c0ffee" / "build" / "v").mkdir(parents=True)

    monkeypatch.setattr(constants, "REPO_TYPES_WITH_KERNEL", [None, "model", "dataset", "space", "kernel"],
                        raising=False)
    offline._download(fake_download, "org/k", "v1", tmp_path, ["build/v/*"])
    real, alias = ("kernels", "models") if hub_has_kernel_type else ("models", "kernels")
    hub = tmp_path / "hf" / "hub"
    assert (hub / f"{alias}--org--k").is_symlink() and os.readlink(hub / f"{alias}--org--k") == f"{real}--org--k"
    assert calls[0] == ("kernel", "v1", ["build/v/*"]) and len(calls) == (1 if hub_has_kernel_type else 2)
    assert missing(OfflineSpec(hf_kernels=["org/k@v1"], hf_variants=["v"], cache=str(tmp_path))) == []


def test_build_variants_named_must_be_in_the_cache(offline_cache):
    spec = OfflineSpec(hf_kernels=["testorg/fake-kernel"], hf_variants=["torch-universal"], cache=str(offline_cache))
    assert missing(spec) == []
    spec = OfflineSpec(hf_kernels=["testorg/fake-kernel"], hf_variants=["torch-universal", "torch211-cxx11-cu130-x86_64-linux"],
                       cache=str(offline_cache))
    assert missing(spec) == ["the hub repo testorg/fake-kernel (build variants torch-universal, "
                             "torch211-cxx11-cu130-x86_64-linux)"]


def test_what_the_cache_lacks_is_one_sentence_saying_how_to_prefetch(offline_cache):
    spec = OfflineSpec(hf_kernels=["kernels-community/flash-attn3"], tiktoken=["gpt2", "cl100k_base"],
                       cache=str(offline_cache))
    assert missing(spec) == ["the hub repo kernels-community/flash-attn3", "the tiktoken encoding cl100k_base"]
    with pytest.raises(ConfigError) as e:
        snapshot_cache(spec, "jobs/r.yaml: offline", "jobs/r.yaml")
    assert str(e.value) == (f"jobs/r.yaml: offline: the hub repo kernels-community/flash-attn3, the tiktoken encoding "
                            f"cl100k_base are not in {offline_cache}; pre-fetch on a machine with internet with "
                            f"`speedrun prefetch jobs/r.yaml` and copy {offline_cache} here, or point offline.cache "
                            "at a folder that holds them")


def test_prefetch_without_internet_is_one_sentence_and_exit_2(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"name": "r", "data": {"source": "synthetic://markov?seed=0"}, "script": "t.py",
                                   "offline": {"hf_kernels": ["kernels-community/flash-attn3"], "cache": "cache"}}))
    (tmp_path / "t.py").write_text("")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "prefetch", str(job)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.startswith("error: offline.hf_kernels: cannot download kernels-community/flash-attn3 from the "
                                 "Hugging Face hub (")
    assert f"run `speedrun prefetch` on a machine with internet and copy {tmp_path / 'cache'} here" in out.stderr
    assert out.stderr.count("\n") == 1


def test_tiktoken_prefetch_without_internet_is_one_sentence_and_records_nothing(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"name": "r", "data": {"source": "synthetic://markov?seed=0"}, "script": "t.py",
                                   "offline": {"tiktoken": ["gpt2"], "cache": "cache"}}))
    (tmp_path / "t.py").write_text("")
    dead = "http://127.0.0.1:9"   # every download goes through a proxy that is not there
    env = {**os.environ, "PYTHONPATH": str(REPO), "HTTPS_PROXY": dead, "HTTP_PROXY": dead, "https_proxy": dead,
           "http_proxy": dead, "NO_PROXY": "", "no_proxy": ""}
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "prefetch", str(job)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.startswith("error: offline.tiktoken: cannot load the encoding gpt2 (") and out.stderr.count("\n") == 1
    assert not (tmp_path / "cache" / "tiktoken" / "speedrun-encodings.json").exists()

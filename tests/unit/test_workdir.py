"""Issue 26: a job's workdir is shipped as git would ship it, refused past its size guard, packed into a tar
that names its content, and unpacked on the node; the compile cache of a script is keyed on that tar."""
from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from orchestrator.compile_cache import cache_key, code_hash
from orchestrator.config import ConfigError
from orchestrator.store import open_store
from orchestrator.workdir import fetch, list_files, ship, snapshot_workdir, unpack


def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


RECORD = {
    "train_gpt.py": "import triton_kernels\n",
    "triton_kernels.py": "X = 1\n",
    "README.md": "# my record\n",
    ".gitignore": "logs/\n*.pt\n!keep.pt\n/data/*.bin\n",
    "logs/old-run.txt": "step:1/1\n",
    "ckpt.pt": "weights",
    "keep.pt": "small, shipped on purpose",
    "data/cached_fineweb10B.py": "# the download script is code\n",
    "data/fineweb10B/fineweb_train_000001.bin": "shard",   # never shipped: the node links the staged shards here
    "data/stray.bin": "ignored by /data/*.bin",
    "kernels/.gitignore": "build/\n",
    "kernels/attn.py": "Y = 2\n",
    "kernels/build/attn.so": "compiled here",
    "kernels/__pycache__/attn.cpython-311.pyc": "bytecode",
    ".git/HEAD": "ref: refs/heads/main\n",
}


def test_the_folder_ships_what_git_would_ship(tmp_path):
    root = write(tmp_path / "rec", RECORD)
    os.symlink("triton_kernels.py", root / "kernels_link.py")   # a link inside the folder stays a link
    os.symlink(root / "kernels" / "attn.py", root / "abs_link.py")   # made relative: it must point there on the node
    files, links = list_files(root, "job.yaml: workdir")
    assert files == [".gitignore", "README.md", "data/cached_fineweb10B.py", "keep.pt", "kernels/.gitignore",
                     "kernels/attn.py", "train_gpt.py", "triton_kernels.py"]
    assert links == {"kernels_link.py": "triton_kernels.py", "abs_link.py": "kernels/attn.py"}


def test_the_tar_depends_on_contents_not_on_times_and_names_a_change(tmp_path):
    root = write(tmp_path / "rec", RECORD)
    a = snapshot_workdir(root, "train_gpt.py", 1e6, "k")
    os.utime(root / "train_gpt.py", (1, 1))
    assert snapshot_workdir(root, "train_gpt.py", 1e6, "k").sha256 == a.sha256
    (root / "triton_kernels.py").write_text("X = 2\n")
    assert snapshot_workdir(root, "train_gpt.py", 1e6, "k").sha256 != a.sha256
    (root / "triton_kernels.py").write_text("X = 1\n")
    (root / "train_gpt.py").chmod(0o755)   # an exec bit is part of what is shipped
    assert snapshot_workdir(root, "train_gpt.py", 1e6, "k").sha256 != a.sha256
    assert a.key == f"workdirs/{a.sha256}.tar"
    assert a.summary() == {"root": str(root), "entry": "train_gpt.py", "files": 8, "bytes": a.bytes, "sha256": a.sha256,
                           "key": a.key}


def test_a_workdir_past_the_size_guard_is_one_sentence_naming_its_largest_file(tmp_path):
    root = write(tmp_path / "rec", {"train_gpt.py": "x", "dump.npy": "0" * 3_000_000})
    with pytest.raises(ConfigError) as e:
        snapshot_workdir(root, "train_gpt.py", 2e6, "jobs/x.yaml: workdir")
    assert str(e.value) == (f"jobs/x.yaml: workdir: {root} ships 3.0 MB (largest: dump.npy, 3.0 MB), more than "
                            "workdir_max_mb: 2; add what the script does not need to .gitignore or raise workdir_max_mb")
    (root / ".gitignore").write_text("*.npy\n")
    assert snapshot_workdir(root, "train_gpt.py", 2e6, "k").files == [".gitignore", "train_gpt.py"]


def test_an_unreadable_file_or_a_broken_link_is_named(tmp_path):
    root = write(tmp_path / "rec", {"train_gpt.py": "x"})
    os.symlink("gone.py", root / "helper.py")
    with pytest.raises(ConfigError, match=r"^k: .*/helper.py is a broken link; fix it or add it to .*/\.gitignore$"):
        snapshot_workdir(root, "train_gpt.py", 1e6, "k")
    (root / "helper.py").unlink()
    os.mkfifo(root / "pipe")
    with pytest.raises(ConfigError, match=r"/pipe is not a readable file"):
        snapshot_workdir(root, "train_gpt.py", 1e6, "k")


def test_an_entry_script_left_out_by_gitignore_is_refused(tmp_path):
    root = write(tmp_path / "rec", {"train_gpt.py": "x", ".gitignore": "*.py\n"})
    with pytest.raises(ConfigError, match="the entry script train_gpt.py is not shipped"):
        snapshot_workdir(root, "train_gpt.py", 1e6, "k")


def test_shipped_once_fetched_checked_and_unpacked(tmp_path):
    root = write(tmp_path / "rec", RECORD)
    os.symlink("triton_kernels.py", root / "kernels_link.py")
    store = open_store(tmp_path / "store")
    snap = snapshot_workdir(root, "train_gpt.py", 1e6, "k")
    assert ship(snap, store) is True and ship(snap, store) is False   # content-addressed: once
    assert store.sha256(snap.key) == snap.sha256

    node = tmp_path / "node"
    archive = fetch(store, snap.key, snap.sha256, node / "cache")
    names = unpack(archive, node / "seed-0" / "script")
    assert sorted(names) == sorted(snap.files + list(snap.links))
    run = node / "seed-0" / "script"
    assert (run / "kernels/attn.py").read_text() == "Y = 2\n" and not (run / "logs").exists()
    assert os.readlink(run / "kernels_link.py") == "triton_kernels.py"
    with tarfile.open(archive) as tar:
        assert {m.mtime for m in tar.getmembers()} == {0}
    unpack(archive, run)   # a second attempt of the seed unpacks over the first
    assert (run / "train_gpt.py").read_text() == "import triton_kernels\n"

    # an object that is not what the plan names is refused, not run
    store.put_bytes(b"not the tar", snap.key)
    with pytest.raises(RuntimeError, match="is not the .* the plan names"):
        fetch(store, snap.key, snap.sha256, tmp_path / "other-node")


def test_compile_cache_key_is_the_trainers_or_the_shipped_scripts():
    trainer = cache_key(code_hash(None, "0123456789abcdef"), "2.11.0+cu130", "NVIDIA H200")
    assert trainer == "compile-cache/0123456789abcdef-2.11.0+cu130-NVIDIA_H200.tar"
    script_a = cache_key(code_hash("a" * 64, "0123456789abcdef"), "2.11.0+cu130", "NVIDIA H200")
    script_b = cache_key(code_hash("b" * 64, "0123456789abcdef"), "2.11.0+cu130", "NVIDIA H200")
    assert script_a == f"compile-cache/script-{'a' * 16}-2.11.0+cu130-NVIDIA_H200.tar"
    assert len({trainer, script_a, script_b}) == 3
    # torch and the GPU model are part of the key for a script too
    assert cache_key(code_hash("a" * 64, "x"), "2.12.0", "NVIDIA H200") != script_a
    assert cache_key(code_hash("a" * 64, "x"), "2.11.0+cu130", "NVIDIA H100 80GB HBM3") != script_a


def test_the_script_dir_links_the_staged_shards_and_makes_the_folders_it_writes_to(tmp_path):
    from orchestrator.workdir import prepare_script_dir

    root = write(tmp_path / "rec", RECORD)
    store = open_store(tmp_path / "store")
    snap = snapshot_workdir(root, "train_gpt.py", 1e6, "k")
    ship(snap, store)
    staged = write(tmp_path / "staged", {"fineweb_train_000001.bin": "shard"})
    run = tmp_path / "seed-0" / "script"
    names = prepare_script_dir(store, snap.summary(), run, staged, ["logs/final"], tmp_path / "cache")
    assert sorted(names) == snap.files
    assert (run / "data/fineweb10B/fineweb_train_000001.bin").read_text() == "shard"
    assert (run / "data/cached_fineweb10B.py").is_file() and (run / "logs/final").is_dir()
    # a retry on a node whose shards now live elsewhere follows them
    moved = write(tmp_path / "staged2", {"fineweb_train_000001.bin": "shard 2"})
    prepare_script_dir(store, snap.summary(), run, moved, ["logs/final"], tmp_path / "cache")
    assert (run / "data/fineweb10B/fineweb_train_000001.bin").read_text() == "shard 2"

"""Shared test set-up: every test gets its own SPEEDRUN_HOME so the local runs index never leaks."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Without a GPU, the Triton kernels of trainer/kernels run under Triton's interpreter (numpy on the CPU), so
# their tests check the very same kernel code here that runs compiled on the GPU. Set before any kernel
# module is imported: @triton.jit reads it when it decorates.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_speedrun_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("speedrun-home")
    monkeypatch.setenv("SPEEDRUN_HOME", str(home))
    yield home


@pytest.fixture
def repo() -> Path:
    return REPO


def tree(root: Path) -> set[str]:
    """Every path under root, for 'created nothing' assertions."""
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


@pytest.fixture(scope="module")
def torch_one_thread():
    """In-process training on one torch thread, as each torchrun rank runs: on the 2 CI cores a second thread
    only spins. A test module asks for it with pytestmark = pytest.mark.usefixtures("torch_one_thread")."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cpu_env(monkeypatch):
    """Keep torch from oversubscribing the 2 CI cores."""
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))


def make_offline_cache(root: Path, repo: str = "testorg/fake-kernel", encodings: tuple[str, ...] = ("gpt2",),
                       refs: tuple[str, ...] = ("main",)) -> Path:
    """A launcher's offline cache folder as `speedrun prefetch` leaves it, made without the internet: hf/ in the
    hub cache's own layout (refs/<each of refs> -> snapshots/<commit>/ whose files link to blobs/), tiktoken/ with
    a cached file and the record of the encodings loaded into it."""
    import hashlib
    import json

    folder = root / "hf" / "hub" / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    content = b"def flash_attn_func(q, k, v): ...\n"
    blob = hashlib.sha256(content).hexdigest()
    (folder / "blobs").mkdir(parents=True)
    (folder / "blobs" / blob).write_bytes(content)
    (folder / "refs").mkdir()
    for ref in refs:
        (folder / "refs" / ref).write_text(commit)
    snap = folder / "snapshots" / commit / "build" / "torch-universal" / "fake_kernel"
    snap.mkdir(parents=True)
    os.symlink(f"../../../../../blobs/{blob}", snap / "__init__.py")
    tik = root / "tiktoken"
    tik.mkdir(parents=True)
    (tik / hashlib.sha1(b"https://example.invalid/vocab.bpe").hexdigest()).write_text("cached vocabulary")
    (tik / "speedrun-encodings.json").write_text(json.dumps(list(encodings)))
    return root


@pytest.fixture
def offline_cache(tmp_path) -> Path:
    return make_offline_cache(tmp_path / "offline-cache")

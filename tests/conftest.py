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


@pytest.fixture
def cpu_env(monkeypatch):
    """Keep torch from oversubscribing the 2 CI cores."""
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))

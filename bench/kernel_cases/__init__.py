"""The cases bench/kernels.py times: one module per kernel family, each registering its rows with @case.

A case builds its inputs at the trainer's real shapes and returns (torch_fn, triton_fn), two no-argument
callables doing the same work: the baseline (what the trainer runs without the kernel) and the kernel.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
TOKENS, DIM, HIDDEN, LAYERS, ACCUM = 48 * 1024, 768, 4 * 768, 12, 8   # the record's micro-batch and model
@dataclass
class Case:
    name: str
    shape: str
    build: Callable[[], tuple[Callable[[], object], Callable[[], object]]]
    calls_per_step: int = 0   # times the trainer runs this per optimizer step (0: not a trainer call)


CASES: list[Case] = []


def case(name: str, shape: str, calls_per_step: int = 0):
    """Register a benchmark: the decorated function builds inputs and returns (torch_fn, triton_fn)."""
    def register(build):
        CASES.append(Case(name, shape, build, calls_per_step))
        return build
    return register


"""Checkpoints: OUT/ckpt/step_NNNNNN.pt and OUT/ckpt/final.pt, written atomically by rank 0; and the request to
checkpoint and stop (SIGUSR1 or OUT/CHECKPOINT_NOW) that the node runner makes before a preemption."""
from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import torch

STEP_RE = re.compile(r"^step_(\d{6,})\.pt$")


def step_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / "ckpt" / f"step_{step:06d}.pt"


def final_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / "ckpt" / "final.pt"


def save(path: Path, state: dict) -> None:
    """Write to a temporary name, then rename: a preempted save never leaves a half checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def newest(out_dir: str | Path) -> Path | None:
    """final.pt if the run finished, else the step_NNNNNN.pt with the highest step, else None."""
    d = Path(out_dir) / "ckpt"
    if final_path(out_dir).is_file():
        return final_path(out_dir)
    steps = sorted((int(m.group(1)), p) for p in d.glob("step_*.pt") if (m := STEP_RE.match(p.name)))
    return steps[-1][1] if steps else None


def resolve(resume: str | None, out_dir: str | Path) -> Path | None:
    """--resume auto -> newest checkpoint (or None to start fresh); --resume PATH -> that file."""
    if not resume:
        return None
    if resume == "auto":
        return newest(out_dir)
    p = Path(resume)
    if not p.is_file():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint file; give a ckpt/*.pt path or 'auto'")
    return p


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


class StopRequest:
    """Set by SIGUSR1 or by the file OUT/CHECKPOINT_NOW; the ranks agree on it at check steps."""

    def __init__(self, out_dir: Path):
        self.file = out_dir / "CHECKPOINT_NOW"
        self.signalled = False
        try:
            signal.signal(signal.SIGUSR1, self._on_signal)
        except ValueError:  # not the main thread (tests that call run() from a thread)
            pass

    def _on_signal(self, *_):
        self.signalled = True

    def asked(self) -> bool:
        return self.signalled or self.file.exists()

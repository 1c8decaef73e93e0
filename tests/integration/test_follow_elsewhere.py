"""A sweep launched from one working directory and HOME is followed, listed and cancelled from another
that knows nothing but the store URL (its own index is empty): handle.json in the store is enough."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
QUICK = ["trainer.steps=12", "trainer.val_every=6", "trainer.val_tokens=4096", "trainer.seq_len=256",
         "trainer.grad_accum_total=1", "trainer.window_max_blocks=2", "checkpoint.final=false",
         "cluster.gpus_per_node=1"]


class Machine:
    """One place the CLI runs from: its own working directory and HOME (so its own ~/.cache/speedrun)."""

    def __init__(self, root: Path):
        self.cwd = root / "cwd"
        self.cwd.mkdir(parents=True)
        (root / "home").mkdir()
        self.env = {k: v for k, v in os.environ.items() if k != "SPEEDRUN_HOME"}
        self.env.update(HOME=str(root / "home"), COLUMNS="250", OMP_NUM_THREADS="1")

    def __call__(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=self.cwd, env=self.env,
                              capture_output=True, text=True, timeout=timeout)


def test_launch_here_follow_from_elsewhere_with_only_the_store_url(tmp_path):
    store = str(tmp_path / "store")
    laptop, other = Machine(tmp_path / "laptop"), Machine(tmp_path / "other")
    sets = [x for s in [*QUICK, f"cluster.data_dir={tmp_path / 'data'}", f"cluster.work_dir={tmp_path / 'work'}"]
            for x in ("--set", s)]
    launched = laptop("launch", str(REPO / "jobs" / "smoke.yaml"), "--store", store, "--detach", *sets)
    assert launched.returncode == 0, launched.stdout + launched.stderr
    sweep = re.search(r"launched (\S+) on", launched.stdout).group(1)
    assert (tmp_path / "laptop" / "home" / ".cache" / "speedrun" / "runs.json").is_file()

    # the other place: nothing in its own index, so without the store it finds nothing, in one sentence
    lost = other("status", sweep[:12])
    assert lost.returncode == 2 and "not in" in lost.stderr and "--store URL" in lost.stderr, lost.stderr
    assert sweep not in other("status").stdout

    # with the store URL: a prefix follows the logs to the end, `last` and the listing see the same sweep
    logs = other("logs", "-f", sweep[:20], "--store", store)
    assert logs.returncode == 0 and "[node] all seeds done" in logs.stdout, logs.stdout[-3000:] + logs.stderr
    status = other("status", "last", "--store", store)
    assert status.returncode == 0 and f"{sweep}: SUCCEEDED" in status.stdout, status.stdout + status.stderr
    listing = other("status", "--store", store)
    assert listing.returncode == 0 and sweep in listing.stdout and "SUCCEEDED" in listing.stdout, listing.stdout

    # a second, long sweep: listed newest first, and cancelled from the other place by `last`
    long_sets = [*sets, "--set", "trainer.steps=100000"]
    second = laptop("launch", str(REPO / "jobs" / "smoke.yaml"), "--store", store, "--detach", *long_sets)
    newer = re.search(r"launched (\S+) on", second.stdout).group(1)
    listing = other("status", "--store", store).stdout
    assert listing.index(newer) < listing.index(sweep), listing
    cancelled = other("cancel", "last", "--store", store)
    assert cancelled.returncode == 0 and f"{newer}: cancel requested; now CANCELLED" in cancelled.stdout, \
        cancelled.stdout + cancelled.stderr
    assert f"{newer}: CANCELLED" in laptop("status", newer).stdout

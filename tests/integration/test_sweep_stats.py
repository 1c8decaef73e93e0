"""A real 3-seed sweep on the local backend (CPU trainer, synthetic shards), then `speedrun stats` and
`speedrun report` on what it left in the local directory store."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.artifacts import read_manifest, verify_manifest
from orchestrator.store import open_store

REPO = Path(__file__).resolve().parents[2]
SPEEDRUN = [sys.executable, "-m", "orchestrator.cli"]
STEPS = 4
TINY = [f"trainer.steps={STEPS}", "trainer.val_every=4", "trainer.seq_len=256", "trainer.val_seq_len=1024",
        "trainer.val_tokens=4096", "cluster.gpus_per_node=1",
        "checkpoint.final=false"]  # no 100s-of-MB checkpoint to upload per seed


def run(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    # Own session, so that a hung run can be stopped by its process group id (ours), never by name.
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(argv[3:5])} did not finish in {timeout} s:\n{out[-3000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, "")


@pytest.mark.integration
def test_three_seed_sweep_stats_and_report(tmp_path):
    store_dir = tmp_path / "store"
    sets = [*TINY, f"cluster.data_dir={tmp_path / 'data'}", f"cluster.work_dir={tmp_path / 'work'}"]
    launch = run([*SPEEDRUN, "launch", "jobs/smoke.yaml", "--seeds", "3", "--store", str(store_dir),
                  *[a for s in sets for a in ("--set", s)]], timeout=900)
    assert launch.returncode == 0, launch.stdout[-3000:]
    store = open_store(str(store_dir))
    (sweep,) = {o.key.split("/")[0] for o in store.list("")}

    stats = run([*SPEEDRUN, "stats", sweep, "--store", str(store_dir), "--json"], timeout=120)
    assert stats.returncode == 0, stats.stdout
    d = json.loads(stats.stdout[stats.stdout.index("{"):])
    assert [r["name"] for r in d["runs"]] == ["seed-0", "seed-1", "seed-2"]
    assert d["n_complete"] == 3 and d["failed"] == []
    assert all(r["val_loss"] < 10.9 and r["train_time_s"] > 0 for r in d["runs"])  # trained, and timed
    assert d["val_loss_std"] is not None and d["p_value"] is not None  # a tiny CPU model is far from 3.28

    table = run([*SPEEDRUN, "stats", sweep, "--store", str(store_dir)], timeout=120)
    assert table.returncode == 0 and "3 of 3" in table.stdout

    report = run([*SPEEDRUN, "report", sweep, "--store", str(store_dir), "--out", str(tmp_path / "plots")], timeout=120)
    assert report.returncode == 0, report.stdout
    manifest = read_manifest(store, f"{sweep}/report")
    assert {f.key for f in manifest.files} >= {"val_loss_vs_step.png", "val_loss_vs_time.png",
                                               "train_time_distribution.png"}
    assert verify_manifest(store, manifest) == []
    for f in manifest.files:
        if f.key.endswith(".png"):
            assert store.get_bytes(f"{sweep}/report/{f.key}")[:4] == b"\x89PNG" and f.size > 10_000

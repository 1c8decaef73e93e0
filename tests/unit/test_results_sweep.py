"""Loading a sweep from the (local directory) store and raw log files into per-seed summaries."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.log_files import summaries_from_logs
from orchestrator.results import ResultsError, load_sweep, load_sweep_runs
from orchestrator.stats import sweep_stats
from orchestrator.store import open_store

LOGS = Path(__file__).resolve().parents[1] / "data" / "logs"
SWEEP = "smoke-20261125T090000Z-abc123"


def put_seed(store, seed, log_name, manifest=True, state="succeeded"):
    store.put_bytes((LOGS / log_name).read_bytes(), f"{SWEEP}/seed-{seed}/train.log")
    store.put_bytes(json.dumps({"state": state, "exit_code": 0 if state == "succeeded" else 1}).encode(),
                    f"{SWEEP}/seed-{seed}/timings.json")
    if manifest:
        store.put_bytes(json.dumps({"prefix": f"{SWEEP}/seed-{seed}", "files": [], "created_at": 0, "format": 1}
                                   ).encode(), f"{SWEEP}/seed-{seed}/manifest.json")


@pytest.fixture
def store(tmp_path):
    s = open_store(str(tmp_path / "store"))
    put_seed(s, 0, "ours_complete.txt")
    put_seed(s, 1, "modded_record.txt")
    put_seed(s, 2, "ours_oom.txt", state="failed")
    put_seed(s, 3, "ours_complete.txt", manifest=False)  # upload never finished
    put_seed(s, 5, "ours_complete.txt", state="failed")  # whole log, but the trainer crashed at exit
    s.put_bytes(json.dumps({"seeds": [0, 1, 2, 3, 4]}).encode(), f"{SWEEP}/plan.json")  # seed 4 never started
    return s


def test_sweep_seeds_and_their_states(store):
    runs = {r.seed: r for r in load_sweep(store, SWEEP)}
    assert sorted(runs) == [0, 1, 2, 3, 4, 5]
    assert not runs[5].complete and runs[5].reason == "node runner marked it failed"
    assert runs[0].complete and runs[1].complete
    assert runs[1].val_loss == pytest.approx(3.2772) and runs[1].peak_mem_mib == 34004
    assert not runs[2].complete and "failed" in runs[2].reason and "OutOfMemoryError" in runs[2].reason
    assert not runs[3].complete and "no manifest.json" in runs[3].reason
    assert not runs[4].complete and "no objects" in runs[4].reason


def test_sweep_stats_use_only_complete_seeds(store):
    s = sweep_stats(load_sweep(store, SWEEP))
    assert s.n_complete == 2 and sorted(r.name for r in s.failed) == ["seed-2", "seed-3", "seed-4", "seed-5"]
    assert s.val_loss_mean == pytest.approx((3.2712 + 3.2772) / 2)


def test_sweep_runs_carry_curves_for_plots(store):
    runs = load_sweep_runs(store, SWEEP + "/")
    assert [len(r.result.val_points) if r.result else 0 for r in runs] == [5, 15, 3, 5, 0, 5]


def test_unknown_sweep_is_one_clear_error(store):
    with pytest.raises(ResultsError, match="no seed-<n>/ objects"):
        load_sweep(store, "nope-20260101T000000Z-000000")


def test_raw_logs_named_by_file():
    paths = sorted(LOGS.glob("*.txt"))
    got = {s.name: s for s in summaries_from_logs(paths)}
    assert got["modded_record.txt"].complete and got["modded_2024.txt"].complete and got["ours_complete.txt"].complete
    assert not got["modded_truncated.txt"].complete and not got["ours_oom.txt"].complete
    assert all(s.seed is None for s in got.values())


def test_missing_log_file_is_one_clear_error(tmp_path):
    with pytest.raises(ResultsError, match=r"nope\.txt does not exist"):
        summaries_from_logs([LOGS / "ours_complete.txt", tmp_path / "nope.txt"])

"""orchestrator/runs.py: which sweep a user means (whole id, prefix, `last`), from the index and the store."""
from __future__ import annotations

import pytest

from orchestrator.cli import main
from orchestrator.config import ConfigError
from orchestrator.runs import SweepRecord, find_sweep, launched_at, newest_first, recent_sweeps, record_sweep, resolve_sweep_id
from orchestrator.store import LocalStore

OLD = "smoke-20261201T090000Z-aaa111"
NEW = "smoke-20261202T090000Z-bbb222"
OTHER = "speedrun-20261130T120000Z-ccc333"


def test_ids_newest_first_by_their_timestamp():
    assert launched_at(NEW) - launched_at(OLD) == 86400 and launched_at("not-an-id") is None
    assert newest_first([OLD, OTHER, NEW]) == [NEW, OLD, OTHER]


def test_last_whole_ids_and_unambiguous_prefixes():
    known = [OLD, NEW, OTHER]
    assert resolve_sweep_id("last", known, "x") == NEW
    assert resolve_sweep_id(OLD, known, "x") == OLD
    assert resolve_sweep_id("speed", known, "x") == OTHER
    assert resolve_sweep_id("smoke-20261201", known, "x") == OLD
    with pytest.raises(ConfigError, match=r"run 'smoke': 2 runs in x start with it \(smoke-20261202T090000Z-bbb222, "):
        resolve_sweep_id("smoke", known, "x")
    with pytest.raises(ConfigError, match="run 'nope': not in x; list runs with `speedrun status --store URL`"):
        resolve_sweep_id("nope", known, "x")
    with pytest.raises(ConfigError, match="no runs in x"):
        resolve_sweep_id("last", [], "x")


def _record(sweep_id, url):
    return SweepRecord(sweep_id, url, "cluster_configs/local.yaml", "jobs/smoke.yaml", launched_at(sweep_id),
                       {"backend": "local", "sweep_id": sweep_id, "job_ids": ["1"], "data": {}})


def test_a_sweep_known_only_to_the_store_is_found_by_prefix(tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "store")
    monkeypatch.setenv("SPEEDRUN_HOME", str(tmp_path / "launcher"))
    for sweep in (OLD, NEW):
        store.put_bytes(b"{}", f"{sweep}/plan.json")
        record_sweep(_record(sweep, str(tmp_path / "store")), store)
    monkeypatch.setenv("SPEEDRUN_HOME", str(tmp_path / "elsewhere"))  # another machine: empty index
    with pytest.raises(ConfigError, match="2 runs in .* nor in the store .* start with it"):
        find_sweep("smoke-2026120", store)
    assert find_sweep("smoke-20261202", store).sweep_id == NEW
    assert find_sweep("last", store).handle["sweep_id"] == NEW
    with pytest.raises(ConfigError, match=r"not in .*elsewhere/runs.json; list runs with `speedrun status --store URL`"):
        find_sweep(NEW, None)
    assert [r.sweep_id for r in recent_sweeps(store)] == [NEW, OLD]
    assert [r.sweep_id for r in recent_sweeps(store, limit=1)] == [NEW]


def test_status_of_an_unknown_run_is_bad_input(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPEEDRUN_HOME", str(tmp_path / "home"))
    assert main(["status", "nope", "--store", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err
    assert "run 'nope': not in" in err and "nor in the store" in err and not (tmp_path / "store").exists()
    assert main(["status", "--limit", "0"]) == 2 and "--limit 0: must be >= 1" in capsys.readouterr().err

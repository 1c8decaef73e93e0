"""Issue 23: bad input is one sentence and exit 2, checked before anything is planned or created."""
from __future__ import annotations

import pytest

from orchestrator.cli import main
from orchestrator.sweep import MAX_SEEDS


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "1000000000"], f"--seeds 1000000000: must be from 1 to {MAX_SEEDS} (a sweep's bound)"),
    (["--seeds", "0"], f"--seeds 0: must be from 1 to {MAX_SEEDS}"),
    (["--set", "seeds=1000000000"], f"jobs/smoke.yaml: seeds: must be <= {MAX_SEEDS} (got 1000000000)"),
    (["--set", "seeds=-2"], "jobs/smoke.yaml: seeds: must be >= 1 (got -2)"),
])
def test_a_seed_count_out_of_bounds_is_one_sentence_and_exit_2(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))   # the run index must stay empty: nothing is created
    assert main(["launch", "jobs/smoke.yaml", *argv, "--dry-run", "--store", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err
    assert message in err and "must be must be" not in err and err.count("\n") == 1
    assert not (tmp_path / "store").exists()


def test_seeds_given_twice_is_refused_not_silently_picked(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    argv = ["launch", "jobs/smoke.yaml", "--seeds", "3", "--set", "seeds=5", "--dry-run", "--store", str(tmp_path / "s")]
    assert main(argv) == 2
    assert "--seeds 3 and --set seeds=5: two seed counts; give one of them" in capsys.readouterr().err


def test_collect_of_a_run_that_is_nowhere_is_bad_input(tmp_path, monkeypatch, capsys):
    """No spool and no such sweep in the store: one sentence and exit 2, not 'nothing to collect' and 0."""
    monkeypatch.setenv("HOME", str(tmp_path))
    argv = ["collect", "smoke-20990101T000000Z-000000", "--store", str(tmp_path / "store"), "--spool", str(tmp_path / "x")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "collect smoke-20990101T000000Z-000000: no spool at" in err and "no such sweep in" in err

"""Issue 23's first complaint: tables cut figures to `3.2…` at 80 columns and in pipes. Every figure stays whole."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from orchestrator import cli_results
from orchestrator.cli import main
from orchestrator.terminal import OutputConsole

LOGS = Path(__file__).resolve().parents[1] / "data" / "logs"


@pytest.fixture
def three(tmp_path) -> list[str]:
    """Three logs named as downloaded record logs are (a uuid each): the names take the table's width."""
    out = []
    for i, name in enumerate(("modded_record.txt", "modded_2024.txt", "ours_complete.txt")):
        dest = tmp_path / f"{i}e4d3f8a-5b6c-4d7e-8f90-a1b2c3d4e5f{i}.txt"
        dest.write_bytes((LOGS / name).read_bytes())
        out.append(str(dest))
    return out


def figures(capsys, logs) -> list[str]:
    """Each log's val loss and train time as the stats table prints them, and its name, from the --json output."""
    assert main(["stats", *logs, "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    return [f"{r['val_loss']:.4f}" for r in runs] + [f"{r['train_time_s']:.2f}" for r in runs] + [r["name"] for r in runs]


def test_stats_in_a_pipe_prints_every_figure_whole(monkeypatch, capsys, three):
    want = figures(capsys, three)
    monkeypatch.setenv("COLUMNS", "80")   # what a CI log or `| tee` gets
    assert main(["stats", *three]) == 0
    out = capsys.readouterr().out
    assert "…" not in out and all(w in out for w in want), out


def test_a_failed_seeds_panel_in_a_pipe_is_as_wide_as_its_text(monkeypatch, capsys):
    cut = str(LOGS / "record_2025-01-04_softcap_cut.txt")
    assert main(["stats", cut]) == 0
    out = capsys.readouterr().out
    assert "cut mid-write" in out and max(len(line) for line in out.splitlines()) < 200, out


def test_stats_on_a_narrow_terminal_wraps_cells_instead_of_cutting_them(monkeypatch, three):
    buf = io.StringIO()
    monkeypatch.setattr(cli_results, "console", OutputConsole(file=buf, force_terminal=True, width=60))
    assert main(["stats", *three]) == 0
    text = buf.getvalue()
    assert "…" not in text and "3.27" in text   # a terminal's 60 columns: the cells wrap, nothing is cut


def test_a_console_given_a_width_keeps_it():
    buf = io.StringIO()
    console = OutputConsole(file=buf, width=50)
    console.print("x " * 40)
    assert max(len(line) for line in buf.getvalue().splitlines()) <= 50


def test_stats_check_exits_1_unless_the_sweep_is_a_record(capsys):
    logs = [str(LOGS / "modded_record.txt"), str(LOGS / "ours_complete.txt")]   # 3.2772 and 3.2712
    assert main(["stats", *logs, "--check", "--target", "3.4"]) == 0   # far below 3.4: p < 0.01
    assert main(["stats", *logs, "--check"]) == 1                      # below 3.28, but not at p < 0.01
    assert main(["stats", *logs]) == 0                                 # without --check, 0 either way
    capsys.readouterr()
    assert main(["stats", *logs, "--check", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["is_record"] is False

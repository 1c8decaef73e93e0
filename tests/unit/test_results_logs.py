"""Issue 23: the log cases a speedrunner meets, on published modded-nanogpt logs (tests/data/README.md) and
small variants of them: cut final lines, times without units, duplicates, mixed step counts, llm.c logs,
files that are not logs, and a downloaded sweep folder."""
from __future__ import annotations

import gzip
import json
import shutil
import warnings
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.log_files import load_log_files
from orchestrator.results import load_sweep_runs
from orchestrator.store import open_store
from orchestrator.train_log import LogFormatError, parse_log

LOGS = Path(__file__).resolve().parents[1] / "data" / "logs"
RECORD = LOGS / "record_2025-01-04_softcap.txt"      # published: 1390 steps, val 3.2785, 204345 ms
RECORD_CUT = LOGS / "record_2025-01-04_softcap_cut.txt"   # the same, cut inside `step:1390/1390 val_loss:3.27`
LLMC = LOGS / "llmc_2024-06-06_adamw.log"             # published llm.c-format baseline: `s:9536 tel:3.275959` last


def stats_json(capsys, *argv) -> dict:
    assert main(["stats", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_published_record_log():
    r = parse_log(RECORD.read_text())
    assert r.complete and r.final_val_loss == 3.2785 and r.train_time_ms == 204345 and r.step_avg_ms == 148.08
    assert (r.total_steps, r.steps_done, r.peak_alloc_mib, r.log_format) == (1390, 1390, 31563, "record")
    assert len(r.val_points) == 13


def test_published_llmc_log_parses_as_a_complete_run():
    r = parse_log(LLMC.read_text())
    assert r.complete and r.log_format == "llm.c"
    assert r.final_val_loss == 3.275959 and (r.total_steps, r.steps_done) == (9536, 9536)
    assert len(r.val_points) == 76 and len(r.train_points) == 9536 and r.train_points[0].train_loss == 10.965596
    assert r.train_time_ms is None   # llm.c printed no times: none is made up


def test_llmc_log_without_its_final_val_line_is_incomplete():
    text = LLMC.read_text()
    r = parse_log(text[:text.rindex("s:9536 tel:")])
    assert not r.complete and r.steps_done == 9535
    assert r.reason == "stopped at step 9535 (llm.c log: no val loss after the last train step)"


def test_final_line_cut_mid_write_is_an_incomplete_run_not_a_loss_of_3_27():
    r = parse_log(RECORD_CUT.read_text())
    assert not r.complete and r.final_val_loss == 3.2793   # the step-1375 val line, the last one written whole
    assert r.reason == "the log's last line is cut mid-write ('step:1390/1390 val_loss:3.27'); before it, step 1390"


def test_final_val_line_without_its_train_time_is_cut_even_with_a_newline():
    r = parse_log(RECORD_CUT.read_text() + "\n")
    assert not r.complete
    assert r.reason == "the final val line (step 1390) has no train_time: it was cut mid-write"


def test_stats_leave_the_cut_copy_out_of_the_mean(capsys):
    d = stats_json(capsys, RECORD, RECORD_CUT)
    assert d["n_complete"] == 1 and d["val_loss_mean"] == 3.2785
    assert d["failed"] == ["record_2025-01-04_softcap_cut.txt"]


def test_a_time_without_a_unit_is_an_error_naming_the_file_and_line(tmp_path, capsys):
    text = RECORD.read_text().replace("train_time:204345ms", "train_time:204345")
    line = text.splitlines().index("step:1390/1390 val_loss:3.2785 train_time:204345 step_avg:148.08ms") + 1
    with pytest.raises(LogFormatError) as e:
        parse_log(text)
    assert e.value.line == line
    log = tmp_path / "no-unit.txt"
    log.write_text(text)
    assert main(["stats", str(log)]) == 2
    err = capsys.readouterr().err
    assert f"log file {log}, line {line}: train_time:204345 has no unit, so it could be ms or s" in err
    assert "train_time:204345ms (or s)" in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_unitless_time_in_a_sweep_fails_that_seed_only(tmp_path):
    store = open_store(str(tmp_path / "store"))
    sweep = "x-20261201T000000Z-000000"
    store.put_bytes(RECORD.read_bytes(), f"{sweep}/seed-0/train.log")
    store.put_bytes(b"step:10/10 val_loss:3.2 train_time:1689 step_avg:1.0ms\n", f"{sweep}/seed-1/train.log")
    runs = load_sweep_runs(store, sweep)
    assert [r.summary.complete for r in runs] == [False, False]   # no manifest for either; seed 1 also unreadable
    assert runs[1].summary.reason == "train.log line 1: train_time:1689 has no unit, so it could be ms or s; " \
                                     "the trainer must print it as train_time:1689ms (or s)"


def test_the_same_content_twice_counts_once_with_a_note(tmp_path, capsys):
    copy = tmp_path / "copy-of-record.txt"
    shutil.copy(RECORD, copy)
    d = stats_json(capsys, RECORD, copy, RECORD)
    assert [r["name"] for r in d["runs"]] == [RECORD.name] and d["n_complete"] == 1
    assert f"{copy}: same content as {RECORD}; counted once" in d["notes"]
    assert f"{RECORD}: given twice; counted once" in d["notes"]


def test_mixed_step_counts_warn_and_group_by_steps_splits_them(capsys):
    d = stats_json(capsys, RECORD, LOGS / "modded_record.txt", LLMC)
    assert d["n_complete"] == 3
    assert any("different step counts (1 run(s) of 1390 steps, 1 run(s) of 1695 steps, 1 run(s) of 9536 steps)"
               in n and "--group-by steps" in n for n in d["notes"])
    g = stats_json(capsys, RECORD, LOGS / "modded_record.txt", LLMC, "--group-by", "steps")
    assert [(x["steps"], [r["name"] for r in x["runs"]]) for x in g["groups"]] == [
        (1390, [RECORD.name]), (1695, ["modded_record.txt"]), (9536, [LLMC.name])]
    assert not any("different step counts" in n for x in g["groups"] for n in x["notes"])
    assert main(["stats", str(RECORD), str(LOGS / "modded_record.txt"), "--group-by", "steps"]) == 0
    out = capsys.readouterr().out
    assert "2 log file(s): 1390 steps" in out and "2 log file(s): 1695 steps" in out


def test_files_that_are_not_logs_are_skipped_with_a_note(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "run.txt.gz").write_bytes(gzip.compress(RECORD.read_bytes()))
    (tmp_path / "README.md").write_text("Record: step:1390/1390 val_loss:3.2785 train_time:204345ms\n")
    (tmp_path / "notes.txt").write_text("tried a lower lr; see the spreadsheet\n")
    (tmp_path / "weights.log").write_bytes(b"\x00\x01\x02" * 100)
    died = tmp_path / "died.txt"
    died.write_text("Traceback (most recent call last):\n  File \"x\"\nFileNotFoundError: no shards in /data\n")
    names = ["empty.txt", "run.txt.gz", "README.md", "notes.txt", "weights.log", "died.txt"]
    pool = load_log_files([RECORD, *(tmp_path / n for n in names)])
    assert [r.name for r in pool.runs] == [RECORD.name, "died.txt"]
    assert "FileNotFoundError: no shards" in pool.runs[1].summary.reason   # a log of a run that died stays
    assert pool.notes == [
        f"{tmp_path / 'empty.txt'}: skipped: empty file",
        f"{tmp_path / 'run.txt.gz'}: skipped: gzip-compressed; decompress it first (e.g. gunzip) and pass the log",
        f"{tmp_path / 'README.md'}: skipped: a .md file, not a training log (logs are .txt or .log)",
        f"{tmp_path / 'weights.log'}: skipped: binary, not a text log",
        f"{tmp_path / 'notes.txt'}: skipped: no step lines and no error in it, so not a training log",
    ]
    assert [r.name for r in pool.runs if "died before training started" in r.summary.reason] == ["died.txt"]


def test_only_non_logs_is_bad_input(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "README.md").write_text("# notes\n")
    assert main(["stats", str(tmp_path / "empty.txt"), str(tmp_path / "README.md")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no training logs among the 2 file(s) given") and err.count("\n") == 1


def test_logs_inside_a_downloaded_sweep_folder(tmp_path, capsys):
    sweep = tmp_path / "speedrun-20261201T000000Z-abcdef"
    for seed, src in ((0, LOGS / "modded_record.txt"), (3, RECORD)):
        (sweep / f"seed-{seed}").mkdir(parents=True)
        shutil.copy(src, sweep / f"seed-{seed}" / "train.log")
    d = stats_json(capsys, sweep / "seed-3" / "train.log")
    assert [r["name"] for r in d["runs"]] == ["train.log"] and d["n_complete"] == 1
    d = stats_json(capsys, sweep / "seed-0" / "train.log", sweep / "seed-3" / "train.log")
    assert [r["name"] for r in d["runs"]] == ["seed-0/train.log", "seed-3/train.log"]
    d = stats_json(capsys, sweep)   # only the logs were downloaded: read as log files
    assert [r["name"] for r in d["runs"]] == ["seed-0/train.log", "seed-3/train.log"] and d["n_complete"] == 2
    # The whole sweep was copied out of the store (manifests too): read as the store reads it, so seed 3,
    # which has no manifest, did not finish its upload, whatever its log says.
    (sweep / "seed-0" / "manifest.json").write_text('{"prefix": "x", "files": [], "created_at": 0, "format": 1}')
    d = stats_json(capsys, sweep)
    assert [(r["name"], r["complete"]) for r in d["runs"]] == [("seed-0", True), ("seed-3", False)]
    assert d["runs"][1]["reason"].startswith("no manifest.json")


def test_equal_train_times_give_a_degenerate_interval_and_no_scipy_warning(tmp_path, capsys):
    logs = []
    for i, loss in enumerate(("3.2701", "3.2702", "3.2703")):
        p = tmp_path / f"run{i}.txt"
        p.write_text(f"step:100/100 val_loss:{loss} train_time:9968ms step_avg:99.68ms\n")
        logs.append(str(p))
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a RuntimeWarning from scipy fails the test
        assert main(["stats", *logs]) == 0
    captured = capsys.readouterr()
    assert "RuntimeWarning" not in captured.err + captured.out
    out = " ".join(captured.out.split())
    assert "9.97 [9.97, 9.97]" in out
    assert "all 3 train times are 9.97 s (no spread): the 95% interval is degenerate, that one point" in out


def test_all_equal_val_losses_say_the_test_is_degenerate_without_warnings():
    from orchestrator.results import SeedSummary
    from orchestrator.stats import sweep_stats

    runs = [SeedSummary(i, 3.27, 100.0 + i, 10.0, 1, True, total_steps=100) for i in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = sweep_stats(runs, 3.28)
    assert s.val_loss_std == 0 and s.p_value == 0 and s.t_statistic is None
    assert s.notes == ["all 3 val losses are 3.2700 (no spread): the t-test is degenerate, p is 0 because the mean is "
                       "below the target; more seeds with real spread make it meaningful"]


def test_check_with_groups_needs_every_group_to_be_a_record(tmp_path, capsys):
    def logs(steps, losses):
        out = []
        for i, loss in enumerate(losses):
            p = tmp_path / f"{steps}-{i}.txt"
            p.write_text(f"step:{steps}/{steps} val_loss:{loss} train_time:{1000 + i}ms step_avg:10.00ms\n")
            out.append(str(p))
        return out

    record, short = logs(1390, ("3.2701", "3.2702", "3.2703")), logs(1200, ("3.3001", "3.3102", "3.3203"))
    assert main(["stats", *record, "--group-by", "steps", "--check"]) == 0
    assert main(["stats", *record, *short, "--group-by", "steps", "--check"]) == 1
    assert main(["stats", *record, *short, "--group-by", "steps"]) == 0
    out = capsys.readouterr().out
    assert "6 log file(s): 1200 steps" in out and "6 log file(s): 1390 steps" in out


def test_the_live_step_line_takes_logs_without_times_or_totals(monkeypatch):
    """`speedrun launch` on a terminal turns train lines into one status line; an llm.c line has no total and no
    time, and a unitless time is left unread: neither may stop the follow."""
    import io

    from orchestrator import cli_launch
    from orchestrator.terminal import OutputConsole

    class Lines:
        def logs(self, handle, follow):
            yield from ["s:3 trl:4.5 lr:0.0006 norm:0.3", "step:5/10 train_loss:3.2 train_time:1689 step_avg:1.0ms",
                        "step:6/10 train_loss:3.1 train_time:1700ms step_avg:1.0ms", "done"]

    out = io.StringIO()
    monkeypatch.setattr(cli_launch, "console", OutputConsole(file=out, force_terminal=True, width=100))
    cli_launch._follow(Lines(), None)
    assert "done" in out.getvalue()

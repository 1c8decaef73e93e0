"""`speedrun stats|compare|report` end to end on a local directory store and on raw log files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.store import open_store

LOGS = Path(__file__).resolve().parents[1] / "data" / "logs"
SWEEP = "smoke-20261125T090000Z-abc123"


@pytest.fixture
def store_url(tmp_path):
    url = str(tmp_path / "store")
    store = open_store(url)
    for seed, name in enumerate(["ours_complete.txt", "modded_record.txt", "ours_oom.txt"]):
        store.put_bytes((LOGS / name).read_bytes(), f"{SWEEP}/seed-{seed}/train.log")
        if seed != 2:
            store.put_bytes(b'{"prefix": "x", "files": [], "created_at": 0, "format": 1}',
                            f"{SWEEP}/seed-{seed}/manifest.json")
    return url


def test_stats_of_a_sweep_as_json(store_url, capsys):
    assert main(["stats", SWEEP, "--store", store_url, "--json", "--target", "3.3"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["n_complete"] == 2 and d["failed"] == ["seed-2"] and d["target"] == 3.3
    assert d["val_loss_mean"] == pytest.approx((3.2712 + 3.2772) / 2)


def test_stats_of_a_sweep_as_table_names_the_failed_seed(store_url, capsys):
    assert main(["stats", SWEEP, "--store", store_url]) == 0
    out = capsys.readouterr().out
    assert "FAILED" in out and "seed-2" in out and "no manifest.json" in out and "2 of 3" in out


def test_stats_of_raw_logs(capsys):
    assert main(["stats", str(LOGS / "modded_record.txt"), str(LOGS / "modded_2024.txt"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in d["runs"]] == ["modded_record.txt", "modded_2024.txt"] and d["n_complete"] == 2


@pytest.mark.parametrize("argv", [["stats", "logs/nope.txt"], ["stats", str(LOGS / "ours_complete.txt"), "nope.txt"]])
def test_missing_log_is_bad_input(argv, capsys):
    assert main(argv) == 2
    assert "nope.txt: no such log file" in capsys.readouterr().err


def test_unknown_sweep_is_bad_input(store_url, capsys):
    assert main(["stats", "nope-20260101T000000Z-000000", "--store", store_url]) == 2
    assert "no seed-<n>/ objects" in capsys.readouterr().err


def test_compare_two_folders_of_logs(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for i, loss in enumerate([3.2772, 3.2791, 3.2768]):
        (a / f"{i}.txt").write_text(f"step:10/10 val_loss:{loss} train_time:{170000 + 300 * i}ms step_avg:99.00ms\n")
        (b / f"{i}.txt").write_text(f"step:10/10 val_loss:{loss + 0.001} train_time:{160000 + 500 * i}ms step_avg:95.00ms\n")
    assert main(["compare", str(a), str(b), "--json"]) == 0
    d = {x["metric"]: x for x in json.loads(capsys.readouterr().out)["differences"]}
    assert d["train_time_s"]["diff"] == pytest.approx(-9.8) and d["val_loss"]["diff"] == pytest.approx(0.001)


def test_report_uploads_beside_the_sweep(store_url, tmp_path, capsys):
    assert main(["report", SWEEP, "--store", store_url, "--out", str(tmp_path / "plots")]) == 0
    keys = {o.key for o in open_store(store_url).list(f"{SWEEP}/report/")}
    assert f"{SWEEP}/report/manifest.json" in keys and f"{SWEEP}/report/val_loss_vs_step.png" in keys
    assert (tmp_path / "plots" / "train_time_distribution.png").is_file()


TRACK2 = "track2-20261201T000000Z-def456"


@pytest.fixture
def track2_url(tmp_path):
    """Three seeds well below 3.28 but far above track 2's target_loss of 2.92."""
    url = str(tmp_path / "store2")
    store = open_store(url)
    store.put_bytes(json.dumps({"seeds": [0, 1, 2], "job": {"name": "track2", "target_loss": 2.92}}).encode(),
                    f"{TRACK2}/plan.json")
    for seed, loss in enumerate([3.2701, 3.2703, 3.2702]):
        store.put_bytes(f"step:10/10 val_loss:{loss} train_time:1000ms step_avg:100.00ms\n".encode(),
                        f"{TRACK2}/seed-{seed}/train.log")
        store.put_bytes(b'{"prefix": "x", "files": [], "created_at": 0, "format": 1}', f"{TRACK2}/seed-{seed}/manifest.json")
    return url


def test_stats_test_against_the_jobs_target_and_say_so(track2_url, capsys):
    assert main(["stats", TRACK2, "--store", track2_url, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["target"] == 2.92 and d["target_source"] == "the job's target_loss" and not d["is_record"]
    assert main(["stats", TRACK2, "--store", track2_url]) == 0
    out = capsys.readouterr().out
    record_row = next(line for line in out.splitlines() if "record (p < 0.01)" in line)
    assert "2.92 (the job's target_loss)" in out and record_row.rstrip(" │").endswith("no")
    # --target overrides the job's: against 3.28 these seeds are a record
    assert main(["stats", TRACK2, "--store", track2_url, "--json", "--target", "3.28"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["target"] == 3.28 and d["target_source"] == "--target" and d["is_record"]


def test_report_and_compare_use_the_jobs_target(track2_url, tmp_path, capsys):
    assert main(["report", TRACK2, "--store", track2_url, "--out", str(tmp_path / "plots")]) == 0
    assert "target val loss: 2.92 (the job's target_loss)" in capsys.readouterr().out
    stats = json.loads((tmp_path / "plots" / "stats.json").read_text())
    assert stats["target"] == 2.92 and not stats["is_record"]
    assert main(["compare", TRACK2, TRACK2, "--store", track2_url, "--json"]) == 0
    sides = json.loads(capsys.readouterr().out)["targets"]
    assert [(s["target"], s["target_source"], s["is_record"]) for s in sides] == [(2.92, "the job's target_loss", False)] * 2
    assert main(["compare", TRACK2, TRACK2, "--store", track2_url]) == 0
    assert "target 2.92 (the job's target_loss)" in capsys.readouterr().out


def test_logs_without_a_job_use_the_records_target(capsys):
    assert main(["stats", str(LOGS / "modded_record.txt"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["target"] == 3.28 and d["target_source"] == "the record's target"

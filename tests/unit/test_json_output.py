"""Issue 23: `--json` on every command that prints a table, one documented shape per command (README's command
list), with the same figures the table shows; stdout holds the JSON document and nothing else."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.runs import SweepRecord, launched_at, record_sweep
from orchestrator.store import open_store

REPO = Path(__file__).resolve().parents[2]
LOGS = REPO / "tests" / "data" / "logs"
SWEEP = "smoke-20261125T090000Z-abc123"
SYN = "synthetic://markov?states=32&branch=2&doc_len=16&train_shards=2&shard_tokens=20000"


@pytest.fixture
def store_url(tmp_path, monkeypatch):
    """A local store with one sweep of jobs/smoke.yaml: seed 0 committed (ours_complete), seed 1 with a log
    and no manifest."""
    from orchestrator.cluster_config import load_cluster
    from orchestrator.config import load_job
    from orchestrator.plan import build_plan

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("SPEEDRUN_HOME", str(tmp_path / "home"))
    url = str(tmp_path / "store")
    store = open_store(url)
    job, (cluster, cluster_file) = load_job(REPO / "jobs" / "smoke.yaml"), load_cluster("local")
    plan = build_plan(job, cluster, REPO / "jobs" / "smoke.yaml", cluster_file, store=url)
    store.put_bytes(plan.to_json().encode(), f"{SWEEP}/plan.json")
    store.put_bytes((LOGS / "ours_complete.txt").read_bytes(), f"{SWEEP}/seed-0/train.log")
    store.put_bytes(b'{"prefix": "x", "files": [], "created_at": 0, "format": 1}', f"{SWEEP}/seed-0/manifest.json")
    store.put_bytes((LOGS / "ours_oom.txt").read_bytes(), f"{SWEEP}/seed-1/train.log")
    return url


def documented_keys(command: str) -> set[str]:
    """The top-level keys README's `--json` table gives for a command (`{a, b: [..], c: <..>}` -> {a, b, c})."""
    for line in (REPO / "README.md").read_text().splitlines():
        m = re.match(r"^\| `(.+?)` \| `(\{.*\})` \|$", line)
        if m and m.group(1).replace("\\|", "|") == command:
            keys, depth, word = set(), 0, ""
            for ch in m.group(2):
                if ch in "{[<":
                    depth += 1
                elif ch in "}]>":
                    depth -= 1
                if depth == 1 and (ch.isalnum() or ch == "_"):
                    word += ch
                elif word:
                    keys.add(word)
                    word = ""
            return keys
    raise AssertionError(f"README documents no --json shape for `{command}`")


def run_json(capsys, *argv, rc: int = 0, command: str | None = None):
    assert main([*map(str, argv), "--json"]) == rc
    d = json.loads(capsys.readouterr().out)   # the whole of stdout is one JSON document
    if command:
        assert set(d) == documented_keys(command), f"README's shape of `{command} --json` differs"
    return d


def test_runs(store_url, capsys):
    d = run_json(capsys, "runs", "--store", store_url, command="runs")
    assert d == {"store": store_url, "runs": [{"run": SWEEP, "seeds": 2, "complete": 1, "best_val_loss": 3.2712}]}


def test_show(store_url, capsys):
    d = run_json(capsys, "show", SWEEP, "--store", store_url, command="show RUN")
    assert (d["run"], d["store"], d["artifacts"]) == (SWEEP, store_url, f"{store_url}/{SWEEP}/")
    assert [(s["name"], s["state"], s["val_loss"], s["train_time_s"]) for s in d["seeds"]] == [
        ("seed-0", "succeeded", 3.2712, 9.968), ("seed-1", "incomplete", 3.638, 5.981)]
    assert d["seeds"][1]["reason"].startswith("no manifest.json") and d["sweep_id"] == SWEEP


def test_status_lists_runs_and_one_run(tmp_path, store_url, capsys):
    store = open_store(store_url)
    # A node runner that has exited: no process can have its pid (above Linux's largest, 2**22), its exit file says 0.
    exit_file = tmp_path / "node.exit"
    exit_file.write_text("0")
    handle = {"backend": "local", "sweep_id": SWEEP, "job_ids": ["1"], "store_url": store_url,
              "data": {"pid": 2 ** 22 + 1, "start_ticks": 0, "log": str(tmp_path / "node.log"),
                       "exit_file": str(exit_file), "run_dir": str(tmp_path)}}
    record_sweep(SweepRecord(SWEEP, store_url, "cluster_configs/local.yaml", "jobs/smoke.yaml", launched_at(SWEEP),
                             handle), store)
    d = run_json(capsys, "status", command="status")
    assert d["store"] is None and d["index"].endswith("runs.json")
    assert d["runs"] == [{"run": SWEEP, "launched_utc": "2026-11-25 09:00", "backend": "local", "state": "SUCCEEDED",
                          "detail": "node runner exited with code 0"}]
    d = run_json(capsys, "status", SWEEP, command="status RUN")
    assert d == {"run": SWEEP, "state": "SUCCEEDED", "detail": "node runner exited with code 0",
                 "jobs": {str(2 ** 22 + 1): "SUCCEEDED"}}


def test_stats_and_compare(tmp_path, capsys):
    d = run_json(capsys, "stats", LOGS / "ours_complete.txt", LOGS / "modded_record.txt", "--target", "3.3",
                 command="stats")
    assert d["n_complete"] == 2 and d["target"] == 3.3 and [r["total_steps"] for r in d["runs"]] == [100, 1695]
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for folder, names in ((a, ("ours_complete.txt", "modded_record.txt")), (b, ("modded_2024.txt", "ours_oom.txt"))):
        for n in names:
            (folder / n).write_bytes((LOGS / n).read_bytes())
    d = run_json(capsys, "compare", a, b, command="compare")
    assert [x["metric"] for x in d["differences"]] == ["val_loss", "train_time_s", "step_avg_ms"]
    assert d["failed_b"] == ["ours_oom.txt"] and d["notes"] == []


def test_report(tmp_path, store_url, capsys):
    d = run_json(capsys, "report", SWEEP, "--store", store_url, "--out", tmp_path / "rep", command="report")
    assert (d["sweep"], d["target"], d["local"]) == (SWEEP, 3.28, str(tmp_path / "rep"))
    assert d["store"] == f"{store_url}/{SWEEP}/report/"
    assert {f["key"] for f in d["files"]} and all(len(f["sha256"]) == 64 and f["size"] > 0 for f in d["files"])
    assert {f["key"] for f in d["files"]} == {p.name for p in (tmp_path / "rep").iterdir()}


def test_data_verify(tmp_path, capsys):
    assert main(["data", "stage", "--source", SYN, "--dest", str(tmp_path / "d")]) == 0
    capsys.readouterr()
    d = run_json(capsys, "data", "verify", tmp_path / "d", command="data verify")
    assert d["ok"] and d["dir"] == str(tmp_path / "d") and len(d["shards"]) == 3
    assert all(s["ok"] and s["tokens"] > 0 and s["error"] is None for s in d["shards"])
    (tmp_path / "d" / "fineweb_train_000002.bin").write_bytes(b"\0" * 2000)
    d = run_json(capsys, "data", "verify", tmp_path / "d", rc=1)
    assert not d["ok"] and [s["name"] for s in d["shards"] if not s["ok"]] == ["fineweb_train_000002.bin"]


def test_launch_dry_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    d = run_json(capsys, "launch", "jobs/smoke.yaml", "--dry-run", "--store", tmp_path / "store",
                 "--set", "env.HF_TOKEN=hf_abcdefghijklmnopqrstuvwxyz", command="launch --dry-run")
    assert d["plan"]["job"]["name"] == "smoke" and d["plan"]["sweep_id"].startswith("smoke-")
    assert d["plan"]["job"]["env"]["HF_TOKEN"] == "<redacted>"
    assert d["submit"][0].startswith("local backend: 1 node")
    assert not (tmp_path / "store").exists()
    assert main(["launch", "jobs/smoke.yaml", "--json", "--store", str(tmp_path / "store")]) == 2
    assert "--json: only with --dry-run" in capsys.readouterr().err and not (tmp_path / "store").exists()


def test_cluster_up_dry_run(capsys):
    d = run_json(capsys, "cluster", "up", "cluster_configs/ray-cluster-aws.yaml", "--dry-run",
                 command="cluster up|down|status --dry-run")
    assert (d["cluster_name"], d["action"], d["total_nodes"], d["usd_per_hour"]) == ("speedrun-p5", "up", 1, 55.04)
    assert d["nodes"] == [{"role": "head", "node_type": "p5-head", "instance": "p5.48xlarge", "count": 1,
                           "where": "us-east-1", "gpus": 8, "usd_per_hour": 55.04}]


def test_stats_group_by_steps_shape(capsys):
    d = run_json(capsys, "stats", LOGS / "ours_complete.txt", LOGS / "modded_record.txt", "--group-by", "steps",
                 command="stats --group-by steps")
    stats_fields = documented_keys("stats")
    assert [set(g) for g in d["groups"]] == [stats_fields | {"steps"}] * 2
    assert [s_["steps"] for s_ in d["groups"]] == [100, 1695]


def test_a_seed_has_the_documented_fields(store_url, capsys):
    line = next(x for x in (REPO / "README.md").read_text().splitlines() if x.startswith("where a seed is `{"))
    fields = set(re.findall(r"\w+", line.split("`")[1]))
    d = run_json(capsys, "show", SWEEP, "--store", store_url)
    assert all(set(seed) == fields for seed in d["seeds"])

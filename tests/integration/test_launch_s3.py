"""The product's promise end to end: `speedrun launch --store s3://...` puts every artifact in object storage.

A real S3 HTTP endpoint (moto_server on loopback), the real CLI in a subprocess, a short smoke run.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from s3_server import ENV, free_port, moto_s3  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def speedrun(*args: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(ENV, SPEEDRUN_HOME=str(tmp_path / "home"), AWS_CONFIG_FILE=os.devnull,
               AWS_SHARED_CREDENTIALS_FILE=os.devnull, COLUMNS="200")
    return env


def test_launch_to_s3_then_show_and_stats_from_the_store(moto_s3, cli_env, tmp_path):
    moto_s3.create_bucket("speedrun-runs")
    store = f"s3://speedrun-runs/team-a?endpoint_url={moto_s3.endpoint}"
    proc = speedrun("launch", "jobs/smoke.yaml", "--store", store, "--set", "trainer.steps=6",
                    "--set", "trainer.val_every=3", "--set", f"cluster.data_dir={tmp_path / 'data'}",
                    "--set", f"cluster.work_dir={tmp_path / 'work'}", env=cli_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    s3 = moto_s3.client()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="speedrun-runs", Prefix="team-a/")["Contents"]]
    sweep = keys[0].split("/")[1]
    manifest = json.loads(s3.get_object(Bucket="speedrun-runs", Key=f"team-a/{sweep}/seed-0/manifest.json")["Body"].read())
    assert {"train.log", "metrics.jsonl", "timings.json", "env.json", "ckpt/final.pt"} <= {f["key"] for f in manifest["files"]}
    for f in manifest["files"]:
        body = s3.get_object(Bucket="speedrun-runs", Key=f"team-a/{sweep}/seed-0/{f['key']}")["Body"].read()
        assert len(body) == f["size"] and hashlib.sha256(body).hexdigest() == f["sha256"], f["key"]
    assert f"team-a/{sweep}/plan.json" in keys and f"team-a/{sweep}/handle.json" in keys

    shown = speedrun("show", sweep, "--store", store, env=cli_env, timeout=120)
    assert shown.returncode == 0 and "succeeded" in shown.stdout
    stats = speedrun("stats", sweep, "--store", store, "--json", env=cli_env, timeout=120)
    assert stats.returncode == 0, stats.stderr
    report = json.loads(stats.stdout)
    assert [r["seed"] for r in report["runs"]] == [0] and report["failed"] == []
    assert report["runs"][0]["val_loss"] < 10.0 and report["is_record"] is False


def test_unreachable_endpoint_is_one_sentence_and_leaves_nothing(cli_env, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    env = dict(cli_env, AWS_MAX_ATTEMPTS="1")
    proc = speedrun("launch", "jobs/smoke.yaml", "--store", f"s3://speedrun-runs/x?endpoint_url={dead}",
                    "--set", f"cluster.data_dir={tmp_path / 'data'}", "--set", f"cluster.work_dir={tmp_path / 'work'}",
                    env=env, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 3
    assert not (tmp_path / "work").exists() and not (tmp_path / "home" / "runs.json").exists()

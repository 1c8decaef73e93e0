"""Issue 2 end to end: `speedrun launch jobs/smoke.yaml` on the embedded default, as a user runs it.

Real torch.distributed (2 gloo ranks under torchrun), real synthetic shards, the local directory store.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SECRET = "AKIAPLANTEDSECRET000"  # looks like an AWS key id: must never reach an artifact or the console
SECRET_VALUE = "planted-secret-value-b3f1c2"
pytestmark = pytest.mark.integration


def speedrun(*args: str, env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    env = dict(os.environ, SPEEDRUN_HOME=str(root / "home"), AWS_ACCESS_KEY_ID=SECRET,
               AWS_SECRET_ACCESS_KEY=SECRET_VALUE, HF_TOKEN=SECRET_VALUE, COLUMNS="200")
    store = root / "runs"
    proc = speedrun("launch", "jobs/smoke.yaml", "--store", str(store),
                    "--set", f"cluster.data_dir={root / 'data'}", "--set", f"cluster.work_dir={root / 'work'}", env=env)
    sweeps = [p for p in store.iterdir() if p.is_dir()] if store.exists() else []
    return {"proc": proc, "store": store, "env": env, "root": root, "sweep": sweeps[0] if len(sweeps) == 1 else None}


def test_launch_succeeds_and_prints_summary(smoke):
    proc = smoke["proc"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert smoke["sweep"] is not None and smoke["sweep"].name.startswith("smoke-")
    assert "entropy rate" in out
    for column in ("val loss", "train time", "step avg", "artifacts"):
        assert column in out
    assert f"{smoke['sweep'].name}: SUCCEEDED" in out


def test_every_artifact_matches_the_manifest(smoke):
    seed = smoke["sweep"] / "seed-0"
    manifest = json.loads((seed / "manifest.json").read_text())
    listed = {f["key"]: f for f in manifest["files"]}
    for name in ("train.log", "metrics.jsonl", "timings.json", "env.json", "ckpt/final.pt"):
        assert name in listed, f"{name} missing from the manifest"
    on_disk = {p.relative_to(seed).as_posix() for p in seed.rglob("*") if p.is_file()} - {"manifest.json"}
    assert on_disk == set(listed), "store holds objects the manifest does not list (or the reverse)"
    for key, f in listed.items():
        data = (seed / key).read_bytes()
        assert len(data) == f["size"], key
        assert hashlib.sha256(data).hexdigest() == f["sha256"], key
    # the manifest is the commit marker: written after everything it lists
    newest = max((seed / k).stat().st_mtime_ns for k in listed)
    assert (seed / "manifest.json").stat().st_mtime_ns >= newest


def test_loss_falls_toward_the_entropy_rate(smoke):
    from orchestrator.train_log import parse_log

    seed = smoke["sweep"] / "seed-0"
    env = json.loads((seed / "env.json").read_text())
    rate = env["data"]["entropy_rate_nats"]
    res = parse_log((seed / "train.log").read_text())
    assert res.complete, res.reason
    first, final = res.val_points[0].val_loss, res.final_val_loss
    uniform = math.log(50257)
    assert first > uniform - 1.0, "the first validation should be near chance"
    # well below chance: at least 80% of the way from ln(V) down to the entropy rate
    assert final < rate + 0.2 * (uniform - rate), (final, rate)
    assert final > rate - 0.05, "a val loss below the entropy rate means validation leaks training data"


def test_records_are_complete_and_secret_free(smoke):
    seed = smoke["sweep"] / "seed-0"
    timings = json.loads((seed / "timings.json").read_text())
    for key in ("launch_to_first_step_s", "warmup_s", "train_s", "validation_s", "upload_s", "total_s"):
        assert isinstance(timings[key], (int, float)) and timings[key] >= 0, key
    assert timings["launch_to_first_step_s"] < timings["total_s"]
    before = timings["warmup_parts_s"]   # what came before the first step: torchrun's start, the imports, ...
    assert 0 < before["torchrun_s"] < timings["seed_start_to_first_step_s"] and 0 < before["imports_s"]
    assert before["torchrun_s"] + before["imports_s"] < timings["seed_start_to_first_step_s"]
    # every part the trainer names, its own set-up too, fits inside the seed's time to its first step
    assert before["setup_s"] >= 0 and sum(before.values()) + timings["warmup_s"] < timings["seed_start_to_first_step_s"]
    env = json.loads((seed / "env.json").read_text())
    for key in ("git_commit", "git_dirty", "python", "torch", "devices", "hostname"):
        assert key in env, key
    metrics = [json.loads(line) for line in (seed / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in m for m in metrics) and any("train_loss" in m for m in metrics)
    log = (seed / "train.log").read_text()
    assert "val_loss:" in log and "peak memory allocated:" in log
    everything = [smoke["proc"].stdout, smoke["proc"].stderr]
    everything += [p.read_bytes().decode(errors="replace") for p in smoke["store"].rglob("*") if p.is_file()]
    everything += [p.read_bytes().decode(errors="replace") for p in (smoke["root"] / "work").rglob("*")
                   if p.is_file() and p.suffix in (".log", ".json", ".jsonl")]
    for text in everything:
        assert SECRET not in text and SECRET_VALUE not in text


def test_runs_and_show_find_the_run(smoke):
    sweep = smoke["sweep"].name
    listed = speedrun("runs", "--store", str(smoke["store"]), env=smoke["env"], timeout=120)
    assert listed.returncode == 0 and sweep in listed.stdout and "1/1" in listed.stdout
    shown = speedrun("show", sweep, "--store", str(smoke["store"]), env=smoke["env"], timeout=120)
    assert shown.returncode == 0 and "seed-0" in shown.stdout and "succeeded" in shown.stdout
    missing = speedrun("show", "smoke-nope", "--store", str(smoke["store"]), env=smoke["env"], timeout=120)
    assert missing.returncode == 2 and "not found" in missing.stderr

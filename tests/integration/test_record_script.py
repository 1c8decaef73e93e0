"""Issue 26: a record script runs as-is from the user's own checkout, on the local, Slurm and Ray backends.

The checkout is tests/data/fake_record copied beside a jobs/ folder: a train_gpt.py that imports its sibling
module, reads data/fineweb10B/*.bin under DATA_PATH, writes logs/final/<uuid>.txt (a folder it never makes,
as the published records) and loads a "kernel" from the Hugging Face hub cache with HF_HUB_OFFLINE=1, so
the pre-fetched offline cache must reach the node. The job names it all with relative paths
(`workdir: ../my-record`, `script: train_gpt.py`, `offline.cache: ../offline-cache`) and is launched from
the checkout's parent, as a user would; then `speedrun stats` reads the sweep.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from conftest import make_offline_cache
from ray_cluster import ray_head  # noqa: F401 (session fixture)
from slurm_cluster import slurm_cluster  # noqa: F401 (session fixture)

from orchestrator.artifacts import read_manifest, verify_manifest
from orchestrator.store import open_store

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
FAKE_RECORD = REPO / "tests" / "data" / "fake_record"
CPU = ["cluster.device=cpu", "cluster.gpus_per_node=1"]


class Checkout:
    """A user's folder: my-record/ (their code, with things .gitignore keeps home), jobs/record.yaml, and the
    offline cache `speedrun prefetch` would have filled."""

    def __init__(self, root: Path):
        self.root, self.store = root, root / "store"
        code = root / "my-record"
        shutil.copytree(FAKE_RECORD, code, ignore=shutil.ignore_patterns("__pycache__"))
        (code / ".gitignore").write_text("*.ckpt\nlogs/\n")
        (code / "old.ckpt").write_bytes(b"\0" * 300_000)
        (code / "logs").mkdir()
        (code / "logs" / "previous-run.txt").write_text("step:1/1 val_loss:9.9 train_time:1ms step_avg:1ms\n")
        make_offline_cache(root / "offline-cache")
        (root / "jobs").mkdir()
        (root / "jobs" / "record.yaml").write_text(yaml.safe_dump({
            "name": "my-record", "workdir": "../my-record", "script": "train_gpt.py",
            "script_args": ["--hub-kernel", "testorg/fake-kernel"],
            "offline": {"hf_kernels": ["testorg/fake-kernel"], "tiktoken": ["gpt2"], "cache": "../offline-cache"},
            "data": {"source": "synthetic://markov?seed=0&train_shards=1&shard_tokens=65536", "train_shards": 1},
        }))
        self.env = dict(os.environ, PYTHONPATH=str(REPO), SPEEDRUN_HOME=str(root / "home"), OMP_NUM_THREADS="1",
                        COLUMNS="250")
        self.env.pop("HF_HUB_OFFLINE", None)

    def __call__(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=self.root, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def launch(self, cluster: str, sets: list[str], seeds: int = 2, rc: int = 0) -> str:
        flags = [x for s in [*CPU, f"cluster.work_dir={self.root / 'work'}", f"cluster.data_dir={self.root / 'data'}",
                             *sets] for x in ("--set", s)]
        proc = self("launch", "jobs/record.yaml", "--cluster", cluster, "--seeds", str(seeds), "--store", "store", *flags)
        assert proc.returncode == rc, proc.stdout[-4000:] + proc.stderr[-2000:]
        self.output = proc.stdout
        if rc:
            return re.search(r"launched (\S+) on", proc.stdout).group(1)
        sweep = re.search(r"launched (\S+) on", proc.stdout).group(1)
        assert f"run {sweep}: SUCCEEDED" in proc.stdout
        return sweep

    def check(self, sweep: str) -> None:
        store = open_store(self.store)
        (tar,) = [o.key for o in store.list("workdirs/") if o.key.endswith(".tar")]   # one folder, shipped once
        with tarfile.open(self.store / tar) as t:
            assert sorted(t.getnames()) == [".gitignore", "fake_kernels.py", "train_gpt.py"]   # not old.ckpt, not logs/
        (offline,) = [o.key for o in store.list("offline/") if o.key.endswith(".tar")]   # shipped once as well
        assert store.exists(tar + ".used") and store.exists(offline + ".used")   # stamped: the store's prune keeps them
        for seed in (0, 1):
            prefix = f"{sweep}/seed-{seed}"
            manifest = read_manifest(store, prefix)
            assert manifest is not None and manifest.state == "succeeded" and verify_manifest(store, manifest) == []
            keys = {f.key for f in manifest.files}
            (record_log,) = [k for k in keys if k.startswith("script/logs/final/")]   # what the script wrote comes back
            assert re.fullmatch(r"script/logs/final/[0-9a-f-]{36}\.txt", record_log)
            assert not keys & {"script/train_gpt.py", "script/fake_kernels.py"}      # the store has the code once
            log = store.get_bytes(f"{prefix}/train.log").decode()
            assert "hub kernel: def flash_attn_func(q, k, v): ..." in log, log[-3000:]
            assert store.get_bytes(f"{prefix}/{record_log}").decode() in log
            env = json.loads(store.get_bytes(f"{prefix}/env.json"))
            assert f"workdirs/{env['workdir_sha256']}.tar" == tar
        stats = self("stats", sweep, "--store", "store", "--json", timeout=120)
        assert stats.returncode == 0, stats.stdout + stats.stderr
        d = json.loads(stats.stdout[stats.stdout.index("{"):])
        assert [r["name"] for r in d["runs"]] == ["seed-0", "seed-1"] and d["n_complete"] == 2 and d["failed"] == []
        assert all(r["val_loss"] < 10.8 and r["train_time_s"] is not None for r in d["runs"])


def test_local_backend(tmp_path):
    checkout = Checkout(tmp_path)
    checkout.check(checkout.launch("local", []))


def test_a_node_keeps_its_caches_under_node_cache_gb_but_never_what_the_sweep_uses(tmp_path):
    """Stale entries of earlier sweeps (another code's compile cache, another workdir's tar) go once the node's caches
    are over node_cache_gb; this sweep's shipped workdir and offline caches stay, however small the bound."""
    checkout = Checkout(tmp_path)
    work = tmp_path / "work"
    stale_tar, stale_cache = work / "shipped" / ("0" * 64 + ".tar"), work / "compile-cache" / "old-code-2.11-H100"
    stale_tar.parent.mkdir(parents=True)
    stale_tar.write_bytes(b"x" * 600_000)
    (stale_cache / "triton").mkdir(parents=True)
    (stale_cache / "triton" / "k.cubin").write_bytes(b"x" * 600_000)
    for p in (stale_tar, stale_cache):
        os.utime(p, (1e9, 1e9))   # last used in 2001
    checkout.check(checkout.launch("local", ["cluster.node_cache_gb=0.0001"]))
    assert not stale_tar.exists() and not stale_cache.exists()
    assert "[node] caches over node_cache_gb=0.0001: removed 2 least recently used" in checkout.output
    kept = sorted(p.name for p in (work / "shipped").iterdir() if not p.name.startswith("."))
    assert len([n for n in kept if n.endswith(".tar")]) == 2 and any(n.startswith("offline-") for n in kept)


def test_a_script_that_dies_before_its_first_step_is_summarised_by_its_error(tmp_path):
    """Without script_dirs' logs/final, the record's own `open('logs/final/<uuid>.txt')` fails, as record-28 did."""
    checkout = Checkout(tmp_path)
    sweep = checkout.launch("local", ["script_dirs=[]"], seeds=1, rc=1)
    why = ("no step lines in the log (the run died before training started): FileNotFoundError: [Errno 2] No such file "
           "or directory: 'logs/final/")
    assert f"seed 0: failed: node runner marked it failed (trainer exited with code 1); log: {why}" in checkout.output
    stats = checkout("stats", sweep, "--store", "store", "--json", timeout=120)
    d = json.loads(stats.stdout[stats.stdout.index("{"):])
    assert d["n_complete"] == 0 and why in json.dumps(d), stats.stdout


def test_a_seed_past_its_time_limit_is_stopped_and_the_sweep_goes_on(tmp_path):
    """A script that hangs after its first step (a stuck collective, say): each seed is stopped at the job's
    seed_time_limit_min, marked failed with that reason, not retried, and the next seed still runs."""
    checkout = Checkout(tmp_path)
    sweep = checkout.launch("local", ["seed_time_limit_min=0.1", "retries=2",
                                      "script_args=[--hang-after-step, '1']"], seeds=2, rc=1)
    assert "(each stopped after 0.1 min)" in checkout.output
    store = open_store(checkout.store)
    for seed in (0, 1):
        prefix = f"{sweep}/seed-{seed}"
        log = store.get_bytes(f"{prefix}/train.log").decode()
        pid = int(re.search(r"hanging after step 1, pid (\d+)", log).group(1))
        with pytest.raises(ProcessLookupError):   # the hung script itself is gone, not only torchrun
            os.kill(pid, 0)
        timings = json.loads(store.get_bytes(f"{prefix}/timings.json"))
        assert timings["state"] == "failed" and timings["attempts"] == 1
        assert timings["reason"] == "stopped at the job's seed_time_limit_min (0.1 min)"
        assert 6 <= timings["seed_wall_s"] < 60 and timings["seed_start_to_first_step_s"] is not None
        assert (f"seed {seed}: failed: node runner marked it failed (stopped at the job's seed_time_limit_min "
                "(0.1 min))") in checkout.output


def test_slurm_backend(tmp_path, slurm_cluster):  # noqa: F811
    checkout = Checkout(tmp_path)
    checkout.env["SLURM_CONF"] = str(slurm_cluster.conf)
    checkout.check(checkout.launch("slurm", [f"cluster.slurm.log_dir={tmp_path / 'submitit'}",
                                             "cluster.slurm.cpus_per_task=1"]))


def test_ray_backend(tmp_path, ray_head):  # noqa: F811
    checkout = Checkout(tmp_path)
    (tmp_path / "ray-test.yaml").write_text(yaml.safe_dump({
        "name": "ray-test", "backend": "ray", "nodes": 1, "gpus_per_node": 1, "device": "cpu",
        "ray": {"address": ray_head.address}}))
    checkout.check(checkout.launch("ray-test.yaml", []))

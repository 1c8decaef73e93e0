"""`speedrun launch --cluster <ray>` against a real Ray head on 127.0.0.1 with 8 declared GPUs (ray_cluster.py).

The smoke job runs on CPU with a tiny model (one trainer process per placement-group bundle);
status, logs and cancel go through the CLI after the launching one has exited, as a user would.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from ray_cluster import ray_head  # noqa: F401 (session fixture)

from orchestrator.artifacts import read_manifest, verify_manifest
from orchestrator.backends.base import Handle, SweepState
from orchestrator.backends.ray import MARK, RayBackend
from orchestrator.cluster_config import ClusterConfig
from orchestrator.config import ConfigError
from orchestrator.plan import LaunchPlan
from orchestrator.store import open_store

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TINY = [  # a 2-layer, 64-wide GPT: seconds of training per seed on one CPU core
    "trainer.num_layers=2", "trainer.attn_skip_layers=", "trainer.paired_head_layers=", "trainer.num_value_embeds=1", "trainer.model_dim=64", "trainer.num_heads=1",
    "trainer.bigram_dim=16", "trainer.bigram_rows=50304",   # the default bigram embedding, narrowed
    "trainer.head_dim=64", "trainer.seq_len=256", "trainer.grad_accum_total=1", "trainer.val_seq_len=1024",
    "trainer.val_tokens=4096", "trainer.steps=6", "trainer.val_every=3", "trainer.window_max_blocks=2",
    "trainer.stop_check_every=1",
]


class Speedrun:
    """The CLI as a user runs it against the test Ray head, every directory in one temp root."""

    def __init__(self, root: Path, head):
        self.root, self.store = root, root / "store"
        self.cluster_file = root / "ray-test.yaml"
        self.cluster_file.write_text(yaml.safe_dump({
            "name": "ray-test", "backend": "ray", "nodes": 1, "gpus_per_node": 1, "device": "cpu",
            "data_dir": str(root / "data"), "work_dir": str(root / "work"), "cost_per_hour": 98.32,
            "ray": {"address": head.address},
        }))
        self.env = dict(os.environ, SPEEDRUN_HOME=str(root / "home"), OMP_NUM_THREADS="1", COLUMNS="250")

    def __call__(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def launch(self, *args: str, sets: list[str] = (), detach: bool = True) -> tuple[str, subprocess.CompletedProcess]:
        flags = [x for s in [*TINY, *sets] for x in ("--set", s)]
        proc = self("launch", "jobs/smoke.yaml", "--cluster", str(self.cluster_file), "--store", str(self.store),
                    *flags, *args, *(["--detach"] if detach else []), timeout=600)
        m = re.search(r"launched (\S+) on", proc.stdout)
        assert m, proc.stdout[-3000:] + proc.stderr[-3000:]
        return m.group(1), proc

    def handle(self, sweep: str) -> Handle:
        return Handle.from_dict(json.loads((self.store / sweep / "handle.json").read_text())["handle"])

    def backend(self, sweep: str) -> RayBackend:
        return RayBackend(LaunchPlan.from_json((self.store / sweep / "plan.json").read_text()).cluster)

    def log_text(self, sweep: str) -> str:
        return "\n".join(self.backend(sweep).logs(self.handle(sweep)))

    def wait_for_log(self, sweep: str, pattern: str, timeout_s: float = 300) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log_text(sweep))
            if m:
                return m
            assert not self.backend(sweep).status(self.handle(sweep)).state.finished, self.log_text(sweep)[-3000:]
            time.sleep(1)
        raise AssertionError(f"no {pattern!r} in the job log after {timeout_s}s:\n{self.log_text(sweep)[-3000:]}")


def node_runner_pid(match: re.Match) -> int:
    return int(match.group(1))


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def speedrun(ray_head, tmp_path_factory):  # noqa: F811
    return Speedrun(tmp_path_factory.mktemp("ray-runs"), ray_head)


def test_two_seeds_land_in_the_store_and_logs_outlive_the_cli(speedrun):
    sweep, proc = speedrun.launch("--seeds", "2", detach=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert f"run {sweep}: SUCCEEDED" in proc.stdout
    assert "step:6/6 val_loss" in proc.stdout  # the launching CLI followed the Ray job's log
    assert re.search(r"cost: 1 GPUs x [0-9.]+ h = [0-9.]+ GPU-hours x \$98\.32/GPU-hour", proc.stdout), proc.stdout[-2000:]
    store = open_store(str(speedrun.store))
    for seed in (0, 1):
        manifest = read_manifest(store, f"{sweep}/seed-{seed}")
        assert manifest is not None and manifest.state == "succeeded"
        assert {f.key for f in manifest.files} >= {"train.log", "metrics.jsonl", "timings.json", "env.json"}
        assert verify_manifest(store, manifest) == []
        env = json.loads(store.get_bytes(f"{sweep}/seed-{seed}/env.json"))
        assert env["backend"] == "ray" and env["env"]["RAY_JOB_ID"]
    # After the launching CLI has exited: status and logs find the run through its recorded handle.
    status = speedrun("status", sweep)
    assert status.returncode == 0 and f"{sweep}: SUCCEEDED" in status.stdout, status.stdout + status.stderr
    logs = speedrun("logs", sweep)
    assert logs.stdout.count("step:6/6 val_loss") == 2, logs.stdout[-3000:]
    assert f"{MARK} all seeds done: [0, 1]" in logs.stdout
    assert "(run_node pid=" not in logs.stdout  # Ray's task prefix is dropped on one node


def test_cancel_stops_the_job_and_every_process_under_it(speedrun):
    sweep, _ = speedrun.launch(sets=["trainer.steps=5000"])
    pid = node_runner_pid(speedrun.wait_for_log(sweep, rf"{MARK} node 0: node runner pid (\d+)"))
    speedrun.wait_for_log(sweep, r"step:2/5000 train_loss")
    proc = speedrun("cancel", sweep)
    assert proc.returncode == 0, proc.stderr
    assert speedrun.backend(sweep).status(speedrun.handle(sweep)).state is SweepState.CANCELLED
    assert "CANCELLED" in speedrun("status", sweep).stdout
    deadline = time.monotonic() + 60
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive(pid), "the node runner outlived the cancelled Ray job"
    assert read_manifest(open_store(str(speedrun.store)), f"{sweep}/seed-0") is None


def test_killed_node_runner_is_reported_and_retried(speedrun):
    import ray  # noqa: F401  (Ray's bundled psutil)
    import psutil

    sweep, _ = speedrun.launch(sets=["retries=1", "trainer.steps=40"])
    pid = node_runner_pid(speedrun.wait_for_log(sweep, rf"{MARK} node 0: node runner pid (\d+)"))
    speedrun.wait_for_log(sweep, r"step:2/40 train_loss")
    workers = psutil.Process(pid).children(recursive=True)  # torchrun and the trainer under it
    assert any("trainer" in " ".join(p.cmdline()) for p in workers)
    os.kill(pid, 9)
    backend, handle = speedrun.backend(sweep), speedrun.handle(sweep)
    final = backend.wait(handle, poll_s=1, timeout_s=400)
    log = speedrun.log_text(sweep)
    assert final.state is SweepState.SUCCEEDED, log[-4000:]
    assert f"{MARK} failed (node 0: killed by SIGKILL); retry 1 of 1 for seeds [0]" in log
    assert len(re.findall(rf"{MARK} node 0: node runner pid", log)) == 2
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers), \
        "the killed node runner's torchrun workers were left running beside the retry"
    manifest = read_manifest(open_store(str(speedrun.store)), f"{sweep}/seed-0")
    assert manifest is not None and manifest.state == "succeeded"


@pytest.fixture(scope="module")
def second_node(ray_head):  # noqa: F811
    """Make the test cluster two Ray nodes (8 declared GPUs each); the module's last test uses it."""
    ray_head.add_node(num_gpus=8, num_cpus=1)
    return ray_head


def test_two_nodes_one_node_runner_per_bundle_with_one_torchrun_rendezvous(speedrun, second_node):
    # Both "nodes" share this machine's disk: keep their directories apart by node rank.
    per_node = [f"cluster.data_dir={speedrun.root}/data-$SPEEDRUN_NODE_RANK",
                f"cluster.work_dir={speedrun.root}/work-$SPEEDRUN_NODE_RANK"]
    sweep, proc = speedrun.launch(sets=["cluster.nodes=2", "trainer.grad_accum_total=2", *per_node], detach=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    log = speedrun.log_text(sweep)
    for rank in (0, 1):
        assert f"[node {rank}] {MARK} node {rank}: node runner pid" in log, log[-3000:]
        assert re.search(rf"\[node {rank}\] .*node {rank}/2 on", log), log[-3000:]
        assert (speedrun.root / f"work-{rank}" / sweep).is_dir()
    assert "[node 0] step:6/6 val_loss" in log
    manifest = read_manifest(open_store(str(speedrun.store)), f"{sweep}/seed-0")
    assert manifest is not None and manifest.state == "succeeded"


def test_a_run_unknown_to_the_cluster_is_one_sentence(ray_head):  # noqa: F811
    backend = RayBackend(ClusterConfig(name="t", backend="ray", ray={"address": ray_head.address}))
    handle = Handle(backend="ray", sweep_id="gone", job_ids=["speedrun-gone"], data={"address": ray_head.address})
    assert backend.status(handle).state is SweepState.UNKNOWN
    with pytest.raises(ConfigError, match=r"run gone: Ray job speedrun-gone not found at http://127\.0\.0\.1:"):
        list(backend.logs(handle))

"""`speedrun launch --cluster slurm` against a real single-node Slurm cluster (slurm_cluster.py).

The smoke job runs on CPU with a tiny model so that every test is seconds of training; the node's
eight GPUs are fake, so only the dry-run asks for them.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import slurm_cluster  # noqa: F401 (session fixture)

from orchestrator.backends.base import Handle, SweepState
from orchestrator.plan import LaunchPlan

pytest.importorskip("submitit")
pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
STEPS = 12
TINY = [  # a 2-layer, 64-wide GPT: a step is well under a second on one CPU core
    "trainer.num_layers=2", "trainer.attn_skip_layers=", "trainer.paired_head_layers=", "trainer.num_value_embeds=1", "trainer.model_dim=64", "trainer.num_heads=1",
    "trainer.bigram_dim=16", "trainer.bigram_rows=50304",   # the default bigram embedding, narrowed
    "trainer.head_dim=64", "trainer.seq_len=256", "trainer.grad_accum_total=1", "trainer.val_seq_len=1024",
    "trainer.val_tokens=4096", f"trainer.steps={STEPS}", "trainer.val_every=6", "trainer.window_max_blocks=2",
    "trainer.stop_check_every=1", "checkpoint.final=false",
    "cluster.device=cpu", "cluster.gpus_per_node=1", "cluster.slurm.cpus_per_task=1",
]


class Speedrun:
    """The CLI as a user runs it against the test cluster, with every directory in one temp root."""

    def __init__(self, root: Path, cluster):
        self.root, self.cluster = root, cluster
        self.store = root / "store"
        self.env = dict(os.environ, SLURM_CONF=str(cluster.conf), SPEEDRUN_HOME=str(root / "home"),
                        OMP_NUM_THREADS="1", COLUMNS="250")
        self.sets = [f"cluster.slurm.log_dir={root / 'submitit'}", f"cluster.work_dir={root / 'work'}",
                     f"cluster.data_dir={root / 'data'}"]

    def __call__(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def launch(self, *args: str, sets: list[str] = TINY, detach: bool = True) -> tuple[str, subprocess.CompletedProcess]:
        flags = [x for s in self.sets + sets for x in ("--set", s)]
        proc = self("launch", "jobs/smoke.yaml", "--cluster", "slurm", "--store", str(self.store), *flags,
                    *args, *(["--detach"] if detach else []))
        m = re.search(r"launched (\S+) on", proc.stdout)
        assert m, proc.stdout[-3000:] + proc.stderr[-3000:]
        return m.group(1), proc

    def handle(self, sweep: str) -> Handle:
        return Handle.from_dict(json.loads((self.store / sweep / "handle.json").read_text())["handle"])

    def backend(self, sweep: str):
        from orchestrator.backends.slurm import SlurmBackend

        plan = LaunchPlan.from_json((self.store / sweep / "plan.json").read_text())
        return SlurmBackend(plan.cluster)

    def wait_for(self, what, timeout_s: float = 180, poll_s: float = 0.3):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = what()
            if value:
                return value
            time.sleep(poll_s)
        raise AssertionError(f"timed out after {timeout_s}s; queue: {self.cluster.queue()}")

    def log_text(self, sweep: str) -> str:
        return "\n".join(self.backend(sweep).logs(self.handle(sweep)))


def final_val_loss(store: Path, sweep: str, seed: int) -> float:
    text = (store / sweep / f"seed-{seed}" / "train.log").read_text()
    return float(re.findall(rf"step:{STEPS}/{STEPS} val_loss:([0-9.]+)", text)[-1])


@pytest.fixture(scope="module")
def speedrun(slurm_cluster, tmp_path_factory):  # noqa: F811
    return Speedrun(tmp_path_factory.mktemp("slurm-runs"), slurm_cluster)


@pytest.fixture(scope="module")
def two_seeds(speedrun):
    """jobs/smoke.yaml with 2 seeds, followed to the end by the launching CLI (no --detach)."""
    sweep, proc = speedrun.launch("--seeds", "2", detach=False)
    return sweep, proc


def test_dry_run_prints_the_sbatch_script_and_submits_nothing(speedrun, slurm_cluster):  # noqa: F811
    flags = [x for s in speedrun.sets for x in ("--set", s)]
    proc = speedrun("launch", "jobs/smoke.yaml", "--cluster", "slurm", "--store", str(speedrun.store),
                    "--seeds", "3", "--dry-run", *flags)
    assert proc.returncode == 0, proc.stderr
    for line in ("#SBATCH --gpus-per-node=8", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --signal=USR2@120", "#SBATCH --exclusive", "#SBATCH --cpus-per-task=16", "srun "):
        assert line in proc.stdout, line
    assert slurm_cluster.queue() == [] and not (speedrun.root / "submitit").exists() and not speedrun.store.exists()
    # the script is one Slurm accepts for this node (8 GPUs, 16 CPUs), without running it
    script = proc.stdout[proc.stdout.index("#!/bin/bash"):]
    check = subprocess.run(["sbatch", "--test-only"], input=script, env=speedrun.env, capture_output=True, text=True)
    assert check.returncode == 0 and "to start at" in check.stderr, check.stderr
    assert slurm_cluster.queue() == []


def test_two_seeds_run_back_to_back_and_land_in_the_store(speedrun, two_seeds):
    sweep, proc = two_seeds
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert f"{sweep}: SUCCEEDED" in proc.stdout
    for seed in (0, 1):
        manifest = json.loads((speedrun.store / sweep / f"seed-{seed}" / "manifest.json").read_text())
        assert {f["key"] for f in manifest["files"]} >= {"train.log", "metrics.jsonl", "timings.json", "env.json"}
        assert json.loads((speedrun.store / sweep / f"seed-{seed}" / "env.json").read_text())["env"]["SLURM_JOB_ID"]
    assert len(speedrun.handle(sweep).job_ids) == 1  # one allocation for both seeds
    status = speedrun("status", sweep)
    assert "SUCCEEDED" in status.stdout, status.stdout + status.stderr
    logs = speedrun("logs", sweep)
    assert f"step:{STEPS}/{STEPS}" in logs.stdout and "seed 1: succeeded" in logs.stdout


def test_requeue_in_mid_training_resumes_to_the_same_final_loss(speedrun, slurm_cluster, two_seeds):  # noqa: F811
    # retries=1: on this loopback cluster a released requeue occasionally fails to launch while the old
    # step is torn down; the re-submitted job must then resume from the same checkpoint just the same.
    sweep, _ = speedrun.launch("--seeds", "1", "--set", "retries=1")
    job_id = speedrun.handle(sweep).job_ids[0]
    speedrun.wait_for(lambda: "step:3/" in speedrun.log_text(sweep))
    # what Slurm sends before a time limit or a preemption; submitit checkpoints and requeues on it
    slurm_cluster.run("scancel", "--signal=USR2", job_id)
    speedrun.wait_for(lambda: any(j["state"] == "PENDING" for j in slurm_cluster.queue()))
    assert speedrun.backend(sweep).status(speedrun.handle(sweep)).state == SweepState.PENDING
    slurm_cluster.release(job_id)
    final = speedrun.backend(sweep).wait(speedrun.handle(sweep), poll_s=0.5, timeout_s=240)
    log = speedrun.log_text(sweep)
    assert final.state == SweepState.SUCCEEDED, final.detail + log[-3000:]
    assert "exit code 75" in log
    seed_log = (speedrun.store / sweep / "seed-0" / "train.log").read_text()
    resumed_at = int(re.search(r"resumed from \S+ at step (\d+)", log + seed_log).group(1))
    assert 0 < resumed_at < STEPS
    assert final_val_loss(speedrun.store, sweep, 0) == final_val_loss(speedrun.store, two_seeds[0], 0)


def test_seeds_parallel_runs_a_job_array(speedrun, slurm_cluster):  # noqa: F811
    sweep, _ = speedrun.launch("--seeds", "2", "--seeds-parallel")
    handle = speedrun.handle(sweep)
    base = handle.job_ids[0].split("_")[0]
    assert handle.job_ids == [f"{base}_0", f"{base}_1"]
    final = speedrun.backend(sweep).wait(handle, poll_s=0.5, timeout_s=240)
    assert final.state == SweepState.SUCCEEDED, final.detail
    assert set(final.jobs) == {f"{base}_0", f"{base}_1"}
    for seed in (0, 1):
        assert (speedrun.store / sweep / f"seed-{seed}" / "manifest.json").is_file()


def test_cancel_stops_the_run_after_the_cli_has_exited(speedrun, slurm_cluster):  # noqa: F811
    sweep, _ = speedrun.launch("--seeds", "1", sets=[*TINY, "trainer.steps=100000"])
    speedrun.wait_for(lambda: "step:1/" in speedrun.log_text(sweep))
    out = speedrun("cancel", sweep)
    assert out.returncode == 0 and "cancel requested" in out.stdout, out.stdout + out.stderr
    speedrun.wait_for(lambda: slurm_cluster.queue() == [])
    assert "CANCELLED" in speedrun("status", sweep).stdout
    assert not (speedrun.store / sweep / "seed-0" / "manifest.json").exists()


def test_a_crash_before_the_first_step_is_reported_with_the_log_tail(speedrun):
    missing = speedrun.root / "no-such-shards"
    sweep, proc = speedrun.launch("--seeds", "1", sets=[*TINY, f"data.source={missing}"], detach=False)
    assert proc.returncode == 1
    status = speedrun("status", sweep)
    assert "FAILED" in status.stdout and str(missing) in status.stdout, status.stdout


def test_a_job_that_dies_is_resubmitted_when_retries_allow(speedrun, slurm_cluster, monkeypatch):  # noqa: F811
    sweep, _ = speedrun.launch("--seeds", "1", sets=[*TINY, "retries=1"])
    job_id = speedrun.handle(sweep).job_ids[0]
    speedrun.wait_for(lambda: "seed 0: attempt 1" in speedrun.log_text(sweep))
    # SIGKILL to every process of the job, as when its node dies: no result, no checkpoint, no requeue
    # (scancel --signal=KILL would let Slurm send SIGTERM first, and the node runner checkpoint on it)
    for pid in slurm_cluster.job_pids(job_id):
        os.kill(pid, signal.SIGKILL)
    speedrun.wait_for(lambda: all(j["id"] != job_id or j["state"] not in ("RUNNING", "COMPLETING")
                                  for j in slurm_cluster.queue()))
    # the watcher that re-submits has other thread settings than the launcher had (OMP_NUM_THREADS=1), and
    # Slurm hands a job its submitter's environment: the re-run must still compute as the launch did
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    final = speedrun.backend(sweep).wait(speedrun.handle(sweep), poll_s=0.5, timeout_s=240)
    assert final.state == SweepState.SUCCEEDED, final.detail
    assert job_id not in final.jobs and len(final.jobs) == 1  # the seed ran again as a new job
    assert (speedrun.store / sweep / "seed-0" / "manifest.json").is_file()
    env = json.loads((speedrun.store / sweep / "seed-0" / "env.json").read_text())["env"]
    assert env["SLURM_JOB_ID"] != job_id and env["OMP_NUM_THREADS"] == "1"


def test_two_nodes_run_one_node_runner_each_with_one_torchrun_rendezvous(speedrun):
    # Both nodes share this machine's disk: keep their directories apart by node rank.
    per_node = [f"cluster.data_dir={speedrun.root}/data-$SPEEDRUN_NODE_RANK",
                f"cluster.work_dir={speedrun.root}/work-$SPEEDRUN_NODE_RANK"]
    sweep, proc = speedrun.launch("--seeds", "1", sets=[*TINY, "cluster.nodes=2", "trainer.grad_accum_total=2",
                                                       *per_node], detach=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    job_id = speedrun.handle(sweep).job_ids[0]
    folder = Path(speedrun.handle(sweep).data["folder"])
    for rank in (0, 1):
        node_log = (folder / f"{job_id}_{rank}_log.out").read_text()
        assert f"node {rank}/2 on" in node_log, node_log[-3000:]
        assert (speedrun.root / f"work-{rank}" / sweep).is_dir()
    assert f"step:{STEPS}/{STEPS} val_loss" in speedrun.log_text(sweep)
    assert json.loads((speedrun.store / sweep / "seed-0" / "manifest.json").read_text())["files"]


def test_a_failing_squeue_during_a_running_job_submits_nothing(speedrun, slurm_cluster, tmp_path, monkeypatch):  # noqa: F811
    sweep, _ = speedrun.launch("--seeds", "1", sets=[*TINY, "retries=2", "trainer.steps=100000"])
    job_id = speedrun.handle(sweep).job_ids[0]
    speedrun.wait_for(lambda: "seed 0: attempt 1" in speedrun.log_text(sweep))
    # what squeue and sacct do when slurmctld is unreachable: exit 1, nothing on stdout
    broken = tmp_path / "broken-bin"
    broken.mkdir()
    for tool in ("squeue", "sacct"):
        (broken / tool).write_text("#!/bin/sh\necho 'slurm_load_jobs error: Unable to contact slurm controller' >&2\nexit 1\n")
        (broken / tool).chmod(0o755)
    path = f"{broken}{os.pathsep}{os.environ['PATH']}"
    with monkeypatch.context() as m:
        m.setenv("PATH", path)
        env = dict(speedrun.env, PATH=path)
        status = subprocess.run([sys.executable, "-m", "orchestrator.cli", "status", sweep], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=120)
        # two watchers at once, the CLI's and one in this process: neither may take the job for dead
        watcher = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "watch", sweep, "--poll", "0.5"],
                                   cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen = speedrun.backend(sweep).wait(speedrun.handle(sweep), poll_s=0.5, timeout_s=6)
        watcher.terminate()
        watched = watcher.communicate(timeout=30)[0]
    assert "re-submitted as job" not in watched, watched
    assert status.returncode == 0 and "UNKNOWN" in status.stdout and "squeue did not answer" in status.stdout, \
        status.stdout + status.stderr
    assert seen.state == SweepState.UNKNOWN and seen.jobs == {job_id: SweepState.UNKNOWN}
    # nothing was submitted: one job in the folder's record, none in the queue but ours, no attempt claimed
    folder = Path(speedrun.handle(sweep).data["folder"])
    assert [j["id"] for j in json.loads((folder / "jobs.json").read_text())] == [job_id]
    assert not (speedrun.store / sweep / "attempts").exists()
    assert [j["id"] for j in slurm_cluster.queue() if j["state"] in ("PENDING", "RUNNING")] == [job_id]
    assert speedrun.backend(sweep).status(speedrun.handle(sweep)).state == SweepState.RUNNING
    speedrun("cancel", sweep)
    speedrun.wait_for(lambda: slurm_cluster.queue() == [])

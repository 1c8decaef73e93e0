"""The Slurm backend's pure parts: sbatch parameters, the dry-run script, states, the node command."""
from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("submitit")

from orchestrator.backends.base import SweepState  # noqa: E402
from orchestrator.backends.slurm import (  # noqa: E402
    SlurmBackend, _job_state, _overall, parse_extra_sbatch, sbatch_parameters,
)
from orchestrator.backends.slurm_task import NOT_REQUEUED, NodeTask  # noqa: E402
from orchestrator.cluster_config import ClusterConfig, load_cluster  # noqa: E402
from orchestrator.config import ConfigError, load_job  # noqa: E402
from orchestrator.plan import build_plan  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def cluster(**slurm) -> ClusterConfig:
    return ClusterConfig(name="t", backend="slurm", nodes=2, gpus_per_node=8, setup=["module load cuda/12.4"],
                         slurm={"partition": "gpu", "account": "lab", "qos": "high", "time_min": 30, "cpus_per_task": 64,
                                "mem_gb": 400, "constraint": "h100", "exclusive": True,
                                "extra_sbatch": ["--reservation=speedrun", "#SBATCH --requeue"], **slurm})


def plan_for(c: ClusterConfig, seeds: int = 3, tmp: Path | None = None):
    job = load_job(REPO / "jobs" / "smoke.yaml")
    return build_plan(job, c, REPO / "jobs" / "smoke.yaml", REPO / "cluster_configs" / "slurm.yaml",
                      seeds=seeds, store=str(tmp or "/tmp/store"))


def test_every_cluster_setting_reaches_sbatch():
    p = sbatch_parameters(cluster(), "speedrun-x")
    assert p["partition"] == "gpu" and p["account"] == "lab" and p["qos"] == "high"
    assert p["nodes"] == 2 and p["ntasks_per_node"] == 1 and p["gpus_per_node"] == 8
    assert p["cpus_per_task"] == 64 and p["mem"] == "400GB" and p["time"] == 30
    assert p["constraint"] == "h100" and p["exclusive"] is True
    assert p["additional_parameters"] == {"reservation": "speedrun", "requeue": True}
    assert p["setup"] == ["module load cuda/12.4"]


def test_cpu_cluster_requests_no_gpus():
    c = cluster()
    c.device = "cpu"
    assert "gpus_per_node" not in sbatch_parameters(c, "x")


def test_dry_run_script_runs_seeds_back_to_back_in_one_job(tmp_path):
    c = cluster(log_dir=str(tmp_path / "sub"))
    text = SlurmBackend(c).describe(plan_for(c))
    for line in ("#SBATCH --partition=gpu", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --time=30", "#SBATCH --signal=USR2@120",
                 "#SBATCH --reservation=speedrun", "#SBATCH --exclusive", "module load cuda/12.4",
                 "-m submitit.core._submit"):
        assert line in text, line
    assert "--array" not in text
    assert not (tmp_path / "sub").exists()  # describing creates nothing


def test_seeds_parallel_is_a_job_array_of_one_task_per_seed(tmp_path):
    c = cluster(log_dir=str(tmp_path), seeds_parallel=True)
    text = SlurmBackend(c).describe(plan_for(c, seeds=4))
    assert "#SBATCH --array=0-3%4" in text and "job array of 4 tasks" in text


def test_extra_sbatch_lines_must_be_long_options():
    with pytest.raises(ConfigError, match="reservation=x.*is not a long sbatch option"):
        parse_extra_sbatch(["reservation=x"])
    assert parse_extra_sbatch(["--mail-type=END,FAIL"]) == {"mail-type": "END,FAIL"}


def test_a_bad_extra_sbatch_line_is_named_by_the_cluster_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("backend: slurm\nslurm:\n  extra_sbatch: ['-p gpu']\n")
    with pytest.raises(ConfigError, match=r"c.yaml: slurm.extra_sbatch.*'-p gpu' is not a long sbatch option"):
        load_cluster(str(f))


def test_shipped_slurm_config_loads_and_asks_for_eight_gpus():
    c, _ = load_cluster(str(REPO / "cluster_configs" / "slurm.yaml"))
    assert c.backend == "slurm" and sbatch_parameters(c, "x")["gpus_per_node"] == 8


def fake_env(node: int, nnodes: int, folder: Path) -> SimpleNamespace:
    return SimpleNamespace(paths=SimpleNamespace(folder=folder), job_id="4242", array_job_id=None,
                           hostnames=["gpu-a", "gpu-b"][:nnodes], node=node, num_nodes=nnodes)


def test_every_node_rendezvouses_on_the_first_node(tmp_path, monkeypatch):
    monkeypatch.setattr("orchestrator.backends.slurm_task._node_address", {"gpu-a": "10.0.0.1"}.get)
    task = NodeTask('{"x": 1}', "/venv/bin/python")
    cmds = [task.node_command(fake_env(r, 2, tmp_path)) for r in (0, 1)]
    for rank, cmd in enumerate(cmds):
        args = dict(zip(cmd[3::2], cmd[4::2]))
        assert cmd[:3] == ["/venv/bin/python", "-m", "orchestrator.node"]
        assert args["--node-rank"] == str(rank) and args["--nnodes"] == "2"
        assert args["--master-addr"] == "10.0.0.1" and args["--master-port"] == str(20000 + 4242)
    assert (tmp_path / "plan-4242.json").read_text() == '{"x": 1}'


def test_node_task_pickles_without_its_child_process():
    task = NodeTask("{}", "python", requeues=2)
    task._proc = object()  # a live Popen is not picklable; it must not travel to the requeued job
    back = pickle.loads(pickle.dumps(task))
    assert back._proc is None and back.requeues == 2 and back.plan_json == "{}"


def test_job_states_from_queue_result_and_cancel_marker(tmp_path):
    from submitit.core.utils import cloudpickle_dump

    assert _job_state(tmp_path, "7", "RUNNING", False)[0] == SweepState.RUNNING
    assert _job_state(tmp_path, "7", "PENDING", False)[0] == SweepState.PENDING
    (tmp_path / "7_0_log.out").write_text("submitit INFO - Starting\n[node] staging\nTraceback\nValueError: bad shard\n"
                                          "submitit ERROR - Submitted job triggered an exception\nTraceback\n"
                                          "RuntimeError: node runner exited with code 1\n")
    state, why, retryable = _job_state(tmp_path, "7", None, False)
    assert state == SweepState.FAILED and why.startswith("died") and why.endswith("ValueError: bad shard") and retryable
    assert "submitit" not in why  # the tail is the node runner's output, not submitit's traceback of it
    assert _job_state(tmp_path, "7", None, True)[0] == SweepState.CANCELLED
    cloudpickle_dump(("error", "Traceback...\nRuntimeError: node runner exited with code 1"), tmp_path / "7_0_result.pkl")
    state, why, retryable = _job_state(tmp_path, "7", "COMPLETED", False)
    assert state == SweepState.FAILED and "exited with code 1" in why and "bad shard" in why and not retryable
    assert _job_state(tmp_path, "7", "CANCELLED", False)[0] == SweepState.CANCELLED  # someone ran scancel
    assert _job_state(tmp_path, "7", "COMPLETED", True)[0] == SweepState.CANCELLED  # our scancel made that error
    cloudpickle_dump(("success", {"exit_code": 0}), tmp_path / "8_0_result.pkl")
    assert _job_state(tmp_path, "8", "COMPLETED", False)[0] == SweepState.SUCCEEDED
    cloudpickle_dump(("error", f"RuntimeError: node runner {NOT_REQUEUED}: stopped by SIGTERM"), tmp_path / "9_0_result.pkl")
    assert _job_state(tmp_path, "9", "COMPLETED", False)[2]  # checkpointed: running it again resumes it


def test_run_state_is_the_least_finished_job():
    S = SweepState
    assert _overall([S.SUCCEEDED, S.RUNNING]) == S.RUNNING
    assert _overall([S.SUCCEEDED, S.PENDING]) == S.PENDING
    assert _overall([S.SUCCEEDED, S.SUCCEEDED]) == S.SUCCEEDED
    assert _overall([S.SUCCEEDED, S.FAILED]) == S.FAILED
    assert _overall([S.CANCELLED, S.FAILED]) == S.CANCELLED


def test_a_run_launched_elsewhere_is_one_clear_error(tmp_path):
    from orchestrator.backends.base import Handle

    backend = SlurmBackend(cluster())
    handle = Handle(backend="slurm", sweep_id="x", job_ids=["1"], data={"folder": str(tmp_path / "x")})
    with pytest.raises(ConfigError, match="submitit folder is not here"):
        backend.cancel(handle)
    with pytest.raises(ConfigError, match="submitit folder is not here"):
        backend.status(handle)

"""The Ray backend without a cluster: what --dry-run shows, what the job ships, how logs and errors read."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from orchestrator.backends.base import Handle
from orchestrator.backends.ray import EXCLUDES, MARK, PLAN_ENV, RayBackend, _latest_mark, _NodeNames
from orchestrator.cluster_config import load_cluster
from orchestrator.config import ConfigError, load_job
from orchestrator.plan import build_plan

REPO = Path(__file__).resolve().parents[2]


def _plan(**cluster_overrides):
    job = load_job(REPO / "jobs" / "smoke.yaml")
    sets = [f"cluster.{k}={v}" for k, v in cluster_overrides.items()]
    cluster, path = load_cluster("ray", sets)
    return build_plan(job, cluster, REPO / "jobs" / "smoke.yaml", path, seeds=2, store="/tmp/store"), cluster


def test_dry_run_shows_entrypoint_bundles_and_runtime_env_but_not_the_plan_body():
    plan, cluster = _plan(nodes=2)
    text = RayBackend(cluster).describe(plan)
    assert "entrypoint: python -m orchestrator.backends.ray" in text
    assert 'placement group of 2 bundle(s) {"GPU": 8, "CPU": 1}, strategy STRICT_SPREAD' in text
    assert "--node-rank R --nnodes 2 --master-addr <bundle 0's node IP>" in text
    assert "torchrun --nproc_per_node=8" in text and "seeds [0, 1]" in text
    assert f"working_dir: {REPO}" in text and ".venv/" in text
    assert f"{PLAN_ENV}=<the launch plan" in text and plan.sweep_id in text
    assert '"seeds"' not in text  # the plan JSON itself is summarised, not dumped


def test_runtime_env_ships_the_checkout_and_the_plan():
    plan, cluster = _plan()
    cluster.ray.excludes = ["records/"]
    cluster.ray.pip = ["tiktoken"]
    env = RayBackend(cluster).runtime_env(plan)
    assert env["working_dir"] == str(REPO)
    assert env["excludes"] == EXCLUDES + ["records/"]
    assert {".venv/", ".git/", "runs/", "*.bin"} <= set(env["excludes"])
    assert json.loads(env["env_vars"][PLAN_ENV])["sweep_id"] == plan.sweep_id
    assert env["pip"] == ["tiktoken"]
    # Ray's job stop must leave time to stop the node runners before it SIGKILLs the driver.
    assert int(env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]) > 15


def test_unreachable_ray_address_is_one_sentence():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    plan, cluster = _plan(**{"ray.address": f"http://127.0.0.1:{port}"})
    with pytest.raises(ConfigError, match=rf"ray\.yaml: ray\.address: cannot reach the Ray Jobs API at http://127\.0\.0\.1:{port}"):
        RayBackend(cluster).submit(plan)


def test_status_detail_is_the_drivers_latest_line():
    logs = f"x\n{MARK} starting seeds [0, 1] on 1 node(s)\nstep:1/5\n{MARK} failed (node 0: killed by SIGKILL); retry 1 of 1\n"
    assert _latest_mark(logs) == "failed (node 0: killed by SIGKILL); retry 1 of 1"
    assert _latest_mark("nothing yet") == ""


def test_ray_task_prefixes_become_node_names():
    lines = [
        f"(run_node pid=41, ip=10.0.0.1) {MARK} node 0: node runner pid 99 on 10.0.0.1, seeds [0]",
        f"\x1b[36m(run_node pid=42, ip=10.0.0.2)\x1b[0m {MARK} node 1: node runner pid 98 on 10.0.0.2, seeds [0]",
        "(run_node pid=41, ip=10.0.0.1) step:1/5 train_loss:10.8 train_time:1ms step_avg:1.00ms",
        "(run_node pid=42, ip=10.0.0.2) rank 8 ready",
        "plain driver line",
    ]
    names = _NodeNames(2)
    two = [names.rewrite(x) for x in lines]
    assert two[2] == "[node 0] step:1/5 train_loss:10.8 train_time:1ms step_avg:1.00ms"
    assert two[3] == "[node 1] rank 8 ready" and two[4] == "plain driver line"
    one = _NodeNames(1)
    assert one.rewrite(lines[2]) == "step:1/5 train_loss:10.8 train_time:1ms step_avg:1.00ms"


def test_handle_round_trips_through_json():
    h = Handle(backend="ray", sweep_id="s", job_ids=["speedrun-s"], data={"address": "http://127.0.0.1:8265", "nodes": 1})
    assert Handle.from_dict(json.loads(json.dumps(h.to_dict()))) == h


def test_what_the_driver_does_after_an_attempt():
    from orchestrator.backends.ray_driver import next_step

    assert next_step({0: 0, 1: 0}, [0, 1], [0, 1], 0, 0, 0) == ("done", "all seeds done: [0, 1]")
    # A node runner killed outright: retried while retries last, then the run fails, naming why.
    assert next_step({0: -9}, [0, 1], [1], 0, 1, 0) == (
        "retry", "failed (node 0: killed by SIGKILL); retry 1 of 1 for seeds [1]")
    action, line = next_step({0: -9}, [0, 1], [1], 1, 1, 0)
    assert action == "failed" and "no retries left (retries: 1)" in line
    # The node runner already spent the seed's retries on its trainer: no second round here.
    action, line = next_step({0: 1}, [0], [0], 0, 3, 0)
    assert action == "failed" and "failed after their retries" in line
    # Its Ray worker or machine lost: that is a retry too; the other node was stopped with it.
    action, line = next_step({0: "Ray worker lost (WorkerCrashedError)", 1: "stopped with the other nodes"},
                             [0], [0], 0, 1, 0)
    assert action == "retry" and "node 0: Ray worker lost" in line and "node 1: stopped with the other nodes" in line
    # Preempted (checkpointed, exit 75): resumed without spending a retry.
    assert next_step({0: 75}, [0], [0], 0, 0, 0)[0] == "resume"
    # Failed exit, yet every seed committed its manifest: nothing to redo.
    assert next_step({0: -15}, [0], [], 0, 0, 0)[0] == "done"

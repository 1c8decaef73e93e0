"""The launcher's thread settings travel in the plan, so a job re-submitted from another shell computes the same."""
from pathlib import Path

from orchestrator.cluster_config import load_cluster
from orchestrator.config import load_job
from orchestrator.plan import LAUNCH_ENV_KEYS, LaunchPlan, build_plan, launch_env
from orchestrator.node import apply_launch_env

REPO = Path(__file__).resolve().parents[2]


def test_launch_env_records_values_and_absences():
    env = launch_env({"OMP_NUM_THREADS": "1", "AWS_SECRET_ACCESS_KEY": "x", "PATH": "/bin"})
    assert env["OMP_NUM_THREADS"] == "1"
    assert set(env) == set(LAUNCH_ENV_KEYS)                 # named keys only: never secrets or PATH
    assert env["MKL_NUM_THREADS"] is None                   # unset at launch: to be unset on the node too


def test_plan_carries_it_through_json_and_old_plans_still_load():
    job = load_job(REPO / "jobs" / "smoke.yaml")
    cluster, cluster_file = load_cluster("local")
    plan = build_plan(job, cluster, REPO / "jobs" / "smoke.yaml", cluster_file, environ={"OMP_NUM_THREADS": "3"})
    again = LaunchPlan.from_json(plan.to_json())
    assert again.launch_env["OMP_NUM_THREADS"] == "3" and again.launch_env["MKL_NUM_THREADS"] is None
    old = plan.to_dict()
    del old["launch_env"]                                   # a plan.json written before this field existed
    assert LaunchPlan.from_dict(old).launch_env == {}


def test_node_puts_the_launchers_values_back():
    inherited = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "8", "PATH": "/bin"}   # what the re-submitter had
    env = apply_launch_env(inherited, {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": None})
    assert env == {"OMP_NUM_THREADS": "1", "PATH": "/bin"}
    assert inherited["MKL_NUM_THREADS"] == "8"              # a new mapping; the process env is untouched

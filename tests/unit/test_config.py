"""Bad input: one sentence naming file, key and fix; exit code 2; nothing created."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from orchestrator import cli
from orchestrator.cluster_config import load_cluster
from orchestrator.config import ConfigError, load_job, parse_override
from orchestrator.plan import LaunchPlan, build_plan
from tests.conftest import tree

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A scratch cwd holding a copy of the smoke job and the local cluster pointed inside it."""
    (tmp_path / "jobs").mkdir()
    (tmp_path / "cluster_configs").mkdir()
    shutil.copy(REPO / "jobs/smoke.yaml", tmp_path / "jobs/smoke.yaml")
    local = yaml.safe_load((REPO / "cluster_configs/local.yaml").read_text())
    local.update(data_dir=str(tmp_path / "data"), work_dir=str(tmp_path / "work"), store=str(tmp_path / "runs"))
    (tmp_path / "cluster_configs/local.yaml").write_text(yaml.safe_dump(local))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_job(ws: Path, **changes) -> str:
    job = yaml.safe_load((ws / "jobs/smoke.yaml").read_text())
    for dotted, value in changes.items():
        cur = job
        *head, last = dotted.split("__")
        for h in head:
            cur = cur.setdefault(h, {})
        cur[last] = value
    p = ws / "jobs/bad.yaml"
    p.write_text(yaml.safe_dump(job))
    return "jobs/bad.yaml"


def run_cli(ws: Path, capsys, *argv: str) -> tuple[int, str]:
    before = tree(ws)
    rc = cli.main(list(argv))
    err = capsys.readouterr().err
    created = tree(ws) - before
    assert created == set(), f"bad input created {created}"
    return rc, " ".join(err.split())


def test_smoke_job_and_local_cluster_load():
    job = load_job(REPO / "jobs/smoke.yaml")
    cluster, path = load_cluster("local")
    assert job.name == "smoke" and job.data.source.startswith("synthetic://")
    assert cluster.backend == "local" and path.name == "local.yaml"


def test_every_shipped_job_validates():
    for p in sorted((REPO / "jobs").glob("*.yaml")):
        load_job(p)


def test_overrides_apply_to_job_and_cluster():
    job = load_job(REPO / "jobs/smoke.yaml", ["trainer.steps=50", "seeds=3", "cluster.nodes=2"])
    cluster, _ = load_cluster("local", ["trainer.steps=50", "cluster.gpus_per_node=4"])
    assert job.trainer["steps"] == 50 and job.seeds == 3
    assert cluster.gpus_per_node == 4


def test_override_needs_equals():
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        parse_override("trainer.steps")


def test_unknown_key_suggests_close_match(workspace, capsys):
    job = write_job(workspace, sedes=2)
    rc, err = run_cli(workspace, capsys, "launch", job)
    assert rc == 2
    assert "jobs/bad.yaml: sedes: unknown key; did you mean 'seeds'?" in err


def test_unknown_trainer_key_suggests_close_match(workspace, capsys):
    job = write_job(workspace, trainer__num_layer=3)
    rc, err = run_cli(workspace, capsys, "launch", job)
    assert rc == 2 and "trainer.num_layer: unknown key; did you mean 'num_layers'?" in err


def test_wrong_type_names_key(workspace, capsys):
    job = write_job(workspace, seeds="many")
    rc, err = run_cli(workspace, capsys, "launch", job)
    assert rc == 2 and "jobs/bad.yaml: seeds:" in err and "integer" in err


def test_wrong_trainer_type_names_key(workspace, capsys):
    rc, err = run_cli(workspace, capsys, "launch", "jobs/smoke.yaml", "--set", "trainer.model_dim=wide")
    assert rc == 2 and "trainer.model_dim: must be int" in err


@pytest.mark.parametrize("steps", [0, -5])
def test_steps_must_be_positive(workspace, capsys, steps):
    rc, err = run_cli(workspace, capsys, "launch", "jobs/smoke.yaml", "--set", f"trainer.steps={steps}")
    assert rc == 2 and f"--set trainer.steps={steps} (on jobs/smoke.yaml): trainer.steps: must be > 0 (got {steps})" in err


def test_missing_job_file(workspace, capsys):
    rc, err = run_cli(workspace, capsys, "launch", "jobs/nope.yaml")
    assert rc == 2 and "jobs/nope.yaml: no such job file" in err


def test_unknown_cluster_name(workspace, capsys):
    rc, err = run_cli(workspace, capsys, "launch", "jobs/smoke.yaml", "--cluster", "locl")
    assert rc == 2 and "--cluster locl: no cluster_configs/locl.yaml; did you mean 'local'?" in err


@pytest.fixture
def readonly_dir(tmp_path):
    """A directory nobody can write: mode 0500 for ordinary users, a read-only tmpfs for root."""
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(0o500)
    mounted = False
    if os.access(ro, os.W_OK):  # root ignores mode bits: use a read-only filesystem instead
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)],
                                 capture_output=True).returncode == 0
        if not mounted:
            pytest.skip("cannot make an unwritable directory here (root without mount permission)")
    yield ro
    if mounted:
        subprocess.run(["umount", str(ro)], check=True)
    ro.chmod(0o700)


def test_unwritable_store(workspace, capsys, readonly_dir):
    rc, err = run_cli(workspace, capsys, "launch", "jobs/smoke.yaml", "--store", str(readonly_dir / "runs"))
    assert rc == 2 and "--store" in err and "not writable" in err


def test_unwritable_work_dir(workspace, capsys, readonly_dir):
    rc, err = run_cli(workspace, capsys, "launch", "jobs/smoke.yaml", "--set", f"cluster.work_dir={readonly_dir}/w")
    assert rc == 2 and "work_dir" in err and "not writable" in err


def test_store_that_is_a_file(workspace, capsys):
    (workspace / "afile").write_text("x")
    rc, err = run_cli(workspace, capsys, "launch", "jobs/smoke.yaml", "--store", str(workspace / "afile"))
    assert rc == 2 and "is a file, not a directory" in err


def test_unwritable_data_dir(workspace, capsys):
    (workspace / "blocker").write_text("x")
    rc, err = run_cli(workspace, capsys, "launch", "jobs/smoke.yaml", "--set", f"data.dir={workspace}/blocker/data")
    assert rc == 2 and "data.dir" in err and "choose a data directory" in err


@pytest.mark.parametrize("store", ["runs/../../elsewhere", "s3://bucket/a/../../b"])
def test_store_escaping_root(workspace, capsys, store):
    rc, err = run_cli(workspace, capsys, "launch", "jobs/smoke.yaml", "--store", store)
    assert rc == 2 and "escapes its root" in err


def test_job_name_cannot_escape_store(workspace, capsys):
    job = write_job(workspace, name="../../etc")
    rc, err = run_cli(workspace, capsys, "launch", job)
    assert rc == 2 and "jobs/bad.yaml: name:" in err


def test_invalid_yaml(workspace, capsys):
    (workspace / "jobs/broken.yaml").write_text("name: [unclosed\n")
    rc, err = run_cli(workspace, capsys, "launch", "jobs/broken.yaml")
    assert rc == 2 and "jobs/broken.yaml: not valid YAML" in err


def test_dry_run_prints_plan_and_creates_nothing(workspace, capsys):
    before = tree(workspace)
    rc = cli.main(["launch", "jobs/smoke.yaml", "--dry-run", "--seeds", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    assert tree(workspace) == before
    assert "smoke-" in out and "orchestrator.node" in out and "0, 1" in out


def test_plan_round_trips_through_json():
    job = load_job(REPO / "jobs/smoke.yaml")
    cluster, cpath = load_cluster("local")
    plan = build_plan(job, cluster, REPO / "jobs/smoke.yaml", cpath, seeds=3, store="runs", now=0.0)
    again = LaunchPlan.from_json(plan.to_json())
    assert again.to_dict() == plan.to_dict()
    assert plan.seeds == [0, 1, 2]
    assert plan.sweep_id.startswith("smoke-19700101T000000Z-")


def test_unreachable_ray_cluster_leaves_nothing(workspace, capsys):
    """The backend's pre-flight check runs before the plan is written to the store."""
    pytest.importorskip("ray")
    shutil.copy(REPO / "cluster_configs/ray.yaml", workspace / "cluster_configs/ray.yaml")
    rc, err = run_cli(workspace, capsys, "launch", "jobs/smoke.yaml", "--cluster", "ray",
                      "--set", "cluster.ray.address=http://127.0.0.1:9", "--store", str(workspace / "runs"))
    assert rc == 2 and "ray.address" in err and "cannot reach" in err

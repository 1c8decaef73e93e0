"""The shipped Ray cluster-launcher examples, checked without provisioning anything; the cost line."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from orchestrator.backends.ray_launcher import cluster_command
from orchestrator.backends.ray_launcher_config import (check_launcher, launcher_config, load_rented, provisioning,
                                                       ray_schema)
from orchestrator.cluster_config import ClusterConfig, load_cluster
from orchestrator.config import ConfigError
from orchestrator.summary import cost_line

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = ["ray-cluster-aws", "ray-cluster-onprem"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_is_our_cluster_config_and_a_valid_ray_launcher_config(name):
    import jsonschema

    cluster, path = load_cluster(str(REPO / "cluster_configs" / f"{name}.yaml"))
    assert cluster.backend == "ray" and cluster.gpus_per_node == 8 and cluster.cost_per_hour > 0
    assert cluster.data_dir.startswith("/mnt/nvme/")
    config, key = launcher_config(cluster, path)
    jsonschema.Draft7Validator(ray_schema()).validate(config)  # the schema ray itself validates with
    check_launcher(config, cluster, path, key)
    # The code travels to the node: the checkout is mounted, its setup scripts exist.
    assert Path(config["file_mounts"]["~/speedrun"]) == REPO
    for line in config["setup_commands"]:
        for word in line.split():
            if word.startswith("~/speedrun/cluster_configs/"):
                assert (REPO / word.removeprefix("~/speedrun/")).is_file(), word
    assert any("mount-nvme.sh /mnt/nvme" in line for line in config["setup_commands"])
    assert any("ray start --head" in line for line in config["head_start_ray_commands"])


def test_aws_example_rents_one_p5_and_prices_it():
    cluster, path = load_cluster(str(REPO / "cluster_configs" / "ray-cluster-aws.yaml"))
    config, _ = launcher_config(cluster, path)
    groups = provisioning(config)
    assert [(g.role, g.instance, g.count) for g in groups] == [("head", "p5.48xlarge", 1)]
    assert config["provider"]["region"] == "us-east-1"


def _aws() -> tuple[ClusterConfig, Path, dict]:
    cluster, path = load_cluster(str(REPO / "cluster_configs" / "ray-cluster-aws.yaml"))
    config, _ = launcher_config(cluster, path)
    return cluster, path, config


def test_launcher_config_breaking_ray_schema_names_the_key():
    cluster, path, config = _aws()
    bad = copy.deepcopy(config)
    bad["available_node_types"]["p5-head"]["min_workers"] = "one"
    with pytest.raises(ConfigError, match=r"ray\.launcher\.available_node_types\.p5-head\.min_workers: 'one' is not of type 'integer'"):
        check_launcher(bad, cluster, path, "ray.launcher")
    bad = {k: v for k, v in config.items() if k != "provider"}
    with pytest.raises(ConfigError, match="'provider' is a required property"):
        check_launcher(bad, cluster, path, "ray.launcher")


def test_more_nodes_than_the_launcher_starts_is_refused():
    cluster, path, config = _aws()
    two = cluster.model_copy(update={"nodes": 2})
    with pytest.raises(ConfigError, match=r"nodes: 2 nodes of 8 GPUs asked for, but ray.launcher starts 1"):
        check_launcher(config, two, path, "ray.launcher")
    config["available_node_types"]["p5-worker"].update(min_workers=1, max_workers=1)
    config["max_workers"] = 1
    check_launcher(config, two, path, "ray.launcher")
    assert sum(g.count for g in provisioning(config)) == 2


def test_cluster_without_launcher_is_not_provisionable(tmp_path):
    with pytest.raises(ConfigError, match=r"ray\.launcher: this cluster config provisions nothing"):
        load_rented(str(REPO / "cluster_configs" / "ray.yaml"))


def test_launcher_from_a_separate_file_and_a_missing_one(tmp_path):
    launcher = tmp_path / "launch.yaml"
    launcher.write_text(yaml.safe_dump({"cluster_name": "x", "provider": {"type": "local", "head_ip": "10.0.0.1",
                                                                          "worker_ips": []}}))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"backend": "ray", "ray": {"cluster_yaml": "launch.yaml"}}))
    cluster, path, config = load_rented(str(cfg))
    assert config["provider"]["head_ip"] == "10.0.0.1"
    launcher.unlink()
    with pytest.raises(ConfigError, match=r"ray\.cluster_yaml: .*launch\.yaml does not exist"):
        load_rented(str(cfg))


def test_dry_run_prints_instances_and_price_and_calls_nothing(capsys, monkeypatch):
    import ray.autoscaler.sdk as sdk
    from rich.console import Console

    def boom(*a, **k):
        raise AssertionError("a dry run must not call the cluster launcher")

    for fn in ("create_or_update_cluster", "teardown_cluster", "get_head_node_ip"):
        monkeypatch.setattr(sdk, fn, boom)
    args = type("A", (), {"action": "up", "config": str(REPO / "cluster_configs" / "ray-cluster-aws.yaml"), "dry_run": True,
                       "yes": False})
    console = Console(width=200, force_terminal=False)
    assert cluster_command(args, console) == 0
    out = capsys.readouterr().out
    assert "p5.48xlarge" in out and "us-east-1" in out and "55.04" in out and "dry run" in out
    args.action = "down"
    assert cluster_command(args, console) == 0


def test_cost_line_is_gpu_hours_times_the_rate():
    cluster = ClusterConfig(name="p5", backend="ray", nodes=2, gpus_per_node=8, cost_per_hour=55.04)
    line = cost_line(cluster, 1800)  # half an hour on 16 GPUs
    assert "16 GPUs x 0.50 h = 8.00 GPU-hours" in line
    assert "$6.88/GPU-hour" in line and line.endswith("= $55.04")
    free = ClusterConfig(name="mine", backend="local", gpus_per_node=2)
    assert "no cost_per_hour" in cost_line(free, 3600) and "$" not in cost_line(free, 3600).split("(")[0]


def test_cli_cluster_dry_run_and_bad_input(capsys):
    from orchestrator.cli import main

    assert main(["cluster", "up", "ray-cluster-onprem", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "existing machine" in out and "10.0.0.10" in out and "16.00" in out and "mount-nvme.sh" in out
    assert main(["cluster", "up", "ray", "--dry-run"]) == 2  # a cluster config that provisions nothing
    err = " ".join(capsys.readouterr().err.split())  # rich wraps at the terminal width
    assert "ray.launcher: this cluster config provisions nothing" in err and "Traceback" not in err
    assert main(["cluster", "down", "no-such-cluster", "--dry-run"]) == 2
    assert "no cluster_configs/no-such-cluster.yaml" in " ".join(capsys.readouterr().err.split())

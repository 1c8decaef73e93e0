"""The AWS example against a simulated EC2: moto_server on 127.0.0.1 (s3_server.MotoServer), fake keys.

How far the Ray cluster launcher gets with cluster_configs/ray-cluster-aws.yaml as shipped (only the
cluster name, ray.address and an SSH that fails at once changed): it checks the AWS environment, takes
the instance profile Ray made on an earlier `up` (made here by the test: Ray waits 30 s for IAM to propagate
when it makes one), creates the key pair (its .pem under this test's HOME) and the security group, launches ONE p5.48xlarge head through RunInstances with the config's ImageId (moto takes the SSM alias
as it is; real EC2 resolves it), tags it, and then waits for SSH, which never answers: there is no
machine. `up` then fails with one sentence; `status` lists the head from EC2 without creating anything;
`down` terminates it; `launch --down` releases the head it started when provisioning fails. What moto
cannot say: that the AMI boots, that install.sh and mount-nvme.sh work on it, the real price.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from s3_server import ENV, MotoServer, free_port, moto_binary

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
NAME = "speedrun-moto"


@pytest.fixture(scope="module")
def aws(tmp_path_factory):
    if not Path(moto_binary()).exists():
        pytest.skip("moto_server is not installed next to this python; install the [dev] extra")
    root = tmp_path_factory.mktemp("aws")
    with MotoServer() as moto:
        iam = client(moto, "iam")  # what Ray's first `up` in an account leaves: its role in its instance profile
        iam.create_role(RoleName="ray-autoscaler-v1", AssumeRolePolicyDocument=json.dumps({"Statement": [
            {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}))
        iam.create_instance_profile(InstanceProfileName="ray-autoscaler-v1")
        iam.add_role_to_instance_profile(InstanceProfileName="ray-autoscaler-v1", RoleName="ray-autoscaler-v1")
        cfg = yaml.safe_load((REPO / "cluster_configs" / "ray-cluster-aws.yaml").read_text())
        cfg["ray"]["address"] = f"http://127.0.0.1:{free_port()}"  # nothing answers there
        launcher = cfg["ray"]["launcher"]
        launcher["cluster_name"] = NAME
        launcher["auth"]["ssh_proxy_command"] = "false"  # SSH to the simulated node fails at once, as a dead one does
        config = root / "aws.yaml"
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        (root / "home").mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(ENV, AWS_ENDPOINT_URL=moto.endpoint, AWS_EC2_METADATA_DISABLED="true", HOME=str(root / "home"),
                   SPEEDRUN_HOME=str(root / "laptop"), COLUMNS="250",
                   AUTOSCALER_NODE_START_WAIT_S="5")  # how long the launcher waits for SSH (default 15 minutes)

        def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=REPO, env=env,
                                  capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

        yield cli, config, moto, root


def client(moto, service: str):
    import boto3

    return boto3.client(service, endpoint_url=moto.endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def instances(moto) -> list[dict]:
    found = client(moto, "ec2").describe_instances(Filters=[{"Name": "tag:ray-cluster-name", "Values": [NAME]}])
    return [i for r in found["Reservations"] for i in r["Instances"]]


def states(moto) -> list[str]:
    return [i["State"]["Name"] for i in instances(moto)]


def test_aws_example_as_far_as_a_simulated_ec2_goes(aws):
    cli, config, moto, root = aws
    cfg = str(config)
    dry = cli("cluster", "up", cfg, "--dry-run")
    assert dry.returncode == 0 and "p5.48xlarge" in dry.stdout and "$55.04/hour" in dry.stdout, dry.stdout + dry.stderr
    status = cli("cluster", "status", cfg)
    assert status.returncode == 1 and "no node running" in status.stdout, status.stdout + status.stderr
    assert states(moto) == []
    assert client(moto, "ec2").describe_key_pairs()["KeyPairs"] == []  # neither a dry run nor status bootstraps
    assert client(moto, "ec2").describe_security_groups(
        Filters=[{"Name": "group-name", "Values": [f"ray-autoscaler-{NAME}"]}])["SecurityGroups"] == []

    up = cli("cluster", "up", cfg, "--yes")
    assert up.returncode == 2, up.stdout[-3000:] + up.stderr[-3000:]
    assert "ray up failed (Failed to setup head node.)" in up.stderr and f"speedrun cluster down {cfg} --yes" in up.stderr
    [head] = instances(moto)
    tags = {t["Key"]: t["Value"] for t in head["Tags"]}
    assert head["InstanceType"] == "p5.48xlarge" and head["State"]["Name"] == "running"
    assert head["ImageId"].startswith("resolve:ssm:/aws/service/deeplearning/ami/")
    assert tags["ray-node-type"] == "head" and tags["ray-node-status"] == "update-failed"
    assert head["IamInstanceProfile"]["Arn"].endswith("instance-profile/ray-autoscaler-v1")
    assert client(moto, "ec2").describe_security_groups(
        Filters=[{"Name": "group-name", "Values": [f"ray-autoscaler-{NAME}"]}])["SecurityGroups"]
    assert [k["KeyName"] for k in client(moto, "ec2").describe_key_pairs()["KeyPairs"]] == ["ray-autoscaler_us-east-1"]
    assert (root / "home" / ".ssh" / "ray-autoscaler_us-east-1.pem").is_file()

    status = cli("cluster", "status", cfg)
    assert status.returncode == 1, status.stdout + status.stderr  # the head runs; no Jobs API answers
    assert head["InstanceId"] in status.stdout and "update-failed" in status.stdout
    assert "$55.04/hour while these run" in status.stdout
    assert "VINFO" not in status.stdout + status.stderr and "\x1b[" not in status.stdout + status.stderr

    down = cli("cluster", "down", cfg, "--yes")
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
    assert states(moto) == ["terminated"]  # nothing left billing


def test_launch_down_releases_the_head_when_provisioning_fails(aws):
    cli, config, moto, _ = aws
    before = {i["InstanceId"] for i in instances(moto)}
    run = cli("launch", "jobs/smoke.yaml", "--cluster", str(config), "--down", "--yes", "--store", "s3://x/y")
    assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-3000:]
    assert "provisioning 'speedrun-moto'" in run.stdout and "ray up failed" in run.stderr
    assert "cluster 'speedrun-moto' is down" in run.stdout
    new = [i for i in instances(moto) if i["InstanceId"] not in before]
    assert len(new) == 1 and new[0]["State"]["Name"] == "terminated"

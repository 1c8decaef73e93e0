"""Rented nodes for real, on-prem: `speedrun cluster up|status|down` and `launch --down / --idle-minutes`
through the Ray cluster launcher's own SSH path, against an sshd on 127.0.0.1 (sshd_server.py).

The cluster config is cluster_configs/ray-cluster-onprem.yaml with what this machine needs changed
(head_ip, auth, the checkout to mount, CPU sizes). Two changes stand in for a user's node:
  - setup_commands: instead of install.sh (a venv with a CUDA torch) and mount-nvme.sh, the head's PATH
    gets this test's venv (the .bashrc line a user would add) — same effect, no 2 GB install;
  - `ray` on the head's PATH is a wrapper whose `stop` ends only this cluster's processes
    (ray_stop_scoped.py): the real `ray stop` ends every Ray of the machine, and other tests run theirs.
The head's dashboard listens on one free port and ray.address names another, so `speedrun launch`
reaches the Jobs API through the forward it opens (`ray dashboard`), as it would on a cloud head.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from ray_stop_scoped import cluster_processes
from sshd_server import SSHD, free_port, start_sshd
from test_ray_jobs import TINY

from orchestrator.artifacts import read_manifest
from orchestrator.store import open_store

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent
HERE = Path(__file__).resolve().parent


class OnPrem:
    """The sshd, the generated cluster config, and the CLI run as a user runs it."""

    def __init__(self):
        self.sshd = start_sshd()
        root = self.sshd.root
        self.root, self.store = root, root / "store"
        self.ray_temp = root / "ray"  # short: Ray's unix sockets live under it
        shim = root / "ray-on-the-head"
        shim.write_text(f"#!/bin/bash\nif [ \"$1\" = stop ]; then exec {sys.executable} {HERE / 'ray_stop_scoped.py'} "
                        f"{self.ray_temp}; fi\nexec {VENV / 'bin' / 'ray'} \"$@\"\n")
        shim.chmod(0o755)
        cfg = yaml.safe_load((REPO / "cluster_configs" / "ray-cluster-onprem.yaml").read_text())
        cfg.update(name="onprem-test", gpus_per_node=1, device="cpu", data_dir=str(root / "data"),
                   work_dir=str(root / "work"), store=str(self.store))
        self.forwarded = free_port()
        cfg["ray"]["address"] = f"http://127.0.0.1:{self.forwarded}"
        launcher = cfg["ray"]["launcher"]
        self.name = launcher["cluster_name"] = f"sr-onprem-{self.sshd.port}"
        launcher["provider"]["head_ip"] = "127.0.0.1"
        launcher["auth"] = {"ssh_user": self.sshd.user, "ssh_private_key": str(self.sshd.key),
                            "ssh_proxy_command": self.sshd.proxy_command}
        launcher["file_mounts"] = {"~/speedrun": str(REPO)}
        launcher["setup_commands"] = [
            f"ln -sfn {VENV} ~/speedrun-venv",  # what install.sh makes: a venv with speedrun, ray and torch
            f"mkdir -p ~/bin && ln -sf {shim} ~/bin/ray",
            "grep -q speedrun-test ~/.bashrc 2>/dev/null || echo 'export PATH=$HOME/bin:$HOME/speedrun-venv/bin:$PATH "
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0  # speedrun-test' >> ~/.bashrc",
        ]
        self.dashboard = free_port()
        launcher["head_start_ray_commands"] = [
            "ray stop",
            f"ray start --head --node-ip-address=127.0.0.1 --port={free_port()} --dashboard-host=127.0.0.1 "
            f"--dashboard-port={self.dashboard} --ray-client-server-port={free_port()} "
            f"--dashboard-agent-listen-port={free_port()} --num-cpus=2 --num-gpus=1 "
            f"--object-store-memory={256 * 1024 * 1024} --temp-dir={self.ray_temp} "
            "--autoscaling-config=~/ray_bootstrap_config.yaml --disable-usage-stats",
        ]
        self.config = root / "onprem.yaml"
        self.config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.env = dict(os.environ, SPEEDRUN_HOME=str(root / "laptop"), OMP_NUM_THREADS="1", COLUMNS="250")

    def __call__(self, *args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)

    def launch_args(self, *args: str, sets: list[str] = ()) -> list[str]:
        return ["launch", "jobs/smoke.yaml", "--cluster", str(self.config),
                *[x for s in [*TINY, *sets] for x in ("--set", s)], *args]

    def ray_pids(self) -> set[int]:
        return {p.pid for p in cluster_processes(str(self.ray_temp))}

    def wait_ray_gone(self, timeout_s: float) -> set[int]:
        deadline = time.monotonic() + timeout_s
        while (left := self.ray_pids()) and time.monotonic() < deadline:
            time.sleep(1)
        return left

    def close(self) -> None:
        try:
            self("cluster", "down", str(self.config), "--yes", timeout=120)
        finally:
            for p in cluster_processes(str(self.ray_temp)):  # anything a failed test left, by PID
                p.kill()
            self.sshd.stop()
            for suffix in ("state", "lock"):  # the launcher's record of this on-prem cluster
                Path(f"/tmp/ray/cluster-{self.name}.{suffix}").unlink(missing_ok=True)
            shutil.rmtree(self.root, ignore_errors=True)  # keys, the head's home, Ray's temp dir, the store


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def seed_state(store_dir: Path, sweep: str, seed: int = 0) -> str | None:
    manifest = read_manifest(open_store(str(store_dir)), f"{sweep}/seed-{seed}")
    return manifest.state if manifest else None


def sweep_of(out: str) -> str:
    m = re.search(r"launched (\S+) on", out)
    assert m, out[-3000:]
    return m.group(1)


@pytest.fixture(scope="module")
def onprem():
    missing = [name for name, found in (("openssh-server", Path(SSHD).is_file()), ("rsync", shutil.which("rsync")),
                                        ("netcat-openbsd", shutil.which("nc"))) if not found]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed; scripts/bootstrap.sh installs them")
    if os.geteuid() != 0:
        pytest.skip("the test's sshd needs root (its privilege-separation directory /run/sshd); run it as root")
    cluster = OnPrem()
    try:
        yield cluster
    finally:
        sshd_pid = cluster.sshd.proc.pid
        cluster.close()
        assert not alive(sshd_pid), "the test's sshd outlived the tests"
        assert not cluster.ray_pids()


def test_up_launch_status_down(onprem):
    cfg = str(onprem.config)
    # No terminal and no --yes: one sentence, nothing started.
    refused = onprem("cluster", "up", cfg)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "$16.00/hour" in refused.stderr and "pass --yes" in refused.stderr and "Traceback" not in refused.stderr
    assert not onprem.ray_pids() and not (onprem.sshd.home / "speedrun").exists()

    up = onprem("cluster", "up", cfg, "--yes")
    assert up.returncode == 0, up.stdout[-4000:] + up.stderr[-3000:]
    assert f"cluster {onprem.name!r} is up; head node 127.0.0.1" in up.stdout
    head_pids = onprem.ray_pids()
    assert head_pids, "no Ray process of the test cluster after `cluster up`"
    assert (onprem.sshd.home / "speedrun" / "orchestrator" / "cli.py").is_file()  # the checkout, rsynced over SSH
    assert (onprem.sshd.home / "ray_bootstrap_config.yaml").is_file()
    assert "Accepted publickey" in (onprem.sshd.root / "sshd.log").read_text()

    dry = onprem("cluster", "status", cfg, "--dry-run")
    assert dry.returncode == 0 and "127.0.0.1" in dry.stdout and "no provider or cloud API was asked" in dry.stdout
    status = onprem("cluster", "status", cfg)
    assert status.returncode == 1, status.stdout + status.stderr  # up, but launch is what forwards the Jobs API
    assert re.search(r"head\s+│\s+127\.0\.0\.1", status.stdout), status.stdout
    assert "does not answer (not up, or not forwarded)" in status.stdout
    for out in (dry.stdout + dry.stderr, status.stdout + status.stderr):
        assert "VINFO" not in out and "\x1b[" not in out

    launch = onprem(*onprem.launch_args("--yes"))
    assert launch.returncode == 0, launch.stdout[-4000:] + launch.stderr[-3000:]
    sweep = sweep_of(launch.stdout)
    assert f"Jobs API of {onprem.name!r} forwarded to http://127.0.0.1:{onprem.forwarded}" in launch.stdout
    assert "provisioning" not in launch.stdout  # it was up already
    assert seed_state(onprem.store, sweep) == "succeeded"
    assert re.search(r"cost: 1 GPUs x [0-9.]+ h = [0-9.]+ GPU-hours x \$16\.00/GPU-hour", launch.stdout), launch.stdout[-2000:]
    assert onprem.ray_pids() >= head_pids  # launch without --down leaves the cluster up

    down = onprem("cluster", "down", cfg, "--yes")
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
    assert not any(alive(pid) for pid in head_pids), "a Ray process of the head outlived `cluster down`"
    assert not onprem.ray_pids()


def test_launch_down_provisions_runs_and_releases(onprem):
    assert not onprem.ray_pids()
    dry = onprem(*onprem.launch_args("--down", "--idle-minutes", "30", "--dry-run"))
    assert dry.returncode == 0, dry.stderr
    assert "--down: after the sweep" in dry.stdout and "--idle-minutes 30: a watcher on the head" in dry.stdout
    assert "$16.00/hour" in dry.stdout and not onprem.ray_pids()

    run = onprem(*onprem.launch_args("--down", "--yes"))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-3000:]
    sweep = sweep_of(run.stdout)
    assert f"provisioning {onprem.name!r}" in run.stdout and f"cluster {onprem.name!r} is down" in run.stdout
    assert seed_state(onprem.store, sweep) == "succeeded"
    assert re.search(r"cluster time from `ray up` to `ray down`: [0-9.]+ h x 1 node\(s\) x \$16\.00/node-hour = \$",
                     run.stdout), run.stdout[-2000:]
    assert not onprem.ray_pids(), "Ray still runs after launch --down"


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_launch_down_releases_on_ctrl_c_or_sigterm(onprem, sig):
    """Ctrl-C at the terminal, or a `kill`/`timeout` (SIGTERM): the sweep is cancelled, the head's spool collected,
    the cluster released. The CLI starts with SIGINT's default action, as at a terminal (a shell's background job
    inherits it ignored)."""
    signum = getattr(signal, sig)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli",
                             *onprem.launch_args("--down", "--yes", sets=["trainer.steps=5000"])],
                            cwd=REPO, env=onprem.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "step:2/5000 train_loss" in line:
                break
        assert onprem.ray_pids(), "".join(seen)[-3000:]
        proc.send_signal(signum)
        try:
            out, _ = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:  # what it was doing when it hung, not only that it did
            proc.kill()
            pytest.fail(f"launch --down had not ended 180 s after {sig}; its output:\n"
                        + ("".join(seen) + proc.communicate()[0])[-4000:])
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(seen) + out
    assert proc.returncode == 128 + signum, out[-3000:]
    said = "interrupted: " if sig == "SIGINT" else f"interrupted ({sig}): "
    assert said + "cancelling the sweep, then releasing the cluster" in out
    assert "collecting seeds [0] from the head's spool" in out  # `speedrun collect` ran on the head, as a Ray job
    assert f"cluster {onprem.name!r} is down" in out
    assert not onprem.ray_pids(), f"Ray still runs after {sig} of launch --down"


def test_idle_minutes_watcher_on_the_head_releases_without_the_laptop(onprem):
    assert not onprem.ray_pids()
    run = onprem(*onprem.launch_args("--idle-minutes", "0.1", "--detach", "--yes"))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-3000:]
    sweep = sweep_of(run.stdout)
    assert "autostop: speedrun-autostop-" in run.stdout
    assert onprem.ray_pids()  # the launching CLI is gone; the head runs the sweep and the watcher
    left = onprem.wait_ray_gone(timeout_s=240)
    assert not left, f"the autostop watcher did not stop Ray: {sorted(left)}"
    assert seed_state(onprem.store, sweep) == "succeeded"  # it waited for the sweep to end
    log = (onprem.sshd.home / "speedrun-autostop.log").read_text()
    assert "stopped" in log and "process(es) of the Ray cluster" in log, log

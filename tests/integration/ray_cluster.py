"""A real one-node Ray cluster on 127.0.0.1 declaring 8 GPUs, for the Ray integration tests.

`ray start --head` runs in its own process group with a private temp dir; teardown stops the
processes of that group and those naming that temp dir, by PID, so no other Ray on the machine is
touched (`ray stop` would kill every Ray process by name).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import ray  # noqa: F401  (also puts Ray's bundled psutil on sys.path; psutil is not a dependency of ours)
import psutil  # noqa: E402

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayHead:
    address: str       # the Jobs API / dashboard, http://127.0.0.1:PORT
    gcs_address: str   # what `ray.init(address=...)` takes
    temp_dir: Path
    pgid: int
    env: dict = field(repr=False)  # never printed: it is the whole process environment

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster: the `ray start` group plus workers that name our temp dir."""
        mine = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                in_group = self.pgid > 0 and os.getpgid(p.pid) == self.pgid
            except (ProcessLookupError, PermissionError):
                continue
            cmd = " ".join(p.info["cmdline"] or [])
            if in_group or str(self.temp_dir) in cmd:
                mine.append(p)
        return mine

    def stop(self, grace_s: float = 8.0) -> None:
        procs = self.processes()
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_ray_head(num_gpus: int = 8, num_cpus: int = 2) -> RayHead:
    # A short path: Ray's unix sockets live under the temp dir and must stay under 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="sr-ray-", dir="/tmp"))
    gcs_port, dash_port = free_port(), free_port()
    env = dict(os.environ)
    env.update(
        # On Linux this makes Ray keep 127.0.0.1 instead of replacing it with the routable address.
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        # Job entrypoints run `python` from the raylet's PATH: make it this interpreter.
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head",
        "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
        f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
        f"--object-store-memory={256 * 1024 * 1024}",
        f"--temp-dir={temp_dir}", "--disable-usage-stats", "--include-dashboard=true",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, start_new_session=True)
    # `ray start` exits after daemonising; its daemons keep its process group id (its pid).
    head = RayHead(f"http://127.0.0.1:{dash_port}", f"127.0.0.1:{gcs_port}", temp_dir, _pgid_of(temp_dir), env)
    if proc.returncode != 0:
        head.stop()
        raise RuntimeError(f"ray start failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    _wait_for_jobs_api(head.address)
    return head


def _pgid_of(temp_dir: Path) -> int:
    """The process group of the daemons `ray start` left behind (found by their temp dir)."""
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "gcs_server" in cmd and str(temp_dir) in cmd:
            return os.getpgid(p.pid)
    return -1


def _wait_for_jobs_api(address: str, timeout_s: float = 60.0) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if requests.get(f"{address}/api/version", timeout=2).ok:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Ray Jobs API at {address} did not come up in {timeout_s:.0f} s")
        time.sleep(0.5)


@pytest.fixture(scope="session")
def ray_head():
    """One Ray head for the whole test session; stopped (by PID) at the end."""
    head = start_ray_head()
    try:
        yield head
    finally:
        head.stop()

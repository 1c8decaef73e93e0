"""A real Ray cluster on 127.0.0.1 declaring 8 GPUs per node, for the Ray integration tests.

`ray start --head` runs in its own process group with a private temp dir (`add_node` joins a second
raylet, for placement groups that spread over two nodes). Teardown stops the processes of those
groups and those naming that temp dir, by PID, so no other Ray on the machine is touched (`ray stop`
would kill every Ray process by name); a watchdog does the same if the test process dies first.
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
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
    gcs_address: str   # what `ray.init(address=...)` and `ray start --address` take
    temp_dir: Path
    pgids: list[int]   # one process group per `ray start` (head, then any added node)
    env: dict = field(repr=False)  # never printed: it is the whole process environment
    watchdogs: list = field(default_factory=list, repr=False)

    def _own(self, pgid: int) -> None:
        """Record a process group, and leave a watchdog that stops it if this test process dies
        without tearing down (pytest killed by a timeout): a Ray head must not outlive its tests."""
        self.pgids.append(pgid)
        self.watchdogs.append(subprocess.Popen(
            ["bash", "-c", f"while kill -0 {os.getpid()} 2>/dev/null; do sleep 2; done; "
                           f"kill -TERM -- -{pgid} 2>/dev/null; sleep 5; kill -KILL -- -{pgid} 2>/dev/null; "
                           f"rm -rf {shlex.quote(str(self.temp_dir))}"],
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster: the `ray start` groups plus workers that name our temp dir."""
        mine = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                in_group = os.getpgid(p.pid) in self.pgids
            except (ProcessLookupError, PermissionError):
                continue
            cmd = " ".join(p.info["cmdline"] or [])
            if in_group or str(self.temp_dir) in cmd:
                mine.append(p)
        return mine

    def add_node(self, num_gpus: int = 8, num_cpus: int = 1) -> None:
        """A second raylet on this machine: to Ray a separate node, so STRICT_SPREAD can place two bundles.

        `ray start --address` refuses to join while Ray is pinned to loopback, so the node is started
        the way ray.cluster_utils does it, in a child process of ours (`python ray_cluster.py node ...`)
        that lives in its own process group.
        """
        proc = subprocess.Popen([sys.executable, __file__, "node", self.gcs_address, str(num_gpus), str(num_cpus)],
                                env=self.env, stdout=subprocess.PIPE, text=True, start_new_session=True)
        self._own(proc.pid)
        line = proc.stdout.readline()  # "ready" once the node has registered
        if line.strip() != "ready":
            self.stop()
            raise RuntimeError(f"the second Ray node did not start: {line!r}")

    def stop(self, grace_s: float = 8.0) -> None:
        for w in self.watchdogs:  # ours to end first: their pgids are about to be free for reuse
            w.kill()
            w.wait()
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


def _ray_start(args: list[str], env: dict) -> int:
    """Run `ray start ARGS` in a new session; returns the process group its daemons keep (its pid)."""
    proc = subprocess.Popen([str(VENV_BIN / "ray"), "start", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out, _ = proc.communicate(timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"ray start failed ({proc.returncode}):\n{out[-3000:]}")
    return proc.pid


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
    head = RayHead(f"http://127.0.0.1:{dash_port}", f"127.0.0.1:{gcs_port}", temp_dir, [], env)
    try:
        head._own(_ray_start([
            "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
            f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}", f"--object-store-memory={256 * 1024 * 1024}",
            f"--temp-dir={temp_dir}", "--disable-usage-stats", "--include-dashboard=true",
        ], env))
        _wait_for_jobs_api(head.address)
    except BaseException:
        head.stop()
        raise
    return head


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


def _run_node(gcs_address: str, num_gpus: int, num_cpus: int) -> None:
    """Body of `add_node`: one more raylet joined to the head, alive until this process is stopped."""
    import ray._private.node
    import ray._private.parameter

    params = ray._private.parameter.RayParams(
        gcs_address=gcs_address, node_ip_address="127.0.0.1", num_cpus=num_cpus, num_gpus=num_gpus,
        object_store_memory=128 * 1024 * 1024, min_worker_port=0, max_worker_port=0, node_manager_port=0,
        include_log_monitor=False)
    ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})  # then the atexit handler stops the node's processes


if __name__ == "__main__" and sys.argv[1:2] == ["node"]:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    _run_node(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))

"""A real Slurm cluster on loopback for the integration tests (and for scripts/slurm by hand).

Debian's slurm-wlm and munge, started from a temp directory that holds every config, state, spool,
log, pid file and the munge socket; stopped by the PIDs started here, never by name. Each node
(two by default, one slurmd each on 127.0.0.1) declares CPUs=16 and eight fake GPUs (empty files
behind gres.conf), which is what the 8xH100 recipe asks for; two make multi-node jobs testable.

    with SlurmCluster.start() as cluster:     # or the `slurm_cluster` pytest fixture
        subprocess.run(["sbatch", ...], env=cluster.env)

`python tests/integration/slurm_cluster.py` starts one and waits (prints the SLURM_CONF to export).
"""
from __future__ import annotations

import ctypes
import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

NODE_PREFIX = "speedrun-node"  # nodes speedrun-node1..N, each its own slurmd on 127.0.0.1
PARTITION = "debug"
BINARIES = ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "sinfo", "scontrol", "scancel")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _die_with_parent() -> None:
    """Runs in each daemon before exec: a killed test run (CI timeout) must not leave daemons behind."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


SLURM_CONF = """\
ClusterName=speedrun
SlurmctldHost={hostname}(127.0.0.1)
MailProg=/bin/true
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=600
KillWait=5
InactiveLimit=0
{node_lines}PartitionName={partition} Nodes={nodes} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class SlurmCluster:
    root: Path
    nodes: list[str] = field(default_factory=lambda: [f"{NODE_PREFIX}1"])
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The environment for client commands (sbatch, squeue, submitit) to reach this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # ------------------------------------------------------------------------------ start/stop

    @classmethod
    def start(cls, nodes: int = 2, root: Path | None = None, timeout_s: float = 30.0) -> "SlurmCluster":
        if os.geteuid() != 0:
            raise RuntimeError("the Slurm test cluster runs slurmd as root; run the tests as root")
        root = Path(root or tempfile.mkdtemp(prefix="speedrun-slurm-"))
        root.chmod(0o755)  # munged runs as the munge user and must reach its socket directory
        cluster = cls(root, nodes=[f"{NODE_PREFIX}{i + 1}" for i in range(nodes)])
        try:
            cluster._write_configs()
            cluster._start_munged()
            cluster._start_slurm()
            cluster._wait_node_idle(timeout_s)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _write_configs(self) -> None:
        for d in ("etc", "state", "spool", "run", "log", "gpus"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        # gres needs File= entries; empty regular files keep the node from draining
        for i in range(8):
            (self.root / "gpus" / f"fakegpu{i}").touch()
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        # one line per node; all on this host, told apart by their slurmd port (SlurmdParameters=config_overrides
        # lets each declare 16 CPUs and 8 GPUs whatever this machine has)
        node_lines = "".join(
            f"NodeName={n} NodeHostname={socket.gethostname().split('.')[0]} NodeAddr=127.0.0.1 Port={port} "
            "CPUs=16 RealMemory=64000 Gres=gpu:8 State=UNKNOWN\n" for n, port in zip(self.nodes, node_ports))
        self.conf.write_text(SLURM_CONF.format(
            hostname=socket.gethostname().split(".")[0], partition=PARTITION, root=self.root, ctld_port=ctld_port,
            munge_socket=self.root / "munge" / "munge.socket", node_lines=node_lines, nodes=",".join(self.nodes),
        ))
        (self.root / "etc" / "gres.conf").write_text(
            "".join(f"NodeName={n} Name=gpu File={self.root}/gpus/fakegpu[0-7]\n" for n in self.nodes))
        for n in self.nodes:
            (self.root / "spool" / n).mkdir(exist_ok=True)

    def _start_munged(self) -> None:
        munge = self.root / "munge"
        munge.mkdir(exist_ok=True)
        munge.chmod(0o711)  # clients need execute on the socket directory; the key stays 0400
        uid, gid = pwd.getpwnam("munge").pw_uid, grp.getgrnam("munge").gr_gid
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for p in (munge, key):
            os.chown(p, uid, gid)
        self.procs["munged"] = subprocess.Popen(
            [_binary("munged"), "--foreground", f"--socket={munge / 'munge.socket'}", f"--key-file={key}",
             f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
             f"--seed-file={munge / 'munged.seed'}"],
            user=uid, group=gid, preexec_fn=_die_with_parent,
            stdout=subprocess.DEVNULL, stderr=open(self.root / "log" / "munged.err", "wb"),
        )
        self._wait_for(lambda: (munge / "munge.socket").exists(), 10.0, "munged to open its socket", "munged")

    def _start_slurm(self) -> None:
        env = self.env
        daemons = [("slurmctld", "slurmctld", ["-D", "-i"])]
        daemons += [(f"slurmd-{n}", "slurmd", ["-D", "-N", n]) for n in self.nodes]
        for name, binary, args in daemons:
            self.procs[name] = subprocess.Popen(
                [_binary(binary), *args, "-f", str(self.conf)], env=env, cwd=self.root, preexec_fn=_die_with_parent,
                stdout=subprocess.DEVNULL, stderr=open(self.root / "log" / f"{name}.err", "wb"),
            )

    def _wait_node_idle(self, timeout_s: float) -> None:
        def idle() -> bool:
            out = self.run("sinfo", "-h", "-N", "-o", "%t", check=False)
            states = out.stdout.split()
            return out.returncode == 0 and len(states) == len(self.nodes) and set(states) == {"idle"}

        self._wait_for(idle, timeout_s, "every Slurm node to become idle", "slurmctld")

    def _wait_for(self, ready, timeout_s: float, what: str, log: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead[0]} exited while waiting for {what}; see {self.root}/log/{dead[0]}.err:\n"
                                   + self._tail(dead[0]))
            if ready():
                return
            time.sleep(0.1)
        raise RuntimeError(f"timed out waiting for {what}; see {self.root}/log:\n" + self._tail(log))

    def _tail(self, name: str, n: int = 20) -> str:
        lines: list[str] = []
        for f in (self.root / "log" / f"{name}.err", self.root / "log" / f"{name}.log"):
            if f.exists():
                lines += f.read_text(errors="replace").splitlines()[-n:]
        return "\n".join(lines)

    def stop(self) -> None:
        """Cancel every job, then stop the daemons this object started, by PID, in reverse order."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--partition", PARTITION, check=False)
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()

    def __enter__(self) -> "SlurmCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------------- helpers

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=check, timeout=30)

    def queue(self) -> list[dict[str, str]]:
        """Jobs slurmctld still knows about: id, state, reason (pending/running/completing)."""
        out = self.run("squeue", "-h", "-o", "%i|%T|%r").stdout
        return [dict(zip(("id", "state", "reason"), line.split("|"))) for line in out.splitlines() if line]

    def job_pids(self, job_id: str) -> list[int]:
        """PIDs of a running job's own processes on this node (not Slurm's slurmstepd that watches them)."""
        out = self.run("scontrol", "listpids", job_id, check=False).stdout.splitlines()[1:]
        pids = [int(line.split()[0]) for line in out if line.split() and line.split()[0].isdigit()]
        return [p for p in pids if _comm(p) not in ("slurmstepd", "")]

    def processes_of(self, job_id: str) -> list[int]:
        """Live (not zombie) processes of a job: its slurmstepd and everything started under it."""
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
                cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                environ = (d / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if cmdline.startswith(f"slurmstepd: [{job_id}.") or f"SLURM_JOB_ID={job_id}".encode() in environ:
                pids.append(int(d.name))
        return pids

    def release(self, job_id: str, settle_s: float = 60.0) -> None:
        """A requeued job waits ~2 minutes (BeginTime) before it may run again; let it start now.

        Only once its previous run's processes are gone: on a real cluster the 2-minute wait covers
        that, and a job started while its old step is still being torn down fails to launch."""
        deadline = time.monotonic() + settle_s
        while self.processes_of(job_id) and time.monotonic() < deadline:
            time.sleep(0.5)
        self.run("scontrol", "update", f"jobid={job_id}", "StartTime=now", check=False)
        self.run("scontrol", "release", job_id, check=False)


@pytest.fixture(scope="session")
def slurm_cluster():
    """One Slurm cluster for the whole test session; SLURM_CONF points every client (and submitit) at it."""
    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing); "
                    "scripts/bootstrap.sh installs slurm-wlm and munge")
    if os.geteuid() != 0:
        pytest.skip("the loopback Slurm cluster runs slurmd as root; run the Slurm tests as root")
    cluster = SlurmCluster.start()
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        cluster.stop()
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        if not os.environ.get("SPEEDRUN_KEEP_SLURM"):  # set it to read the daemons' logs after a failure
            shutil.rmtree(cluster.root, ignore_errors=True)


if __name__ == "__main__":
    with SlurmCluster.start() as c:
        print(f"export SLURM_CONF={c.conf}   # Ctrl-C stops the cluster")
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass

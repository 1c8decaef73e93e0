"""A real OpenSSH server on 127.0.0.1 (a free port), for the Ray cluster launcher's on-prem provider.

`sshd -D -f CONFIG` (Debian's openssh-server) runs with a host key and a user key generated here, accepts
only that key, and gives every session a HOME of its own (SetEnv), so what the launcher puts in `~/`
(the checkout, ray_bootstrap_config.yaml) lands in the test's temp dir, not in the real home. The launcher
has no SSH-port setting; its `auth.ssh_proxy_command` (`nc %h PORT`, netcat-openbsd) is how it reaches a
non-standard port, as it reaches a bastion. Stopped by PID; a watchdog does the same if the tests die first.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SshServer:
    root: Path
    port: int
    user: str
    key: Path        # the user's private key (its public half is the only authorized key)
    home: Path       # HOME of every session
    proc: subprocess.Popen = field(repr=False)
    watchdog: subprocess.Popen = field(repr=False)

    @property
    def proxy_command(self) -> str:
        return f"nc %h {self.port}"

    def ssh(self, command: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(["ssh", "-i", str(self.key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                               "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", f"ProxyCommand={self.proxy_command}",
                               f"{self.user}@127.0.0.1", command], capture_output=True, text=True, timeout=timeout)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        self.watchdog.kill()
        self.watchdog.wait()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_sshd() -> SshServer:
    if not Path(SSHD).is_file():
        raise RuntimeError(f"{SSHD} is missing: install openssh-server (scripts/bootstrap.sh does)")
    if shutil.which("nc") is None:
        raise RuntimeError("nc is missing: install netcat-openbsd (scripts/bootstrap.sh does)")
    root = Path(tempfile.mkdtemp(prefix="sr-sshd-", dir="/tmp"))
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)], check=True)
    shutil.copy(root / "user_key.pub", root / "authorized_keys")
    home = root / "home"
    home.mkdir()
    port = free_port()
    (root / "sshd_config").write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {root / 'host_key'}", f"PidFile {root / 'sshd.pid'}",
        f"AuthorizedKeysFile {root / 'authorized_keys'}", "PubkeyAuthentication yes", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password", "UsePAM no",
        "StrictModes no",  # the keys live in /tmp, not in a home sshd would inspect
        "MaxStartups 100", "MaxSessions 100",  # the launcher opens many sessions at once
        f"SetEnv HOME={home}", "",
    ]))
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    log = open(root / "sshd.log", "w")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(root / "sshd_config")], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()
    watchdog = subprocess.Popen(
        ["bash", "-c", f"while kill -0 {os.getpid()} 2>/dev/null; do sleep 2; done; kill -TERM {proc.pid} 2>/dev/null"],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import getpass

    server = SshServer(root, port, getpass.getuser(), root / "user_key", home, proc, watchdog)
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            server.stop()
            raise RuntimeError(f"sshd exited: {(root / 'sshd.log').read_text()[-2000:]}")
        if server.ssh("true", timeout=10).returncode == 0:
            return server
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"sshd on 127.0.0.1:{port} did not accept the key: {(root / 'sshd.log').read_text()[-2000:]}")
        time.sleep(0.3)

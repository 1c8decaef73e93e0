"""`speedrun launch` on a cluster config with a Ray launcher section: rent, run, collect, release.

RentedCluster is what launch does around the sweep (backends/ray.py runs the sweep itself):
  - ensure_up: the Jobs API answers at ray.address, or the head is up and its dashboard is forwarded
    there (`ray dashboard`, the launcher's own SSH), or `ray up` provisions first;
  - start_autostop (--idle-minutes N): a watcher job on the head releases the cluster after N idle
    minutes, even when this laptop is gone (backends/ray_autostop.py);
  - collect (--down): seeds without a manifest in the store get `speedrun collect` run on the head, so
    what a node spooled reaches the store before the node goes;
  - down (--down): `ray down`, with Ctrl-C ignored until it is done: a half-released cluster keeps billing.
With --down, SIGTERM and SIGHUP (a `kill`, a `timeout`, a closed terminal or ssh session) end the sweep as Ctrl-C
does: cancelled, collected, released.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import urlparse

import yaml

from orchestrator.backends.ray_autostop import HEAD_CONFIG, PREFIX
from orchestrator.backends.ray_launcher import jobs_api_answers, live_nodes, provision, remote_dashboard_port, teardown
from orchestrator.backends.ray_launcher_config import hourly_cost, provisioning, saved_launcher_path
from orchestrator.cluster_config import ClusterConfig
from orchestrator.config import ConfigError

if TYPE_CHECKING:
    from rich.console import Console

    from orchestrator.plan import LaunchPlan

FORWARD_WAIT_S = 60
COLLECT_TIMEOUT_S = 600
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)   # taken as Ctrl-C is while a --down launch runs


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP during a --down launch: handled on Ctrl-C's path, exit code 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum, _frame):
    raise Stopped(signum)


def _leave_the_terminal() -> None:
    """After SIGHUP: standard output and error that were the closed terminal go to /dev/null, so that writing a
    line cannot fail (EIO) between here and the end of the release. Redirected output keeps going where it went."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        try:
            if os.isatty(fd):
                os.dup2(devnull, fd)
        except OSError:
            pass
    os.close(devnull)


def _ray_cli() -> str:
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else "ray"


class RentedCluster:
    def __init__(self, cluster: ClusterConfig, path: Path, config: dict[str, Any], config_arg: str, console: "Console"):
        self.cluster, self.path, self.config, self.config_arg, self.console = cluster, path, config, config_arg, console
        self.address = cluster.ray.address
        self.forward: subprocess.Popen | None = None
        self.provisioned_at: float | None = None   # when this launch ran `ray up`
        self.started_at = time.time()

    @property
    def name(self) -> str:
        return self.config["cluster_name"]

    def say(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)

    # ------------------------------------------------------------------------------------- --dry-run
    def describe(self, down: bool, idle_minutes: float | None) -> list[str]:
        lines = [f"cluster: Ray cluster {self.name!r} from {self.path}, {hourly_cost(self.cluster, self.config, self.path)}",
                 f"  provisions first (`ray up`) unless its Jobs API answers at {self.address} or its head is up; "
                 f"the head's dashboard (port {remote_dashboard_port(self.config)}) is forwarded there while launch runs"]
        if down:
            lines.append("  --down: after the sweep (success, failure or Ctrl-C): seeds not yet in the store are "
                         "collected on the head, then `ray down` releases every node")
        else:
            lines.append(f"  stays up after the sweep: `speedrun cluster down {self.config_arg}` releases it")
        if idle_minutes is not None:
            action = "`ray stop`" if self.config["provider"].get("type") == "local" else f"`ray down -y {HEAD_CONFIG}`"
            lines.append(f"  --idle-minutes {idle_minutes:g}: a watcher on the head (Ray job {PREFIX}*) runs {action} "
                         f"after {idle_minutes:g} minute(s) without a running job, with or without this laptop")
        return lines

    # ------------------------------------------------------------------------------- provisioning
    def ensure_up(self) -> None:
        if jobs_api_answers(self.address, timeout_s=3):
            return
        local = self.config["provider"].get("type") == "local"
        head_up = any(n.role == "head" for n in live_nodes(self.config, self.path))
        # On-prem the launcher only remembers that it once started Ray there: a forward tells whether it still runs.
        if head_up and self._forward(wait_s=15 if local else FORWARD_WAIT_S):
            return
        if head_up and not local:
            raise ConfigError(f"{self.path}: the head of {self.name!r} is up but its Jobs API does not answer through "
                              f"the forward to {self.address}; `speedrun cluster status {self.config_arg}`, or "
                              f"`speedrun cluster down {self.config_arg}` and launch again")
        self.say(f"provisioning {self.name!r} (`ray up`)")
        self.provisioned_at = time.time()
        provision(self.cluster, self.path, self.config, self.config_arg, self.console)
        if not jobs_api_answers(self.address, timeout_s=3) and not self._forward(wait_s=FORWARD_WAIT_S):
            raise ConfigError(f"{self.path}: ray.address: {self.address} does not answer after `ray up`, neither "
                              f"directly nor forwarded to the head's port {remote_dashboard_port(self.config)}; "
                              "check the head's `ray start --dashboard-port` and ray.address")

    def _forward(self, wait_s: float) -> bool:
        """`ray dashboard`: the head's dashboard port at ray.address's port here, through the launcher's SSH."""
        url = urlparse(self.address)
        if url.hostname not in ("127.0.0.1", "localhost"):
            return False  # a remote address is reached directly or not at all
        self.close()
        saved = saved_launcher_path(self.config)
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(yaml.safe_dump(self.config, sort_keys=False))
        log = open(saved.with_suffix(".dashboard.log"), "a")
        self.forward = subprocess.Popen(
            [_ray_cli(), "dashboard", "--port", str(url.port or 8265), "--remote-port", str(remote_dashboard_port(self.config)),
             "--no-config-cache", str(saved)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and self.forward.poll() is None:
            if jobs_api_answers(self.address, timeout_s=2):
                self.say(f"Jobs API of {self.name!r} forwarded to {self.address}")
                return True
            time.sleep(0.5)
        self.close()
        return False

    def close(self) -> None:
        """Stop the dashboard forward (its process group: `ray dashboard` and its ssh)."""
        if self.forward is None:
            return
        try:
            os.killpg(self.forward.pid, signal.SIGTERM)
            self.forward.wait(timeout=10)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.forward.pid, signal.SIGKILL)
            self.forward.wait()
        self.forward = None

    # ----------------------------------------------------------------------------------- on the head
    def _client(self):
        from orchestrator.backends.ray import _job_client

        return _job_client(self.address, key=f"{self.path}: ray.address")

    def _submit(self, sid: str, entrypoint: str) -> None:
        from orchestrator.backends.ray import code_runtime_env

        self._client().submit_job(entrypoint=entrypoint, submission_id=sid, runtime_env=code_runtime_env(self.cluster),
                                  entrypoint_num_cpus=0)

    def start_autostop(self, idle_minutes: float) -> str:
        """Replace any watcher on the head by one for idle_minutes; its submission id."""
        client = self._client()
        for job in client.list_jobs():
            sid = job.submission_id or ""
            if sid.startswith(PREFIX) and str(getattr(job.status, "value", job.status)) in ("PENDING", "RUNNING"):
                client.stop_job(sid)
        sid = f"{PREFIX}{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}"
        head_address = f"http://127.0.0.1:{remote_dashboard_port(self.config)}"
        self._submit(sid, f"{self.cluster.python or 'python'} -m orchestrator.backends.ray_autostop "
                          f"--idle-minutes {idle_minutes:g} --address {head_address} "
                          f"--provider {self.config['provider'].get('type')}")
        self.say(f"autostop: {sid} on the head releases {self.name!r} after {idle_minutes:g} idle minute(s)")
        return sid

    def collect(self, plan: "LaunchPlan", store) -> list[int]:
        """Run `speedrun collect` on the head for seeds the store lacks; the seeds still missing after it."""
        from orchestrator.watch import unfinished_seeds

        missing = [s for s in unfinished_seeds(store, plan.sweep_id, plan.seeds)
                   if not store.exists(f"{plan.sweep_id}/seed-{s}/manifest.json")]
        if not missing:
            return []
        self.say(f"collecting seeds {missing} from the head's spool before the cluster goes")
        sid = f"speedrun-collect-{plan.sweep_id}-{int(time.time())}"
        spool = f"{plan.cluster.work_dir.rstrip('/')}/{plan.sweep_id}/spool"
        self._submit(sid, f"{self.cluster.python or 'python'} -m orchestrator.cli collect {plan.sweep_id} "
                          f"--store {plan.store_url} --spool {spool}")
        client = self._client()
        deadline = time.monotonic() + COLLECT_TIMEOUT_S
        while time.monotonic() < deadline:
            status = str(getattr(client.get_job_status(sid), "value", client.get_job_status(sid)))
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(1)
        for line in client.get_job_logs(sid).splitlines()[-10:]:
            self.say(f"  {line}")
        return [s for s in missing if not store.exists(f"{plan.sweep_id}/seed-{s}/manifest.json")]

    # ---------------------------------------------------------------------------------------- --down
    def down(self) -> None:
        """Release the cluster; Ctrl-C, SIGTERM and SIGHUP meanwhile are ignored (each said), so the release is
        never cut short."""
        def wait(signum, _frame):
            name = signal.Signals(signum).name
            self.say(f"releasing the cluster: {name} ignored until it is down, or it keeps billing")

        previous = {s: signal.signal(s, wait) for s in (signal.SIGINT, *STOP_SIGNALS)}
        try:
            self.close()
            self.say(f"releasing {self.name!r} (`ray down`)")
            teardown(self.path, self.config, self.console)
            self.say(f"cluster {self.name!r} is down")
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def billed_line(self) -> str:
        """What this launch kept the cluster for (from `ray up`, or from launch when it was up already)."""
        since = self.provisioned_at or self.started_at
        hours = (time.time() - since) / 3600
        n = sum(g.count for g in provisioning(self.config))
        what = "from `ray up` to `ray down`" if self.provisioned_at else "from launch to `ray down`"
        if self.cluster.cost_per_hour is None:
            return f"cluster time {what}: {hours:.2f} h x {n} node(s) (no cost_per_hour in {self.path}, so no $)"
        return (f"cluster time {what}: {hours:.2f} h x {n} node(s) x ${self.cluster.cost_per_hour:,.2f}/node-hour "
                f"= ${hours * n * self.cluster.cost_per_hour:,.2f}")


def rented_for_launch(plan: "LaunchPlan", config_arg: str, down: bool, detach: bool, idle_minutes: float | None,
                      console: "Console") -> RentedCluster | None:
    """A RentedCluster when the plan's cluster config has a Ray launcher section; --down and --idle-minutes
    need one. Checks only: nothing is contacted."""
    from orchestrator.backends.ray_launcher_config import check_launcher, is_rented, launcher_config

    if idle_minutes is not None and not idle_minutes > 0:
        raise ConfigError(f"--idle-minutes {idle_minutes:g}: must be > 0 minutes")
    if not is_rented(plan.cluster):
        for flag, given in (("--down", down), ("--idle-minutes", idle_minutes is not None)):
            if given:
                raise ConfigError(f"{flag}: cluster config {plan.cluster_file} provisions nothing (no ray.launcher "
                                  "section), so there is nothing to release; drop the flag or use a ray-cluster-* config")
        return None
    if down and detach:
        raise ConfigError("--down with --detach: the cluster would be released under the running sweep; drop "
                          "--detach, or use --idle-minutes N to release it after the sweep without this laptop")
    path = Path(plan.cluster_file)
    config, key = launcher_config(plan.cluster, path)
    check_launcher(config, plan.cluster, path, key)
    return RentedCluster(plan.cluster, path, config, config_arg, console)


def launch_around(rented: RentedCluster, down: bool, run: Callable[[], int], cancel: Callable[[], None],
                  collect: Callable[[], None]) -> int:
    """Run the sweep (`run`: provisioning included; returns the exit code); with down, release the cluster
    after it whatever happens: success, failure, an error, Ctrl-C, SIGTERM or SIGHUP (the sweep is cancelled
    first, so that it checkpoints and uploads). Without down, only the dashboard forward ends; Ctrl-C goes on up
    and the other signals keep their default."""
    previous = {s: signal.signal(s, _raise_stopped) for s in STOP_SIGNALS} if down else {}
    try:
        try:
            code = run()
        except KeyboardInterrupt as e:
            if not down:
                raise
            signum = e.signum if isinstance(e, Stopped) else int(signal.SIGINT)
            if signum == signal.SIGHUP:
                _leave_the_terminal()
            what = "" if signum == signal.SIGINT else f" ({signal.Signals(signum).name})"
            rented.say(f"interrupted{what}: cancelling the sweep, then releasing the cluster")
            try:
                cancel()
            except Exception as err:  # noqa: BLE001  the release must still happen
                rented.say(f"cancel failed ({type(err).__name__}: {str(err)[:160]})")
            code = 128 + signum
        if down:
            try:
                collect()
            except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001
                rented.say(f"collect on the head failed ({type(e).__name__}: {str(e)[:160]}); releasing anyway")
        return code
    finally:
        if down:
            rented.down()
            rented.say(rented.billed_line())
        else:
            rented.close()
        for s, handler in previous.items():
            signal.signal(s, handler)

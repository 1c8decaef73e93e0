"""Autostop: a watcher on the head node that releases a rented cluster after N idle minutes.

`speedrun launch ... --idle-minutes N` submits it as a Ray job of its own (submission id
`speedrun-autostop-*`, no resources, the code shipped like any sweep's), so it runs on the head and
goes on when the laptop is gone. Every poll it asks the head's Jobs API for PENDING or RUNNING jobs
other than itself; after N minutes without one it starts, in a session of its own so that stopping Ray
does not stop it half-way:
  - cloud providers: `ray down -y ~/ray_bootstrap_config.yaml` (the launcher config `ray up` copied to
    the head): Ray stops, and the provider terminates every node, the head last; billing ends;
  - on-prem (provider local): `ray stop`: the machines stay, Ray and its jobs end.
Ray's own idle_timeout_minutes only removes idle *workers*; the head would keep billing.
    python -m orchestrator.backends.ray_autostop --idle-minutes N --address http://127.0.0.1:8265 --provider aws
"""
from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

log = logging.getLogger("speedrun.autostop")

PREFIX = "speedrun-autostop-"
HEAD_CONFIG = "~/ray_bootstrap_config.yaml"   # where `ray up` leaves the launcher config on the head
BUSY = ("PENDING", "RUNNING")


def poll_seconds(idle_s: float) -> float:
    """Often enough to stop within a quarter of the idle time past it, at most every 30 s."""
    return max(0.5, min(30.0, idle_s / 4))


def busy_jobs(jobs: Iterable) -> list[str]:
    """Submission ids of the jobs that keep the cluster busy (any job not finished, but watchers)."""
    out = []
    for job in jobs:
        status = str(getattr(job.status, "value", job.status))
        sid = job.submission_id or job.job_id or "?"
        if status in BUSY and not sid.startswith(PREFIX):
            out.append(sid)
    return out


def teardown_command(provider: str, ray: str) -> list[str]:
    if provider == "local":
        return [ray, "stop"]
    return [ray, "down", "-y", str(Path(HEAD_CONFIG).expanduser())]


def ray_executable() -> str:
    """`ray` from the head's PATH (what the launcher's own commands run), else the one beside this python."""
    found = shutil.which("ray")
    if found:
        return found
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else "ray"


def wait_until_idle(list_jobs: Callable[[], Iterable], idle_s: float, clock: Callable[[], float] = time.monotonic,
                    sleep: Callable[[float], None] = time.sleep, say: Callable[[str], None] = log.info) -> float:
    """Return once no job has been busy for idle_s seconds; the idle time it waited. An unanswered poll
    counts as busy: a Jobs API that is restarting is no reason to release the nodes."""
    last_busy = clock()
    was = None
    while True:
        try:
            busy = busy_jobs(list_jobs())
        except Exception as e:  # noqa: BLE001  the dashboard restarting, a timeout: look again later
            say(f"cannot list jobs ({type(e).__name__}: {str(e)[:120]}); counting as busy")
            busy = ["?"]
        now = clock()
        if busy:
            last_busy = now
            if busy != was:
                say(f"busy: {', '.join(busy)}")
        elif was != []:
            say(f"idle; releasing the cluster after {idle_s / 60:g} idle minute(s)")
        was = busy
        if not busy and now - last_busy >= idle_s:
            return now - last_busy
        sleep(poll_seconds(idle_s))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ray_autostop", description=__doc__.splitlines()[0])
    ap.add_argument("--idle-minutes", type=float, required=True)
    ap.add_argument("--address", required=True, help="the head's Jobs API, as seen on the head")
    ap.add_argument("--provider", required=True, help="the launcher's provider type (aws, gcp, local, ...)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s autostop: %(message)s")
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(args.address)
    idle = wait_until_idle(client.list_jobs, args.idle_minutes * 60)
    cmd = teardown_command(args.provider, ray_executable())
    log.info("idle for %.0f s: running %s", idle, " ".join(cmd))
    # Its own session: `ray stop` / `ray down` end this job and the processes under it, not the command.
    subprocess.Popen(cmd, start_new_session=True, stdin=subprocess.DEVNULL,
                     stdout=open(Path("~/speedrun-autostop.log").expanduser(), "a"), stderr=subprocess.STDOUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Rented clusters without renting: the cost question, launch --down's release on every path, the autostop
watcher's idle rule, and what --dry-run shows. The real thing runs in tests/integration/test_rented_onprem.py."""
from __future__ import annotations

import io
import sys
from pathlib import Path
import time
from types import SimpleNamespace

import pytest
from rich.console import Console

from orchestrator.backends import ray_autostop
from orchestrator.backends.ray_autostop import PREFIX, busy_jobs, teardown_command, wait_until_idle
from orchestrator.backends.ray_launcher import confirm_cost, remote_dashboard_port
from orchestrator.backends.ray_launcher_config import load_rented
from orchestrator.backends.ray_rented import launch_around
from orchestrator.config import ConfigError
from orchestrator.summary import cost_line

REPO = Path(__file__).resolve().parents[2]
AWS = str(REPO / "cluster_configs" / "ray-cluster-aws.yaml")
ONPREM = str(REPO / "cluster_configs" / "ray-cluster-onprem.yaml")


# ------------------------------------------------------------------------------------- the question


class Stdin(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__("")
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_no_terminal_and_no_yes_is_one_sentence(monkeypatch):
    monkeypatch.setattr(sys, "stdin", Stdin(tty=False))
    cluster, path, config = load_rented(AWS)
    with pytest.raises(ConfigError, match=r"cluster up costs \$55\.04/hour; pass --yes to go ahead \(stdin is not a terminal"):
        confirm_cost(cluster, path, config, False, Console(file=io.StringIO()), "cluster up")
    out = io.StringIO()
    assert confirm_cost(cluster, path, config, True, Console(file=out, width=300), "cluster up")
    assert "$55.04/hour (1 node(s) x $55.04; cost_per_hour in" in out.getvalue() and "yours to set" in out.getvalue()


@pytest.mark.parametrize("answer,go", [("y\n", True), ("yes\n", True), ("\n", False), ("n\n", False)])
def test_at_a_terminal_the_answer_decides(monkeypatch, answer, go):
    monkeypatch.setattr(sys, "stdin", Stdin(tty=True))
    cluster, path, config = load_rented(ONPREM)
    console = Console(file=io.StringIO(), width=300)
    monkeypatch.setattr(console, "input", lambda prompt: answer.strip())
    assert confirm_cost(cluster, path, config, False, console, "launch") is go


def test_launch_on_a_rented_config_refuses_without_yes_before_anything(tmp_path, monkeypatch, capsys):
    from orchestrator.cli import main

    monkeypatch.setattr(sys, "stdin", Stdin(tty=False))
    touched = []
    import orchestrator.backends.ray_rented as rented

    monkeypatch.setattr(rented.RentedCluster, "ensure_up", lambda self: touched.append("up"))
    store = tmp_path / "store"
    assert main(["launch", "jobs/smoke.yaml", "--cluster", AWS, "--store", str(store)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "launch costs $55.04/hour; pass --yes" in err and "Traceback" not in err
    assert touched == [] and not store.exists()


def test_cluster_up_refuses_without_yes_and_down_does_not_ask_a_script(monkeypatch, capsys):
    import ray.autoscaler.sdk as sdk

    from orchestrator.cli import main

    monkeypatch.setattr(sys, "stdin", Stdin(tty=False))
    calls = []
    monkeypatch.setattr(sdk, "create_or_update_cluster", lambda *a, **k: calls.append("up"))
    monkeypatch.setattr(sdk, "teardown_cluster", lambda *a, **k: calls.append("down"))
    assert main(["cluster", "up", ONPREM]) == 2
    assert calls == []
    assert main(["cluster", "down", ONPREM]) == 0  # releasing is never held up by a question
    assert calls == ["down"]


# -------------------------------------------------------------------------------- --dry-run, status


def test_launch_dry_run_shows_down_and_autostop_and_contacts_nothing(monkeypatch, capsys, tmp_path):
    import ray.autoscaler.sdk as sdk

    import orchestrator.backends.ray_launcher as launcher
    from orchestrator.cli import main

    def boom(*a, **k):
        raise AssertionError("a dry run must not call the cluster launcher or a provider")

    for fn in ("create_or_update_cluster", "teardown_cluster", "get_head_node_ip"):
        monkeypatch.setattr(sdk, fn, boom)
    monkeypatch.setattr(launcher, "live_nodes", boom)
    monkeypatch.setattr(launcher, "jobs_api_answers", boom)
    monkeypatch.setenv("COLUMNS", "300")
    argv = ["launch", "jobs/smoke.yaml", "--cluster", AWS, "--store", str(tmp_path / "s"), "--dry-run"]
    assert main([*argv, "--down", "--idle-minutes", "15"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "$55.04/hour" in out and "provisions first (`ray up`)" in out
    assert "--down: after the sweep (success, failure or Ctrl-C)" in out and "`ray down` releases every node" in out
    assert "--idle-minutes 15: a watcher on the head" in out and "ray down -y ~/ray_bootstrap_config.yaml" in out
    assert main(argv) == 0
    assert "stays up after the sweep: `speedrun cluster down" in " ".join(capsys.readouterr().out.split())
    assert main(["cluster", "status", AWS, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "p5.48xlarge" in out and "no provider or cloud API was asked" in out and "\x1b[" not in out


@pytest.mark.parametrize("extra,message", [
    (["--cluster", "local", "--down"], "--down: cluster config .*local.yaml provisions nothing"),
    (["--cluster", "local", "--idle-minutes", "5"], "--idle-minutes: cluster config .*local.yaml provisions nothing"),
    (["--cluster", AWS, "--idle-minutes", "0"], "--idle-minutes 0: must be > 0 minutes"),
    (["--cluster", AWS, "--down", "--detach"], "--down with --detach"),
])
def test_bad_release_flags_are_one_sentence(capsys, tmp_path, extra, message):
    import re

    from orchestrator.cli import main

    assert main(["launch", "jobs/smoke.yaml", "--store", str(tmp_path / "s"), "--dry-run", *extra]) == 2
    assert re.search(message, " ".join(capsys.readouterr().err.split()))


def test_the_head_dashboard_port_is_read_from_its_ray_start():
    assert remote_dashboard_port({"head_start_ray_commands": ["ray stop", "ray start --head --dashboard-port=9001"]}) == 9001
    assert remote_dashboard_port({"head_start_ray_commands": ["ray start --head --dashboard-port 9002"]}) == 9002
    _, _, config = load_rented(AWS)
    assert remote_dashboard_port(config) == 8265  # Ray's default


def test_every_summary_states_gpu_hours_even_without_a_price():
    from orchestrator.cluster_config import ClusterConfig

    line = cost_line(ClusterConfig(name="mine", backend="ray", nodes=1, gpus_per_node=8), 900)
    assert "8 GPUs x 0.25 h = 2.00 GPU-hours" in line and "no cost_per_hour" in line


# ------------------------------------------------------------------------------ launch --down paths


class FakeRented:
    def __init__(self):
        self.events = []

    def say(self, text):
        self.events.append(("say", text))

    def down(self):
        self.events.append("down")

    def close(self):
        self.events.append("close")

    def billed_line(self):
        return "billed"


def run_around(down, run):
    rented = FakeRented()
    code = launch_around(rented, down, run, cancel=lambda: rented.events.append("cancel"),
                         collect=lambda: rented.events.append("collect"))
    return code, [e for e in rented.events if not isinstance(e, tuple)]


def test_down_after_success_collects_then_releases():
    assert run_around(True, lambda: 0) == (0, ["collect", "down"])


def test_down_after_a_failed_sweep_still_releases():
    assert run_around(True, lambda: 1) == (1, ["collect", "down"])


def test_down_after_an_error_releases_and_the_error_goes_on():
    rented = FakeRented()

    def run():
        raise ConfigError("ray up failed")

    with pytest.raises(ConfigError, match="ray up failed"):
        launch_around(rented, True, run, cancel=lambda: None, collect=lambda: rented.events.append("collect"))
    assert [e for e in rented.events if not isinstance(e, tuple)] == ["down"]


def test_ctrl_c_with_down_cancels_the_sweep_then_releases():
    def run():
        raise KeyboardInterrupt

    assert run_around(True, run) == (130, ["cancel", "collect", "down"])


def test_ctrl_c_without_down_leaves_the_cluster_and_only_ends_the_forward():
    rented = FakeRented()

    def run():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        launch_around(rented, False, run, cancel=lambda: rented.events.append("cancel"), collect=lambda: None)
    assert rented.events == ["close"]


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_sigterm_or_sighup_with_down_is_taken_as_ctrl_c_and_the_handlers_come_back(sig, monkeypatch):
    """A `kill`, a `timeout` or a closed terminal cancels, collects and releases, exit 128 + the signal."""
    import os
    import signal

    from orchestrator.backends import ray_rented

    left = []
    monkeypatch.setattr(ray_rented, "_leave_the_terminal", lambda: left.append(True))   # keep pytest's terminal
    signum = getattr(signal, sig)
    before = signal.getsignal(signum)

    def run():
        os.kill(os.getpid(), signum)
        time.sleep(5)   # the handler raises in here
        return 0

    rented = FakeRented()
    code = launch_around(rented, True, run, cancel=lambda: rented.events.append("cancel"),
                         collect=lambda: rented.events.append("collect"))
    assert code == 128 + signum
    assert [e for e in rented.events if not isinstance(e, tuple)] == ["cancel", "collect", "down"]
    assert ("say", f"interrupted ({sig}): cancelling the sweep, then releasing the cluster") in rented.events
    assert left == ([True] if sig == "SIGHUP" else [])
    assert signal.getsignal(signum) == before


def test_without_down_the_stop_signals_keep_their_handlers():
    import signal

    seen = {}

    def run():
        seen.update({s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)})
        return 0

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    launch_around(FakeRented(), False, run, cancel=lambda: None, collect=lambda: None)
    assert seen == before


def test_the_release_itself_ignores_ctrl_c_sigterm_and_sighup(monkeypatch):
    """`ray down` is never cut short: a signal during it is said, not acted on."""
    import os
    import signal

    from orchestrator.backends import ray_rented

    rented = object.__new__(ray_rented.RentedCluster)
    rented.path, rented.config, rented.console, rented.forward = "c.yaml", {"cluster_name": "c"}, None, None
    said = []
    rented.say = said.append
    released = []

    def teardown(path, config, console):
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            os.kill(os.getpid(), s)
        time.sleep(0.2)
        released.append(path)

    monkeypatch.setattr(ray_rented, "teardown", teardown)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    rented.down()
    assert released == ["c.yaml"] and said[-1] == "cluster 'c' is down"
    assert sum("ignored until it is down" in line for line in said) == 3
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_failing_cancel_or_collect_does_not_stop_the_release():
    rented = FakeRented()

    def run():
        raise KeyboardInterrupt

    def fail():
        raise RuntimeError("Jobs API gone")

    assert launch_around(rented, True, run, cancel=fail, collect=fail) == 130
    assert rented.events[-2:] == ["down", ("say", "billed")]


# ---------------------------------------------------------------------------------- the watcher


def job(sid, status):
    return SimpleNamespace(submission_id=sid, job_id=None, status=SimpleNamespace(value=status))


def test_busy_means_a_pending_or_running_job_that_is_not_a_watcher():
    jobs = [job("speedrun-a", "SUCCEEDED"), job(f"{PREFIX}1", "RUNNING"), job("speedrun-b", "PENDING"),
            job("speedrun-c", "RUNNING"), job("speedrun-d", "FAILED")]
    assert busy_jobs(jobs) == ["speedrun-b", "speedrun-c"]
    assert busy_jobs([job(f"{PREFIX}1", "RUNNING")]) == []


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


def test_the_watcher_waits_for_the_sweep_then_for_the_idle_time():
    clock = Clock()
    busy_until = 300.0  # a sweep runs for 5 minutes

    def list_jobs():
        return [job("speedrun-x", "RUNNING" if clock.t < busy_until else "SUCCEEDED")]

    idle = wait_until_idle(list_jobs, idle_s=600, clock=clock, sleep=clock.sleep, say=lambda s: None)
    assert idle >= 600
    # counted from the last poll that saw the sweep running: within one poll (30 s) of its end + 10 minutes
    assert busy_until + 600 - 30 <= clock.t <= busy_until + 600 + 30


def test_an_unanswered_poll_counts_as_busy():
    clock = Clock()
    answers = iter([RuntimeError("dashboard restarting")] * 10)

    def list_jobs():
        e = next(answers, None)
        if e:
            raise e
        return []

    wait_until_idle(list_jobs, idle_s=60, clock=clock, sleep=clock.sleep, say=lambda s: None)
    assert clock.t == (10 - 1) * ray_autostop.poll_seconds(60) + 60  # idle counts from the last failed poll


def test_the_watcher_releases_cloud_nodes_with_ray_down_and_on_prem_stops_ray():
    assert teardown_command("aws", "/v/bin/ray") == ["/v/bin/ray", "down", "-y", str(Path("~/ray_bootstrap_config.yaml").expanduser())]
    assert teardown_command("local", "ray") == ["ray", "stop"]


def test_show_states_the_sweeps_gpu_hours_and_cost_from_the_plan_it_ran_with(tmp_path, capsys, monkeypatch):
    import json

    from orchestrator.cli import main
    from orchestrator.cluster_config import load_cluster
    from orchestrator.config import load_job
    from orchestrator.plan import build_plan
    from orchestrator.store import open_store

    cluster, cpath = load_cluster(AWS)
    plan = build_plan(load_job("jobs/smoke.yaml"), cluster, Path("jobs/smoke.yaml"), cpath, seeds=None,
                      store=str(tmp_path / "store"))
    store = open_store(str(tmp_path / "store"))
    store.put_bytes(plan.to_json().encode(), f"{plan.sweep_id}/plan.json")
    log = (REPO / "tests" / "data" / "logs" / "ours_complete.txt").read_bytes()
    store.put_bytes(log, f"{plan.sweep_id}/seed-0/train.log")
    store.put_bytes(json.dumps({"state": "succeeded", "total_s": 1800}).encode(), f"{plan.sweep_id}/seed-0/timings.json")
    monkeypatch.setenv("COLUMNS", "300")
    assert main(["show", plan.sweep_id, "--store", str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out
    assert "cost: 8 GPUs x 0.50 h = 4.00 GPU-hours x $6.88/GPU-hour ($55.04/node-hour) = $27.52" in out
    store.put_bytes(b'{"seeds": [0]}', f"{plan.sweep_id}/plan.json")  # a plan this version cannot read: no cost line
    assert main(["show", plan.sweep_id, "--store", str(tmp_path / "store")]) == 0
    assert "cost:" not in capsys.readouterr().out


def test_status_when_the_provider_cannot_answer_is_one_sentence(monkeypatch, capsys):
    import ray.autoscaler._private.providers as providers

    from orchestrator.cli import main

    def no_credentials(*a, **k):
        raise RuntimeError("Unable to locate credentials")

    monkeypatch.setattr(providers, "_get_node_provider", no_credentials)
    assert main(["cluster", "status", AWS]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "the aws provider could not list the nodes of 'speedrun-p5' (RuntimeError: Unable to locate credentials)" in err
    assert "Traceback" not in err

"""orchestrator/watch.py: the one place that re-submits, with a fake engine and a directory store."""
from __future__ import annotations

import json
import threading

from orchestrator.artifacts import Manifest
from orchestrator.backends.base import Backend, Handle, JobEnd, SweepState, SweepStatus
from orchestrator.store import LocalStore
from orchestrator.sweep import Ending, attempt_key, seed_prefix
from orchestrator.watch import rerun_dead_jobs, watch


class FakeEngine(Backend):
    """Job 1 died; the engine's answer is fixed by the test. Counts re-submissions."""

    name = "fake"

    def __init__(self, status: SweepStatus):
        self._status, self.reruns = status, []
        self.lock = threading.Lock()

    def describe(self, plan):
        return ""

    def submit(self, plan):
        raise NotImplementedError

    def status(self, handle):
        return self._status

    def logs(self, handle, follow=False):
        return iter(())

    def cancel(self, handle):
        pass

    def rerun(self, handle, dead, resume):
        with self.lock:
            self.reruns.append((dead.job_id, resume))
        self._status = SweepStatus(SweepState.SUCCEEDED, jobs={"2": SweepState.SUCCEEDED})
        return "2"


def _sweep(tmp_path, retries=1):
    store = LocalStore(tmp_path / "store")
    store.put_bytes(json.dumps({"job": {"retries": retries}}).encode(), "s/plan.json")
    return store, Handle(backend="fake", sweep_id="s", job_ids=["1"], store_url=str(tmp_path / "store"))


def dead(ending=Ending.DIED, retries_used=0):
    return SweepStatus(SweepState.FAILED, jobs={"1": SweepState.FAILED},
                     ended=[JobEnd("1", [0], ending, "died (NODE_FAIL)", retries_used=retries_used)])


def test_two_watchers_resubmit_a_dead_job_once(tmp_path):
    store, handle = _sweep(tmp_path)
    engine = FakeEngine(dead())
    st = engine.status(handle)
    assert rerun_dead_jobs(engine, handle, st, store, retries=1)
    assert rerun_dead_jobs(engine, handle, st, store, retries=1)  # the second watcher saw the same death
    assert engine.reruns == [("1", False)]
    assert json.loads(store.get_bytes(attempt_key("s", "1")))["replaced_by"] == "2"


def test_watch_resubmits_then_returns_the_final_state(tmp_path):
    _, handle = _sweep(tmp_path)
    engine = FakeEngine(dead())
    final = watch(engine, handle, poll_s=0.01, timeout_s=5)
    assert final.state == SweepState.SUCCEEDED and engine.reruns == [("1", False)]


def test_no_resubmission_without_retries_or_for_a_finished_seed(tmp_path):
    store, handle = _sweep(tmp_path, retries=0)
    engine = FakeEngine(dead())
    assert watch(engine, handle, poll_s=0.01, timeout_s=5).state == SweepState.FAILED and engine.reruns == []
    store, handle = _sweep(tmp_path / "b", retries=3)
    store.put_bytes(Manifest(seed_prefix('s', 0), [], state="succeeded").to_json(), f"{seed_prefix('s', 0)}/manifest.json")
    assert not rerun_dead_jobs(engine, handle, dead(), store, retries=3) and engine.reruns == []


def test_a_preempted_job_resumes_without_spending_a_retry(tmp_path):
    store, handle = _sweep(tmp_path, retries=0)
    engine = FakeEngine(dead(Ending.PREEMPTED))
    assert rerun_dead_jobs(engine, handle, engine.status(handle), store, retries=0)
    assert engine.reruns == [("1", True)]


def test_an_unknown_state_is_waited_out_not_resubmitted(tmp_path):
    _, handle = _sweep(tmp_path)
    engine = FakeEngine(SweepStatus(SweepState.UNKNOWN, "squeue did not answer", jobs={"1": SweepState.UNKNOWN}))
    assert watch(engine, handle, poll_s=0.01, timeout_s=0.2).state == SweepState.UNKNOWN and engine.reruns == []


def test_put_new_creates_once(tmp_path):
    store = LocalStore(tmp_path)
    assert store.put_new(b"a", "s/attempts/1.json") and not store.put_new(b"b", "s/attempts/1.json")
    assert store.get_bytes("s/attempts/1.json") == b"a" and [o.key for o in store.list("s/")] == ["s/attempts/1.json"]

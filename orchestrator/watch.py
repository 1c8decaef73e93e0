"""The one place that runs dead jobs again: a watcher (the attached `speedrun launch`, `speedrun watch`).

`speedrun status`, `logs` and `runs` only read. A watcher asks the backend for the sweep's state, and for
each job the engine positively says ended without success asks orchestrator.sweep.next_action whether to
run its unfinished seeds again. Before re-submitting it creates `<sweep>/attempts/<job>.json` in the
store, which only one writer can create: two watchers (two laptops, two terminals) never both re-submit.
A job whose state is unknown (squeue failed) is never re-submitted. Ray's retries happen inside the
cluster (backends/ray_driver.py, the same policy) and its status lists no ended jobs.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Callable

from orchestrator.sweep import attempt_key, next_action, plan_key, seed_done, seed_prefix

if TYPE_CHECKING:  # backends/base.py calls watch(): only names from it here, so no import circle
    from orchestrator.backends.base import Backend, Handle, JobEnd, SweepStatus

log = logging.getLogger(__name__)


def unfinished_seeds(store, sweep_id: str, seeds: list[int]) -> list[int]:
    """Seeds without a succeeded manifest in the store (all of them when the store cannot say)."""
    from orchestrator.artifacts import read_manifest
    from orchestrator.store import StoreError

    try:
        manifests = {s: read_manifest(store, seed_prefix(sweep_id, s)) for s in seeds}
    except (StoreError, ValueError) as e:
        log.warning("cannot read the store to find finished seeds (%s); counting all of %s as unfinished", e, seeds)
        return list(seeds)
    return [s for s, m in manifests.items() if not seed_done(m is not None, m.state if m else None)]


def claim_attempt(store, sweep_id: str, dead: JobEnd, action: str) -> bool:
    """Record in the store that `dead` is being replaced; False when another watcher already did."""
    record = {"job": dead.job_id, "seeds": dead.seeds, "action": action, "why": dead.why,
              "by": f"{socket.gethostname()}:{os.getpid()}", "at": time.time()}
    return store.put_new(json.dumps(record, indent=1).encode(), attempt_key(sweep_id, dead.job_id))


def rerun_dead_jobs(backend: Backend, handle: Handle, status: SweepStatus, store, retries: int,
                    say: Callable[[str], None] = log.warning) -> bool:
    """Re-submit the jobs of `status.ended` that the retry policy allows; True if any was (by us or another)."""
    replaced = False
    for dead in status.ended:
        unfinished = unfinished_seeds(store, handle.sweep_id, dead.seeds)
        nxt = next_action(dead.ending, unfinished, dead.retries_used, retries, dead.requeues, why=dead.why)
        if nxt.action not in ("retry", "resume"):
            continue
        replaced = True
        if not claim_attempt(store, handle.sweep_id, dead, nxt.action):
            log.info("job %s is already being re-submitted by another watcher", dead.job_id)
            continue
        new_id = backend.rerun(handle, dead, resume=nxt.action == "resume")
        key = attempt_key(handle.sweep_id, dead.job_id)
        record = json.loads(store.get_bytes(key))
        store.put_bytes(json.dumps(dict(record, replaced_by=new_id), indent=1).encode(), key)
        say(f"job {dead.job_id} {nxt.reason}: re-submitted as job {new_id}")
    return replaced


def _sweep_retries(store, sweep_id: str) -> int:
    """The job's `retries:` from the plan in the store (the plan was validated at launch)."""
    return int(json.loads(store.get_bytes(plan_key(sweep_id)))["job"].get("retries", 0))


def watch(backend: Backend, handle: Handle, poll_s: float = 1.0, timeout_s: float | None = None,
          say: Callable[[str], None] = log.warning) -> SweepStatus:
    """Poll until the sweep finishes (or timeout_s), re-running dead jobs as `retries:` allows."""
    from orchestrator.store import StoreError, open_store

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    store, retries = None, 0
    while True:
        st = backend.status(handle)
        replaced = False
        if st.ended and handle.store_url:
            try:
                if store is None:
                    store = open_store(handle.store_url)
                    retries = _sweep_retries(store, handle.sweep_id)
                replaced = rerun_dead_jobs(backend, handle, st, store, retries, say)
            except StoreError as e:  # without the store no attempt can be claimed: re-submit nothing
                log.warning("cannot record a re-submission in the store (%s); not re-submitting", e)
                store = None
        if st.state.finished and not replaced:
            return st
        if deadline is not None and time.monotonic() > deadline:
            return st
        time.sleep(poll_s)

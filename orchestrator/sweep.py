"""A sweep's rules, in one place: where its objects live, what a seed's state is and what its timings record,
which exit codes mean what, when a seed counts as done, and when to run seeds again. Pure: no I/O, nothing from
orchestrator.

A *sweep* is one `speedrun launch` (id `<job>-<utc>-<hash>`); it holds *seeds*, each one training run.
Object layout: `<sweep>/plan.json`, `<sweep>/handle.json`, `<sweep>/attempts/<job>.json`,
`<sweep>/seed-<n>/{train.log, metrics.jsonl, timings.json, env.json, ckpt/, manifest.json}`.
"""
from __future__ import annotations

import enum
import re
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from trainer.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_OK", "EXIT_PREEMPTED"]

MAX_REQUEUES = 20  # preemptions resumed without spending a retry, before a sweep is called failed
MAX_SEEDS = 1000  # seeds in one sweep: p < 0.01 needs tens; a typo's 10^9 would fill memory planning them
TARGET_VAL_LOSS = 3.28  # the record's target; a job's `target_loss:` replaces it for its sweep


def choose_target(flag: float | None, job_target: float | None) -> tuple[float, str]:
    """The val-loss target that stats, report and compare test against, and where it came from:
    --target, else the sweep's job `target_loss:`, else the record's 3.28."""
    if flag is not None:
        return flag, "--target"
    if job_target is not None:
        return job_target, "the job's target_loss"
    return TARGET_VAL_LOSS, "the record's target"

# ------------------------------------------------------------------------------------- keys and layout

PLAN = "plan.json"
HANDLE = "handle.json"
MANIFEST = "manifest.json"
_SEED_DIR = re.compile(r"^seed-(\d+)$")


def seed_dir(seed: int) -> str:
    """`seed-3`: a seed's folder name, in the store and on the node."""
    return f"seed-{seed}"


def seed_prefix(sweep_id: str, seed: int) -> str:
    """`<sweep>/seed-<n>`: where one seed's objects live."""
    return f"{sweep_id}/{seed_dir(seed)}"


def seed_of_dir(name: str) -> int | None:
    """3 for `seed-3`; None for anything else."""
    m = _SEED_DIR.match(name)
    return int(m.group(1)) if m else None


def plan_key(sweep_id: str) -> str:
    return f"{sweep_id}/{PLAN}"


def handle_key(sweep_id: str) -> str:
    return f"{sweep_id}/{HANDLE}"


def attempt_key(sweep_id: str, job_id: str) -> str:
    """The record that job `job_id` was replaced: whoever creates it first is the one who re-submits."""
    return f"{sweep_id}/attempts/{job_id}.json"


def sweep_of_key(key: str, marker: str = PLAN) -> str | None:
    """The sweep id of `<sweep>/plan.json` (or another top-level record); None for other keys."""
    parts = key.split("/")
    return parts[0] if len(parts) == 2 and parts[1] == marker else None


# ------------------------------------------------------------------------------------- a seed's state


class SeedState(str, enum.Enum):
    """One seed, as the node runner records it and the tables show it."""

    SUCCEEDED = "succeeded"    # trained, uploaded, manifest committed with this state
    FAILED = "failed"          # the trainer failed after its retries (committed with this state)
    PREEMPTED = "preempted"    # checkpointed on request; the next run resumes it
    INCOMPLETE = "incomplete"  # no manifest yet: running, dead, or upload unfinished


def seed_state(has_manifest: bool, recorded: str | None) -> SeedState:
    """A seed's state from its store objects: the manifest is the commit marker, and the node runner's
    verdict (in the manifest or timings.json; None in manifests older than the field) says how it ended."""
    if not has_manifest:
        return SeedState.INCOMPLETE
    if recorded in (None, SeedState.SUCCEEDED.value):
        return SeedState.SUCCEEDED
    return SeedState.FAILED


def shown_state(complete: bool, has_manifest: bool) -> SeedState:
    """What a sweep's table says of a seed: its log complete and committed, committed but not complete
    (the node runner or the log says it failed), or not committed yet."""
    if complete:
        return SeedState.SUCCEEDED
    return SeedState.FAILED if has_manifest else SeedState.INCOMPLETE


def seed_done(has_manifest: bool, recorded: str | None) -> bool:
    """A seed that nobody needs to run again."""
    return seed_state(has_manifest, recorded) is SeedState.SUCCEEDED


def trainer_outcome(exit_code: int, stop_requested: bool = False) -> SeedState:
    """How one trainer process ended, for the seed it ran."""
    if exit_code == EXIT_OK:
        return SeedState.SUCCEEDED
    if exit_code == EXIT_PREEMPTED or stop_requested:
        return SeedState.PREEMPTED
    return SeedState.FAILED


def seed_timings(created_at: float, trainer: Mapping, run: Mapping, upload_s: float, now: float, *, state: str,
                 reason: str, exit_code: int | None, attempts: int) -> dict:
    """A seed's timings.json: from the launch (created_at) and from the seed's start to its first step, the
    trainer's own parts (its trainer_timings.json, `trainer`; {} for a record script, whose first step the node
    runner saw in its log, `run`), the upload, and how the seed ended. Times are unix seconds; None where unknown."""
    first = trainer.get("first_step_unix") or run.get("first_step_unix")
    return {
        "launch_to_first_step_s": (first - created_at) if first else None,
        "seed_start_to_first_step_s": (first - run["started_unix"]) if first else None,
        "warmup_s": trainer.get("warmup_s"),
        "warmup_parts_s": trainer.get("warmup_parts"),   # our trainer's: torchrun, imports, ..., first step, validation
        "train_s": trainer.get("train_s"),
        "validation_s": trainer.get("val_s"),
        "upload_s": upload_s,
        "total_s": now - created_at,
        "seed_wall_s": run["ended_unix"] - run["started_unix"],
        "steps_done": trainer.get("steps_done"),
        "total_steps": trainer.get("total_steps"),
        "state": state,
        "reason": reason or None,
        "exit_code": exit_code,
        "attempts": attempts,
    }


def describe_exit(code: int | str) -> str:
    """`exit code 1`, `killed by SIGKILL`, or what happened instead of an exit (a string says it)."""
    if isinstance(code, str):
        return code
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


# ------------------------------------------------------------------------------------- retries


class Ending(str, enum.Enum):
    """How a piece of work (a trainer, a node runner, a Slurm job, a Ray attempt) ended, as far as known."""

    SUCCEEDED = "succeeded"  # exit 0 / a result
    PREEMPTED = "preempted"  # checkpointed (exit 75): resume, spending no retry
    FAILED = "failed"        # gave up after its own retries (node runner exit 1): nothing to redo here
    DIED = "died"            # killed, lost, no result: run it again while retries last
    UNKNOWN = "unknown"      # the engine could not say (a query failed): never grounds to run it again


def ending_of_exit(code: int | str) -> Ending:
    """A node runner's exit code (or what happened to it instead) -> how it ended."""
    if code == EXIT_OK:
        return Ending.SUCCEEDED
    if code == EXIT_PREEMPTED:
        return Ending.PREEMPTED
    if code == EXIT_FAILED:
        return Ending.FAILED
    return Ending.DIED


def ending_of_nodes(codes: Mapping[int, int | str]) -> Ending:
    """One attempt on several nodes: every node's exit code combined."""
    endings = {ending_of_exit(c) for c in codes.values()}
    for ending in (Ending.SUCCEEDED, Ending.PREEMPTED, Ending.FAILED):
        if endings <= {Ending.SUCCEEDED, ending}:
            return ending
    return Ending.DIED


@dataclass(frozen=True)
class Next:
    """What to do after an attempt ended: done | failed | retry | resume | wait, and the line that says why."""

    action: str
    reason: str


def next_action(ending: Ending, unfinished: Sequence[int], retries_used: int, retries: int,
                requeues: int = 0, why: str = "", seeds: Sequence[int] = ()) -> Next:
    """THE retry policy: after `ending` (why: its words), with the seeds still not done, the retries
    spent of `retries:` and the preemptions resumed so far."""
    unfinished = list(unfinished)
    if ending is Ending.UNKNOWN:
        return Next("wait", f"state unknown ({why or 'the engine did not answer'}); not re-submitting")
    if ending is Ending.SUCCEEDED:
        return Next("done", f"all seeds done: {list(seeds) or unfinished}")
    if not unfinished:
        return Next("done", f"a node runner failed ({why}) but every seed has its manifest")
    if ending is Ending.PREEMPTED and requeues < MAX_REQUEUES:
        return Next("resume", f"preempted ({why}); resuming seeds {unfinished} (requeue {requeues + 1})")
    if ending is Ending.FAILED:
        # The node runner already retried each failed seed `retries` times itself.
        return Next("failed", f"failed ({why}); seeds {unfinished} failed after their retries")
    if retries_used >= retries:
        return Next("failed", f"failed ({why}); seeds {unfinished} unfinished, no retries left (retries: {retries})")
    return Next("retry", f"failed ({why}); retry {retries_used + 1} of {retries} for seeds {unfinished}")

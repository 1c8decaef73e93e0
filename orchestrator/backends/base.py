"""The one small interface every engine implements (local subprocess, Slurm through submitit, Ray Jobs).

A backend receives a validated LaunchPlan and starts ONE node-runner invocation per node
(`python -m orchestrator.node --plan PLAN.json --node-rank R`). Everything after that (staging,
torchrun, uploads) is the node runner's job and is identical on every backend.
A Handle is plain JSON so that `speedrun status|logs|cancel` work after the launching CLI exits.
status() and logs() only read; re-running dead jobs is orchestrator/watch.py's, through rerun().
"""
from __future__ import annotations

import enum
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

from orchestrator.sweep import Ending

if TYPE_CHECKING:
    from orchestrator.cluster_config import ClusterConfig
    from orchestrator.plan import LaunchPlan


class SweepState(str, enum.Enum):
    """A sweep's state, and each of its jobs' (one per node, or per array task)."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    UNKNOWN = "UNKNOWN"

    @property
    def finished(self) -> bool:
        return self in (SweepState.SUCCEEDED, SweepState.FAILED, SweepState.CANCELLED)


@dataclass
class Handle:
    """What a backend needs to find a submitted run again: JSON-serialisable, stored with the run."""

    backend: str
    sweep_id: str
    job_ids: list[str]
    data: dict[str, Any] = field(default_factory=dict)
    submitted_at: float = field(default_factory=time.time)
    store_url: str = ""  # where the sweep's plan and attempt records live ("" in handles of older versions)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Handle":
        return cls(**d)


@dataclass(frozen=True)
class JobEnd:
    """A job the engine positively says ended without success, in a way that running it again could mend."""

    job_id: str
    seeds: list[int]
    ending: Ending          # DIED or PREEMPTED
    why: str
    retries_used: int = 0
    requeues: int = 0


@dataclass
class SweepStatus:
    """What the engine says of a sweep right now (status() only reads)."""

    state: SweepState
    detail: str = ""
    # per job id (one per node, or per array task) -> state
    jobs: dict[str, SweepState] = field(default_factory=dict)
    # jobs that a watcher may run again (engines whose retries happen inside the cluster leave it empty)
    ended: list[JobEnd] = field(default_factory=list)


class Backend(ABC):
    """submit(plan) -> Handle, status(h), logs(h), cancel(h); describe(plan) is the --dry-run text."""

    name: str = "base"
    reruns_dead_jobs: bool = False  # status() lists ended jobs that a watcher may re-submit with rerun()

    def __init__(self, cluster: "ClusterConfig"):
        self.cluster = cluster

    @abstractmethod
    def describe(self, plan: "LaunchPlan") -> str:
        """What submit() would do, as text for --dry-run (an sbatch script, a Ray entrypoint, a command)."""

    def check(self, plan: "LaunchPlan") -> None:
        """Raise ConfigError if submit() cannot work from here (no sbatch, no Ray address); has no side effects.

        Called before anything is written, so a launch that cannot be submitted leaves nothing behind.
        """

    @abstractmethod
    def submit(self, plan: "LaunchPlan") -> Handle:
        """Start one node-runner invocation per node and return at once."""

    @abstractmethod
    def status(self, handle: Handle) -> SweepStatus: ...

    @abstractmethod
    def logs(self, handle: Handle, follow: bool = False) -> Iterator[str]:
        """The node runner's console output, line by line; with follow, until the run finishes."""

    @abstractmethod
    def cancel(self, handle: Handle) -> None: ...

    def rerun(self, handle: Handle, dead: JobEnd, resume: bool) -> str:
        """Submit a dead job's seeds again and return the new job's id (engines that list ended jobs)."""
        raise NotImplementedError(f"the {self.name} backend re-runs nothing from outside the cluster")

    def wait(self, handle: Handle, poll_s: float = 1.0, timeout_s: float | None = None) -> SweepStatus:
        """Watch until the sweep finishes, re-running dead jobs as `retries:` allow (orchestrator/watch.py)."""
        from orchestrator.watch import watch

        return watch(self, handle, poll_s=poll_s, timeout_s=timeout_s)

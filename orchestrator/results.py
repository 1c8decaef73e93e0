"""Parse training logs (ours and modded-nanogpt's) into per-run results.

Both trainers print the same record line shape:
    step:1695/1695 val_loss:3.2772 train_time:168938ms step_avg:99.67ms
    step:10/1695 train_loss:5.1234 train_time:1234ms step_avg:123.40ms
    peak memory allocated: 34004 MiB reserved: 49660 MiB
modded-nanogpt logs also start with the script's source and nvidia-smi output; the source holds the
same text as f-string templates (`step:{step}/...`), which the patterns below never match because
they require digits. `parse_line` serves the node runner's live step/loss line; `parse_log` the whole
file. Everything above the loaders at the bottom is pure.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

# `step:N/T` anywhere on the line (torchrun may prefix `[rank0]:`), then `key:value` pairs.
_STEP_RE = re.compile(r"\bstep\s*:\s*(\d+)\s*/\s*(\d+)")
_PAIR_RE = re.compile(r"\b([a-z_]+)\s*:\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)\s*(ms|s)?\b", re.I)
# Current form, and the older `peak memory consumption: N MiB` of 2024 records.
_MEM_RE = re.compile(
    r"peak memory (?:allocated|consumption)\s*:\s*(\d+)\s*MiB(?:\s*,?\s*reserved\s*:\s*(\d+)\s*MiB)?", re.I
)
_TRACEBACK = "Traceback (most recent call last)"
# Last line of a Python traceback (`torch.OutOfMemoryError: CUDA out of memory...`), or a signal notice.
_ERROR_RE = re.compile(r"^(?:\[[^\]]*\]:?\s*)?([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)\b.*)$")
_SIGNAL_RE = re.compile(r"(Signal \d+ \(SIG\w+\) received.*|exitcode\s*:\s*-?\d+.*|Killed\b.*)")


@dataclass(frozen=True)
class StepEvent:
    """One `step:N/T ...` line; losses are None when the line does not carry them."""

    step: int
    total_steps: int
    val_loss: float | None = None
    train_loss: float | None = None
    train_time_ms: float | None = None
    step_avg_ms: float | None = None


@dataclass(frozen=True)
class MemoryEvent:
    peak_alloc_mib: int
    peak_reserved_mib: int | None = None


@dataclass(frozen=True)
class ValPoint:
    step: int
    total_steps: int
    val_loss: float
    train_time_ms: float | None
    step_avg_ms: float | None


@dataclass(frozen=True)
class TrainPoint:
    step: int
    total_steps: int
    train_loss: float | None
    train_time_ms: float | None
    step_avg_ms: float | None


@dataclass
class RunResult:
    val_points: list[ValPoint] = field(default_factory=list)
    train_points: list[TrainPoint] = field(default_factory=list)
    final_val_loss: float | None = None
    steps_done: int = 0
    total_steps: int | None = None
    train_time_ms: float | None = None
    step_avg_ms: float | None = None
    peak_alloc_mib: int | None = None
    peak_reserved_mib: int | None = None
    complete: bool = False
    reason: str = ""  # why the run is incomplete; empty when complete
    error: str | None = None  # the last error line the log shows, if any

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunSummary:
    """One seed's numbers as the statistics see them."""

    seed: int | None
    val_loss: float | None
    train_time_s: float | None
    step_avg_ms: float | None
    peak_mem_mib: int | None
    complete: bool
    reason: str = ""
    name: str = ""  # `seed-3` or the log file's name; what tables show

    @classmethod
    def from_result(cls, result: RunResult, seed: int | None = None, name: str = "") -> "RunSummary":
        return cls(
            seed=seed,
            val_loss=result.final_val_loss,
            train_time_s=None if result.train_time_ms is None else result.train_time_ms / 1000.0,
            step_avg_ms=result.step_avg_ms,
            peak_mem_mib=result.peak_alloc_mib,
            complete=result.complete,
            reason=result.reason,
            name=name or (f"seed-{seed}" if seed is not None else ""),
        )

    @classmethod
    def failed(cls, reason: str, seed: int | None = None, name: str = "") -> "RunSummary":
        return cls(seed, None, None, None, None, False, reason, name or (f"seed-{seed}" if seed is not None else ""))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunSummary":
        return cls(**d)


def _number(text: str) -> float:
    return float(text)  # float() accepts nan/inf in any case


def parse_line(line: str) -> StepEvent | MemoryEvent | None:
    """The event on one log line, or None for anything else (source code, nvidia-smi, warnings)."""
    m = _STEP_RE.search(line)
    if m:
        values: dict[str, float] = {}
        for key, raw, _unit in _PAIR_RE.findall(line[m.end():]):
            values[key.lower()] = _number(raw)
        # Old logs used `time:` or `train_time:`; `step_avg` of step 0 is `nanms`.
        return StepEvent(
            step=int(m.group(1)),
            total_steps=int(m.group(2)),
            val_loss=values.get("val_loss"),
            train_loss=values.get("train_loss", values.get("loss")),
            train_time_ms=values.get("train_time", values.get("time")),
            step_avg_ms=values.get("step_avg"),
        )
    m = _MEM_RE.search(line)
    if m:
        return MemoryEvent(int(m.group(1)), int(m.group(2)) if m.group(2) else None)
    return None


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _last_error(lines: list[str], after: int) -> str | None:
    """The most telling failure line after the last step line: an exception or a signal notice."""
    error = None
    in_traceback = False
    for line in lines[after:]:
        text = line.strip()
        if _TRACEBACK in text:
            in_traceback = True
            continue
        m = _ERROR_RE.match(text)
        if m and (in_traceback or "Error:" in text):
            error = m.group(1)[:300]
            in_traceback = False
            continue
        s = _SIGNAL_RE.search(text)
        if s and error is None:
            error = s.group(1)[:300]
    return error


def parse_log(text: str) -> RunResult:
    """Whole-log result. A step repeated after a resume replaces the earlier one (the later run wins)."""
    lines = text.splitlines()
    val: dict[int, ValPoint] = {}
    train: dict[int, TrainPoint] = {}
    result = RunResult()
    last: StepEvent | None = None
    last_step_line = 0
    for i, line in enumerate(lines):
        event = parse_line(line)
        if isinstance(event, MemoryEvent):
            result.peak_alloc_mib = event.peak_alloc_mib
            result.peak_reserved_mib = event.peak_reserved_mib
            continue
        if event is None:
            continue
        last, last_step_line = event, i + 1
        if event.val_loss is not None:
            val[event.step] = ValPoint(event.step, event.total_steps, event.val_loss,
                                       event.train_time_ms, _finite(event.step_avg_ms))
        else:
            train[event.step] = TrainPoint(event.step, event.total_steps, event.train_loss,
                                           event.train_time_ms, _finite(event.step_avg_ms))
    result.val_points = [val[k] for k in sorted(val)]
    result.train_points = [train[k] for k in sorted(train)]
    result.error = _last_error(lines, last_step_line)

    if last is None:
        result.reason = "no step lines in the log (the run died before training started)"
        if result.error:
            result.reason += f": {result.error}"
        return result

    result.total_steps = last.total_steps
    result.steps_done = max([p.step for p in result.val_points] + [p.step for p in result.train_points])
    timed = [e for e in (*result.val_points, *result.train_points) if e.train_time_ms is not None]
    if timed:
        latest = max(timed, key=lambda p: p.step)
        result.train_time_ms = latest.train_time_ms
        result.step_avg_ms = latest.step_avg_ms
    if result.val_points:
        final = result.val_points[-1]
        result.final_val_loss = final.val_loss
        if final.step == final.total_steps and math.isfinite(final.val_loss):
            result.complete = True
            return result
        if final.step == final.total_steps:
            result.reason = f"final val loss is {final.val_loss} (diverged)"
            return result
    if result.steps_done >= (result.total_steps or 0):
        result.reason = f"no validation at the final step {result.total_steps}"
    else:
        result.reason = f"stopped at step {result.steps_done}/{result.total_steps}"
    if result.error:
        result.reason += f": {result.error}"
    return result

"""Parse training logs (ours and modded-nanogpt's) into one seed's parsed result (SeedResult).

Both trainers print the same record line shape:
    step:1695/1695 val_loss:3.2772 train_time:168938ms step_avg:99.67ms
    step:10/1695 train_loss:5.1234 train_time:1234ms step_avg:123.40ms
    peak memory allocated: 34004 MiB reserved: 49660 MiB
modded-nanogpt logs also start with the script's source and nvidia-smi output; the source holds the
same text as f-string templates (`step:{step}/...`), which the patterns below never match because
they require digits. The 2024 baselines were llm.c logs: `s:250 tel:4.51` (val loss) and
`s:251 trl:4.49 lr:... norm:...` (train loss), with no total step count and no times.
`parse_line` serves the node runner's live step/loss line; `parse_log` the whole file. Pure: text in,
events and results out; raw log files are loaded by orchestrator/log_files.py, a sweep's seeds from the
store by orchestrator/results.py.
"""
from __future__ import annotations

import math
import re
import signal
from dataclasses import asdict, dataclass, field
from typing import Any

# `step:N/T` anywhere on the line (torchrun may prefix `[rank0]:`), then `key:value` pairs.
_STEP_RE = re.compile(r"\bstep\s*:\s*(\d+)\s*/\s*(\d+)")
_PAIR_RE = re.compile(r"\b([a-z_]+)\s*:\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)\s*(ms|s)?\b", re.I)
# Current form, and the older `peak memory consumption: N MiB` of 2024 records.
_MEM_RE = re.compile(
    r"peak memory (?:allocated|consumption)\s*:\s*(\d+)\s*MiB(?:\s*,?\s*reserved\s*:\s*(\d+)\s*MiB)?", re.I
)
# llm.c's format, anchored at the line start: `s:N tel:X` is a val loss, `s:N trl:X ...` a train loss.
_LLMC_RE = re.compile(r"^s:(\d+)\s+(tel|trl):\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)\b", re.I)
# Keys whose value is a duration: without `ms` or `s` after it the number cannot be read.
_TIME_KEYS = ("train_time", "time", "step_avg")
_TRACEBACK = "Traceback (most recent call last)"
_TORCHRUN_WRAPPER = "torch.distributed.elastic.multiprocessing.errors.ChildFailedError"
# torchrun's agent stopped by a signal (a time limit's SIGTERM, a scheduler's cancel): said in a few words
_TORCHRUN_SIGNAL_RE = re.compile(r"torch\.distributed\.elastic\.multiprocessing\.api\.SignalException: "
                                 r"Process \d+ got signal: (\d+)")
# Last line of a Python traceback (`torch.OutOfMemoryError: CUDA out of memory...`), or a signal notice.
_ERROR_RE = re.compile(r"^(?:\[[^\]]*\]:?\s*)?([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)\b.*)$")
_SIGNAL_RE = re.compile(r"(Signal \d+ \(SIG\w+\) received.*|exitcode\s*:\s*-?\d+.*|Killed\b.*)")


@dataclass(frozen=True)
class StepEvent:
    """One `step:N/T ...` (or llm.c `s:N ...`) line; losses are None when the line does not carry them.
    total_steps is None in llm.c logs, which never print it."""

    step: int
    total_steps: int | None
    val_loss: float | None = None
    train_loss: float | None = None
    train_time_ms: float | None = None
    step_avg_ms: float | None = None
    unitless: str | None = None  # a time printed without its unit (`train_time:1689`); its value is left None


@dataclass(frozen=True)
class MemoryEvent:
    peak_alloc_mib: int
    peak_reserved_mib: int | None = None


@dataclass(frozen=True)
class ValPoint:
    step: int
    total_steps: int | None
    val_loss: float
    train_time_ms: float | None
    step_avg_ms: float | None


@dataclass(frozen=True)
class TrainPoint:
    step: int
    total_steps: int | None
    train_loss: float | None
    train_time_ms: float | None
    step_avg_ms: float | None


@dataclass
class SeedResult:
    """One seed's training log, parsed: its curves and final numbers (from ours or modded-nanogpt's log)."""

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
    log_format: str = "record"  # "record" (`step:N/T ...`, ours and modded-nanogpt's) or "llm.c" (`s:N tel:...`)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _number(text: str) -> float:
    return float(text)  # float() accepts nan/inf in any case


class LogFormatError(ValueError):
    """A line the parser cannot read without guessing (a time with no unit); `line` is 1-based."""

    def __init__(self, line: int, message: str):
        super().__init__(f"line {line}: {message}")
        self.line, self.message = line, message


def parse_line(line: str) -> StepEvent | MemoryEvent | None:
    """The event on one log line, or None for anything else (source code, nvidia-smi, warnings)."""
    m = _STEP_RE.search(line)
    if m:
        values: dict[str, float] = {}
        unitless = None
        for key, raw, unit in _PAIR_RE.findall(line[m.end():]):
            key = key.lower()
            if key in _TIME_KEYS and not unit and raw.lower() != "nan":
                # `train_time:1689` could be ms or s; a guess would be off by 1000x, so the value stays unread.
                unitless = unitless or f"{key}:{raw}"
                continue
            # Times are kept in ms; a trainer that prints seconds (`train_time:168.9s`) is converted.
            values[key] = _number(raw) * (1000.0 if unit.lower() == "s" else 1.0)
        # Old logs used `time:` or `train_time:`; `step_avg` of step 0 is `nanms`.
        return StepEvent(
            step=int(m.group(1)),
            total_steps=int(m.group(2)),
            val_loss=values.get("val_loss"),
            train_loss=values.get("train_loss", values.get("loss")),
            train_time_ms=values.get("train_time", values.get("time")),
            step_avg_ms=values.get("step_avg"),
            unitless=unitless,
        )
    m = _LLMC_RE.match(line.strip())
    if m:
        loss = _number(m.group(3))
        is_val = m.group(2).lower() == "tel"
        return StepEvent(step=int(m.group(1)), total_steps=None,
                         val_loss=loss if is_val else None, train_loss=None if is_val else loss)
    m = _MEM_RE.search(line)
    if m:
        return MemoryEvent(int(m.group(1)), int(m.group(2)) if m.group(2) else None)
    return None


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _signal_name(number: int) -> str:
    try:
        return f"signal {number} ({signal.Signals(number).name})"
    except ValueError:
        return f"signal {number}"


def _last_error(lines: list[str], after: int) -> str | None:
    """The most telling failure line after the last step line: an exception or a signal notice."""
    error = None
    in_traceback = False
    for line in lines[after:]:
        text = line.strip()
        if _TRACEBACK in text:
            in_traceback = True
            continue
        sig = _TORCHRUN_SIGNAL_RE.search(text)
        if sig:
            if error is None:   # a rank's own error, above it, says more
                error = f"torchrun stopped by {_signal_name(int(sig.group(1)))}"
            in_traceback = False
            continue
        m = _ERROR_RE.match(text)
        if m and (in_traceback or "Error:" in text):
            # torchrun's own ChildFailedError only says that a rank failed; the rank's error, above it, says why
            if error is None or not m.group(1).startswith(_TORCHRUN_WRAPPER):
                error = m.group(1)[:300]
            in_traceback = False
            continue
        s = _SIGNAL_RE.search(text)
        if s and error is None:
            error = s.group(1)[:300]
    return error


def _cut_last_line(text: str, lines: list[str]) -> str | None:
    """The last line when the file stops in the middle of it (no newline at the end) and it is a step line:
    the trainer was killed while writing it, so `val_loss:3.27` may be the start of `val_loss:3.2772`."""
    if not lines or text.endswith(("\n", "\r")):
        return None
    return lines[-1].strip() if isinstance(parse_line(lines[-1]), StepEvent) else None


def parse_log(text: str) -> SeedResult:
    """Whole-log result. After a resume or a retry the later attempt wins (see the note in the loop).
    Raises LogFormatError on a time printed without its unit: reading it as ms or as s would be a guess."""
    lines = text.splitlines()
    cut = _cut_last_line(text, lines)
    if cut is not None:
        lines = lines[:-1]
    val: dict[int, ValPoint] = {}
    train: dict[int, TrainPoint] = {}
    result = SeedResult()
    last: StepEvent | None = None
    last_step_line = 0
    times_seen = False
    for i, line in enumerate(lines):
        event = parse_line(line)
        if isinstance(event, MemoryEvent):
            result.peak_alloc_mib = event.peak_alloc_mib
            result.peak_reserved_mib = event.peak_reserved_mib
            continue
        if event is None:
            continue
        if event.unitless:
            raise LogFormatError(i + 1, f"{event.unitless} has no unit, so it could be ms or s; "
                                        f"the trainer must print it as {event.unitless}ms (or s)")
        if event.total_steps is None:
            result.log_format = "llm.c"
        if last is not None and event.step < last.step:
            # A resume from a checkpoint or a retry from scratch (the node runner appends to train.log):
            # what the earlier attempt logged from this step on is superseded.
            val = {k: v for k, v in val.items() if k < event.step}
            train = {k: v for k, v in train.items() if k < event.step}
        last, last_step_line = event, i + 1
        times_seen = times_seen or event.train_time_ms is not None
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
        if cut is not None:
            result.reason = f"the log's only step line is cut mid-write ({cut!r})"
        if result.error:
            result.reason += f": {result.error}"
        return result

    result.steps_done = max([p.step for p in result.val_points] + [p.step for p in result.train_points])
    if result.log_format == "llm.c":
        # llm.c prints no step count: a run is whole when its last line is a val loss at or after every train step.
        finished = last.val_loss is not None and last.step >= result.steps_done and cut is None
        result.total_steps = last.step if finished else None
    else:
        result.total_steps = last.total_steps
    timed = [e for e in (*result.val_points, *result.train_points) if e.train_time_ms is not None]
    if timed:
        # The last step's time. Val points come first in `timed`, and max() keeps the first of equals: at the
        # final step the val line's time (after validation) is the one records quote.
        latest = max(timed, key=lambda p: p.step)
        result.train_time_ms = latest.train_time_ms
        result.step_avg_ms = latest.step_avg_ms
    final = result.val_points[-1] if result.val_points else None
    at_end = final is not None and final.step == result.total_steps
    if at_end and cut is None and times_seen and final.train_time_ms is None:
        # Every other line carried a time and the final one does not: it is cut, not a finished run.
        result.final_val_loss = final.val_loss
        result.reason = f"the final val line (step {final.step}) has no train_time: it was cut mid-write"
        return result
    if final is not None:
        result.final_val_loss = final.val_loss
        if at_end and math.isfinite(final.val_loss):
            result.complete = True
            return result
        if at_end:
            result.reason = f"final val loss is {final.val_loss} (diverged)"
            return result
    if cut is not None:
        result.reason = f"the log's last line is cut mid-write ({cut!r}); before it, step {result.steps_done}"
    elif result.total_steps is None:
        result.reason = f"stopped at step {result.steps_done} (llm.c log: no val loss after the last train step)"
    elif result.steps_done >= result.total_steps:
        result.reason = f"no validation at the final step {result.total_steps}"
    else:
        result.reason = f"stopped at step {result.steps_done}/{result.total_steps}"
    if result.error:
        result.reason += f": {result.error}"
    return result

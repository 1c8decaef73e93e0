"""Log parsing: our trainer's lines and modded-nanogpt's (record and 2024 logs), whole and truncated."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from orchestrator.results import SeedSummary
from orchestrator.train_log import MemoryEvent, StepEvent, parse_line, parse_log

LOGS = Path(__file__).resolve().parents[1] / "data" / "logs"


def read(name: str) -> str:
    return (LOGS / name).read_text()


def test_val_line_gives_every_field():
    e = parse_line("step:1695/1695 val_loss:3.2772 train_time:168938ms step_avg:99.67ms")
    assert e == StepEvent(step=1695, total_steps=1695, val_loss=3.2772, train_loss=None,
                          train_time_ms=168938.0, step_avg_ms=99.67)


def test_train_line_gives_train_loss_not_val_loss():
    e = parse_line("step:10/1695 train_loss:5.1234 train_time:1234ms step_avg:123.40ms")
    assert isinstance(e, StepEvent)
    assert (e.step, e.train_loss, e.val_loss, e.train_time_ms, e.step_avg_ms) == (10, 5.1234, None, 1234.0, 123.40)


@pytest.mark.parametrize("line", [
    "step: 10 / 1695   val_loss: 3.5000  train_time: 1234ms  step_avg: 123.40ms",
    "[rank0]: step:10/1695 val_loss:3.5000 train_time:1234ms step_avg:123.40ms",
    "step:10/1695\tval_loss:3.5000\ttrain_time:1234ms\tstep_avg:123.40ms\r",
])
def test_spacing_and_prefixes_do_not_matter(line):
    e = parse_line(line)
    assert isinstance(e, StepEvent) and (e.step, e.total_steps, e.val_loss, e.train_time_ms) == (10, 1695, 3.5, 1234.0)


def test_step_zero_nan_step_avg_parses_as_nan():
    e = parse_line("step:0/3000 val_loss:10.8258 train_time:0ms step_avg:nanms")
    assert isinstance(e, StepEvent) and e.val_loss == 10.8258 and math.isnan(e.step_avg_ms)


def test_memory_lines_current_and_2024():
    assert parse_line("peak memory allocated: 34004 MiB reserved: 49660 MiB") == MemoryEvent(34004, 49660)
    assert parse_line("peak memory consumption: 31177 MiB") == MemoryEvent(31177, None)


@pytest.mark.parametrize("line", [
    '        print0(f"step:{step}/{train_steps} val_loss:{val_loss:.4f} train_time:{t:.0f}ms", console=True)',
    'print0(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 1024 // 1024} MiB "',
    "|   0  NVIDIA H100 80GB HBM3          On  |   00000000:19:00.0 Off |                    0 |",
    "", "warmup done in 41.2 s",
])
def test_source_code_and_other_noise_is_not_an_event(line):
    assert parse_line(line) is None


def test_our_complete_log():
    r = parse_log(read("ours_complete.txt"))
    assert r.complete and r.reason == ""
    assert (r.total_steps, r.steps_done) == (100, 100)
    assert r.final_val_loss == pytest.approx(3.2712)
    assert [p.step for p in r.val_points] == [0, 25, 50, 75, 100]
    assert all(p.train_loss is not None for p in r.train_points)
    assert r.train_time_ms == r.val_points[-1].train_time_ms
    assert (r.peak_alloc_mib, r.peak_reserved_mib) == (34004, 49660)


def test_our_log_that_died_of_oom_is_incomplete_and_says_why():
    r = parse_log(read("ours_oom.txt"))
    assert not r.complete
    assert r.steps_done == 60 and r.total_steps == 100
    assert "stopped at step 60/100" in r.reason
    assert "OutOfMemoryError" in r.reason
    assert r.final_val_loss == r.val_points[-1].val_loss  # the last val seen, but not a final result


def test_modded_nanogpt_record_log_with_source_and_nvidia_smi():
    r = parse_log(read("modded_record.txt"))
    assert r.complete
    assert r.val_points[0].step == 0 and r.val_points[-1].step == 1695
    assert r.final_val_loss == pytest.approx(3.2772)
    assert r.train_time_ms == pytest.approx(168941, abs=5) and r.step_avg_ms == pytest.approx(99.67, abs=0.01)
    assert all(p.train_loss is None for p in r.train_points)  # newer records print no train loss
    assert r.peak_alloc_mib == 34004


def test_modded_nanogpt_2024_log():
    r = parse_log(read("modded_2024.txt"))
    assert r.complete and r.total_steps == 3000
    assert r.final_val_loss == pytest.approx(3.2806)
    assert r.peak_alloc_mib == 31177 and r.peak_reserved_mib is None
    assert r.val_points[0].step_avg_ms is None  # the `nanms` of step 0 is not a measurement


def test_log_cut_mid_line_is_incomplete():
    r = parse_log(read("modded_truncated.txt"))   # ends in `step:925/1695 train_ti`, no newline
    assert not r.complete
    assert r.steps_done == 900 and r.total_steps == 1695   # the cut line is not read
    assert r.reason == "the log's last line is cut mid-write ('step:925/1695 train_ti'); before it, step 900"
    assert r.train_time_ms is not None and r.peak_alloc_mib is None


def test_empty_log_and_log_without_steps():
    assert parse_log("").reason.startswith("no step lines")
    r = parse_log("Traceback (most recent call last):\n  File \"x\"\nFileNotFoundError: no shards in /data\n")
    assert not r.complete and "FileNotFoundError: no shards in /data" in r.reason


def test_nan_final_loss_is_not_complete():
    r = parse_log("step:10/10 val_loss:nan train_time:100ms step_avg:10.00ms\n")
    assert not r.complete and "nan" in r.reason


def test_missing_final_validation():
    r = parse_log("step:5/10 val_loss:4.0 train_time:50ms step_avg:10.00ms\n"
                  "step:10/10 train_loss:3.9 train_time:100ms step_avg:10.00ms\n")
    assert not r.complete and r.reason == "no validation at the final step 10"


def test_resumed_run_later_lines_win():
    text = ("step:5/10 val_loss:4.0 train_time:50ms step_avg:10.00ms\n"
            "step:6/10 train_loss:3.9 train_time:60ms step_avg:10.00ms\n"
            "step:5/10 val_loss:4.1 train_time:55ms step_avg:11.00ms\n"  # resumed from the step-5 checkpoint
            "step:10/10 val_loss:3.2 train_time:110ms step_avg:11.00ms\n")
    r = parse_log(text)
    assert r.complete and [p.val_loss for p in r.val_points] == [4.1, 3.2] and r.train_time_ms == 110


def test_summary_from_result():
    s = SeedSummary.from_result(parse_log(read("modded_record.txt")), seed=3)
    assert (s.seed, s.name, s.complete) == (3, "seed-3", True)
    assert s.train_time_s == pytest.approx(168.94, abs=0.01) and s.peak_mem_mib == 34004
    assert SeedSummary.from_dict(s.to_dict()) == s


def test_retry_appended_to_the_same_log_supersedes_the_dead_attempt():
    # The node runner appends every attempt to train.log: attempt 1 reached step 8, attempt 2 died at step 4.
    text = ("step:4/10 val_loss:4.0 train_time:40ms step_avg:10.00ms\n"
            "step:8/10 val_loss:3.5 train_time:80ms step_avg:10.00ms\n"
            "RuntimeError: NCCL timeout\n"
            "step:0/10 val_loss:10.8 train_time:0ms step_avg:nanms\n"
            "step:4/10 val_loss:4.1 train_time:41ms step_avg:10.25ms\n")
    r = parse_log(text)
    assert not r.complete and r.steps_done == 4 and r.final_val_loss == 4.1
    assert r.reason == "stopped at step 4/10"


def test_times_in_seconds_are_converted_to_ms():
    e = parse_line("step:1695/1695 val_loss:3.2772 train_time:168.938s step_avg:0.09967s")
    assert e.train_time_ms == pytest.approx(168938) and e.step_avg_ms == pytest.approx(99.67)


def test_untimed_warmup_steps_then_timer_reset():
    # Early-2025 records timed the first 10 steps with compilation, then restarted the clock at step 11.
    text = ("step:0/14 val_loss:10.8258 train_time:0ms step_avg:nanms\n"
            + "".join(f"step:{s}/14 train_time:{26000 + 120 * s}ms step_avg:nanms\n" for s in range(1, 11))
            + "".join(f"step:{s}/14 train_time:{120 * (s - 10)}ms step_avg:120.00ms\n" for s in range(11, 15))
            + "step:14/14 val_loss:3.2814 train_time:495ms step_avg:123.75ms\n")
    r = parse_log(text)
    assert r.complete and r.train_time_ms == 495 and r.step_avg_ms == 123.75
    assert len(r.train_points) == 14  # a clock going back is not a resume: the step number went on


def test_a_script_that_died_before_its_first_step_is_summarised_by_its_own_error_not_torchruns():
    # A real torchrun (--standalone, 1 process) of a script writing logs/final/<id>.txt before logs/final existed,
    # as the published record-28 script does: the rank's FileNotFoundError, then torchrun's ChildFailedError.
    r = parse_log(read("torchrun_died_before_start.txt"))
    assert not r.complete and r.val_points == []
    assert r.reason == ("no step lines in the log (the run died before training started): FileNotFoundError: "
                        "[Errno 2] No such file or directory: 'logs/final/abc.txt'")


def test_torchruns_child_failed_error_alone_is_still_the_error():
    r = parse_log("Traceback (most recent call last):\n  File \"x\", line 1\n"
                  "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n")
    assert r.error.startswith("torch.distributed.elastic.multiprocessing.errors.ChildFailedError")


def test_torchrun_stopped_by_a_signal_is_said_in_a_few_words():
    # The tail of a record-28 seed stopped at the job's seed_time_limit_min (H100, 2026-12-06): SIGTERM to torchrun.
    text = ("step:221/1695 train_time:155257ms step_avg:702.52ms\n"
            "Traceback (most recent call last):\n"
            "  File \"/opt/torch/lib/python3.12/site-packages/torch/distributed/elastic/multiprocessing/api.py\", "
            "line 86, in _terminate_process_handler\n"
            "    raise SignalException(f\"Process {os.getpid()} got signal: {sigval}\", sigval=sigval)\n"
            "torch.distributed.elastic.multiprocessing.api.SignalException: Process 1697 got signal: 15\n")
    assert parse_log(text).reason == "stopped at step 221/1695: torchrun stopped by signal 15 (SIGTERM)"
    rank_first = text.replace("Traceback", "RuntimeError: generator raised StopIteration\nTraceback", 1)
    assert parse_log(rank_first).reason == "stopped at step 221/1695: RuntimeError: generator raised StopIteration"

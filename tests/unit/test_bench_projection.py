"""bench/projection.py: each phase's ms from a run's step lines, the step estimates, the projection's arithmetic on 8
ranks, its refusals; and, end to end, the 118 s of bench/NOTES.md from the yardstick files it was worked out from."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

from projection import (UsageError, phase_ms, project, ranks_ms, run_config, step_times,  # noqa: E402
                        steps_estimates)

RESULTS = REPO / "bench" / "results"
PHASE_MS = {16384: 30.0, 32768: 55.0, 49152: 80.0}   # a made-up one-GPU step per micro-batch length


def report(ours_steps=30, **overrides) -> dict:
    return dict(gpu="NVIDIA H100 80GB HBM3", torch="2.11.0", steps=20, ours_steps=ours_steps, val_every=10,
                val_tokens=262144, reference_final_loss=2.5,
                runs=[dict(label="ours", kind="ours", overrides={}, steps_to_loss=27.0),
                      dict(label="old", kind="variant", overrides=overrides, steps_to_loss=24.0)])


def log_text(cfg, extra_first_ms=0.0) -> str:
    """Step lines of a run whose steps take PHASE_MS by their micro-batch length, with validations in between."""
    from trainer.schedules import micro_batch_len

    lines, t = [f"step:0/{cfg.steps} val_loss:10.8 train_time:0ms step_avg:0.02ms"], 0.0
    for s in range(cfg.steps):
        t += PHASE_MS[micro_batch_len(cfg, s)] + (extra_first_ms if s == 0 else 0.0)
        lines.append(f"step:{s + 1}/{cfg.steps} train_loss:3.0 train_time:{t:.0f}ms step_avg:{t / (s + 1):.2f}ms")
        if (s + 1) % cfg.val_every == 0:
            lines.append(f"step:{s + 1}/{cfg.steps} val_loss:3.0 train_time:{t:.0f}ms step_avg:{t / (s + 1):.2f}ms")
    return "\n".join(lines) + "\n"


def times_of(text: str) -> dict[int, float]:
    from orchestrator.train_log import parse_log

    r = parse_log(text)
    return {p.step: p.train_time_ms for p in (*r.val_points, *r.train_points)}


def test_step_times_are_the_differences_of_train_time_and_skip_gaps():
    assert step_times({1: 10.0, 2: 25.0, 4: 60.0}) == {0: 10.0, 1: 15.0}
    assert step_times({0: 0.0, 1: 7.0}) == {0: 7.0}


def test_phase_means_follow_the_schedule_and_count_a_slow_first_step():
    cfg = run_config(report(), "ours", "test")
    measured = phase_ms(cfg, [times_of(log_text(cfg, extra_first_ms=100.0))])
    assert set(measured) == {(8, 16384), (8, 32768), (8, 49152)}
    assert measured[(8, 32768)] == pytest.approx(55.0)
    assert measured[(8, 49152)] == pytest.approx(80.0)
    assert measured[(8, 16384)] == pytest.approx(30.0 + 100.0 / 10)   # 10 steps in the first third


def test_ranks_split_the_micro_batches_and_add_their_cost():
    assert ranks_ms((8, 49152), 656.0, 8, 3.5) == pytest.approx(85.5)
    assert ranks_ms((24, 16384), 720.0, 8, 0.0) == pytest.approx(90.0)   # 3 micro-batches on each rank
    assert ranks_ms((8, 49152), 656.0, 1, 0.0) == pytest.approx(656.0)


def test_projection_counts_each_phase_at_the_fineweb_step_count():
    cfg = run_config(report(), "ours", "test")
    measured = {(8, 16384): 240.0, (8, 32768): 440.0, (8, 49152): 656.0}
    seconds, phases = project(cfg, 1998, measured, 8, 3.5, "test")
    assert [p["steps"] for p in phases] == [666, 666, 666]
    assert seconds == pytest.approx(666 * (33.5 + 58.5 + 85.5) / 1000)


def test_a_phase_the_logs_never_ran_is_refused_by_name():
    cfg = run_config(report(), "old", "test")   # the default schedule, measured without its last phase
    with pytest.raises(UsageError, match="8 micro-batches of 49,152 tokens"):
        project(cfg, 300, {(8, 16384): 240.0, (8, 32768): 440.0}, 8, 3.5, "--log")


def test_steps_scale_by_the_yardstick_or_by_the_records():
    assert steps_estimates(1998, 229.2, 233.6, {}) == {"yardstick": 1961}
    assert steps_estimates(1484, None, 174.7, {"record46": 0.971}) == {"records": 1441}
    assert steps_estimates(1998, 229.2, None, {}) == {}


def run_cli(tmp_path, *args):
    return subprocess.run([sys.executable, str(REPO / "bench" / "projection.py"), "--out", str(tmp_path), *args],
                          capture_output=True, text=True, cwd=REPO)


def test_cli_reproduces_the_notes_projection_of_the_schedule(tmp_path):
    """bench/NOTES.md (2026-12-06): 1998 steps from 1484 x 235.2 / 174.7, 118 s; 85 s at record-46's 1441."""
    r = run_cli(tmp_path, "--recipe-json", str(RESULTS / "recipe-nvidia-h100-80gb-hbm3-issue22-s.json"),
                "--run", "sched", "--log", str(RESULTS / "recipe-nvidia-h100-80gb-hbm3-issue22-s-sched.log"),
                "--base-run", "ours", "--base-steps", "1484", "--record-factor", "record46=0.971", "--tag", "t")
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "projection-nvidia-h100-80gb-hbm3-t.json").read_text())
    by = {p["estimate"]: p for p in out["projections"]}
    assert by["yardstick"]["steps"] == 1998 and round(by["yardstick"]["seconds"]) == 118
    assert by["records"]["steps"] == 1441 and round(by["records"]["seconds"]) == 85
    assert out["gpu"] == "NVIDIA H100 80GB HBM3" and out["rank_cost_measured"] is False
    # today's model at that row's overrides: 420M parameters, the bigram table's 145M of them, in fp32
    assert 1.6e9 < out["reduced_bytes_per_step"] < 1.8e9


def test_cli_refuses_an_unknown_run_and_writes_nothing(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report()))
    log = tmp_path / "ours.log"
    log.write_text(log_text(run_config(report(), "ours", "test")))
    r = run_cli(tmp_path, "--recipe-json", str(path), "--run", "new", "--log", str(log), "--base-run", "old")
    assert r.returncode == 2
    assert r.stderr.strip() == "bench/projection.py: --recipe-json: no run labelled 'new' (it has ours, old)"
    assert not list(tmp_path.glob("projection-*"))
    r = run_cli(tmp_path, "--recipe-json", str(path), "--run", "ours", "--log", str(log))
    assert r.returncode == 2 and "no step estimate" in r.stderr
    r = run_cli(tmp_path, "--recipe-json", str(path), "--run", "ours", "--log", str(log), "--base-run", "old",
                "--base-steps", "1998")
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "projection-nvidia-h100-80gb-hbm3.json").read_text())
    assert out["projections"][0]["steps"] == 2248   # 1998 x 27 / 24

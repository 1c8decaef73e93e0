"""Seed statistics against scipy and hand-computed values; failed seeds stay out of the numbers."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from rich.console import Console
from scipy import stats as sps

from orchestrator.results import SeedSummary
from orchestrator.stats import (compare, mean_ci95, one_sided_p, render_comparison, render_stats, seeds_needed,
                                sweep_stats)

LOSSES = [3.2772, 3.2791, 3.2768, 3.2785, 3.2779, 3.2760, 3.2794, 3.2781]
TIMES = [168.94, 169.20, 168.71, 169.05, 168.88, 169.33, 168.79, 169.01]


def runs(losses, times, start_seed=0):
    return [SeedSummary(seed=start_seed + i, val_loss=l, train_time_s=t, step_avg_ms=t / 1.695, peak_mem_mib=34004,
                       complete=True, name=f"seed-{start_seed + i}") for i, (l, t) in enumerate(zip(losses, times))]


def dead(seed, reason="stopped at step 812/1695: torch.OutOfMemoryError: CUDA out of memory"):
    return SeedSummary(seed=seed, val_loss=3.9, train_time_s=80.0, step_avg_ms=99.0, peak_mem_mib=None,
                      complete=False, reason=reason, name=f"seed-{seed}")


def test_p_value_matches_scipy_one_sided_ttest():
    s = sweep_stats(runs(LOSSES, TIMES))
    ref = sps.ttest_1samp(LOSSES, 3.28, alternative="less")
    assert s.p_value == pytest.approx(ref.pvalue, rel=1e-10)
    assert s.t_statistic == pytest.approx(ref.statistic, rel=1e-10)
    assert s.val_loss_mean == pytest.approx(np.mean(LOSSES)) and s.val_loss_std == pytest.approx(np.std(LOSSES, ddof=1))
    assert s.is_record  # these 8 seeds prove < 3.28 at p < 0.01


def test_p_value_known_value():
    # mean 3.279, std 0.001, n 4: t = -2 with 3 df; tables give P(T3 < -2) = 0.06966
    assert one_sided_p(3.279, 0.001, 4, 3.28) == pytest.approx(0.069663, abs=1e-5)


def test_mean_above_target_is_never_a_record():
    s = sweep_stats(runs([3.281, 3.284, 3.282], TIMES[:3]))
    assert s.p_value > 0.5 and not s.is_record and s.seeds_needed is None
    assert any("not below the target" in n for n in s.notes)


def test_seeds_needed_is_the_smallest_n():
    mean, std = 3.279, 0.002
    n = seeds_needed(mean, std)
    assert one_sided_p(mean, std, n, 3.28) < 0.01 <= one_sided_p(mean, std, n - 1, 3.28)
    assert n == 25  # t.cdf(-0.5*sqrt(n), n-1) first drops below 0.01 at n=25


def test_seeds_needed_reported_for_a_sweep_that_is_not_yet_a_record():
    s = sweep_stats(runs([3.2772, 3.2801, 3.2795], TIMES[:3]))
    assert not s.is_record and s.seeds_needed > 3


def test_train_time_ci_matches_t_interval():
    lo, hi = mean_ci95(TIMES)
    ref = sps.t.interval(0.95, len(TIMES) - 1, loc=np.mean(TIMES), scale=np.std(TIMES, ddof=1) / math.sqrt(len(TIMES)))
    assert (lo, hi) == pytest.approx(ref)
    s = sweep_stats(runs(LOSSES, TIMES))
    assert s.train_time_ci95_s == pytest.approx(ref) and s.train_time_mean_s == pytest.approx(np.mean(TIMES))


def test_failed_seed_is_left_out_and_listed_loudly(caplog):
    caplog.set_level("INFO", logger="orchestrator.stats")
    good = runs(LOSSES[:4], TIMES[:4])
    s = sweep_stats(good + [dead(4)])
    ref = sweep_stats(good)
    assert s.n_complete == 4 and len(s.runs) == 5
    assert s.val_loss_mean == ref.val_loss_mean and s.p_value == ref.p_value
    assert s.train_time_mean_s == ref.train_time_mean_s  # the dead seed's 80 s does not drag the mean down
    assert [r.name for r in s.failed] == ["seed-4"]
    assert "seed-4 left out of the statistics" in caplog.text
    console = Console(record=True, width=200)
    console.print(render_stats(s))
    text = console.export_text()
    assert "FAILED" in text and "OutOfMemoryError" in text and "left out of the mean" in text
    assert "4 of 5" in text


def test_single_and_no_complete_seeds():
    one = sweep_stats(runs(LOSSES[:1], TIMES[:1]))
    assert one.val_loss_mean == LOSSES[0] and one.p_value is None and one.train_time_ci95_s is None
    none = sweep_stats([dead(0), dead(1)])
    assert none.n_complete == 0 and none.val_loss_mean is None and not none.is_record


def test_json_form_is_strict_json():
    s = sweep_stats(runs(LOSSES, TIMES) + [dead(9)])
    d = json.loads(json.dumps(s.to_dict(), allow_nan=False))
    assert d["failed"] == ["seed-9"] and d["n_complete"] == 8 and d["is_record"] is True
    assert d["runs"][8]["complete"] is False and d["target"] == 3.28


def test_compare_matches_welch_formula():
    a = runs(LOSSES, TIMES)
    b_times = [t - 2.5 + 0.1 * i for i, t in enumerate(TIMES[:6])]
    b = runs(LOSSES[:6], b_times, start_seed=100) + [dead(106)]
    c = compare(a, b, "base", "new")
    d = {x.metric: x for x in c.differences}["train_time_s"]
    xa, xb = np.array(TIMES), np.array(b_times)
    va, vb = xa.var(ddof=1) / xa.size, xb.var(ddof=1) / xb.size
    df = (va + vb) ** 2 / (va ** 2 / (xa.size - 1) + vb ** 2 / (xb.size - 1))
    half = sps.t.ppf(0.975, df) * math.sqrt(va + vb)
    diff = xb.mean() - xa.mean()
    assert d.diff == pytest.approx(diff) and d.ci95 == pytest.approx((diff - half, diff + half))
    assert d.p_value == pytest.approx(2 * sps.t.sf(abs(diff) / math.sqrt(va + vb), df))
    assert (d.n_a, d.n_b) == (8, 6) and c.failed_b == ["seed-106"]
    console = Console(record=True, width=200)
    console.print(render_comparison(c))
    assert "seed-106" in console.export_text()
    json.dumps(c.to_dict(), allow_nan=False)


def test_compare_with_too_few_seeds_gives_no_interval():
    c = compare(runs(LOSSES[:1], TIMES[:1]), runs(LOSSES[:3], TIMES[:3]))
    d = c.differences[0]
    assert d.diff is not None and d.ci95 is None and d.p_value is None

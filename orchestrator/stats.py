"""Statistics over seeds: is this recipe a record, and how do two sweeps differ?

A record needs p < 0.01 in a one-sided one-sample t-test that the mean final val loss is <= the target
(H0: mean >= target). Seeds that failed or did not finish are listed loudly and left out of every mean:
a dead seed has no final loss, and its partial train time would drag the mean down.
Pure: numbers in, numbers and rich renderables out.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from scipy import stats as sps

from orchestrator.results import SeedSummary
from orchestrator.sweep import TARGET_VAL_LOSS

log = logging.getLogger(__name__)

RECORD_P = 0.01
# Past this many seeds a "needed" count stops being a useful answer.
MAX_SEEDS_NEEDED = 100_000


@dataclass
class SweepStats:
    runs: list[SeedSummary]
    target: float = TARGET_VAL_LOSS
    target_source: str = ""  # --target, the job's target_loss, or the record's target
    n_complete: int = 0
    val_loss_mean: float | None = None
    val_loss_std: float | None = None  # sample std (ddof=1)
    t_statistic: float | None = None
    p_value: float | None = None  # one-sided: small means the mean is below the target
    seeds_needed: int | None = None  # smallest n with this mean and std giving p < 0.01; None: never
    train_time_mean_s: float | None = None
    train_time_ci95_s: tuple[float, float] | None = None
    step_avg_mean_ms: float | None = None
    peak_mem_max_mib: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[SeedSummary]:
        return [r for r in self.runs if not r.complete]

    @property
    def is_record(self) -> bool:
        return self.p_value is not None and self.p_value < RECORD_P

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["failed"] = [r.name for r in self.failed]
        d["is_record"] = self.is_record
        d["record_p"] = RECORD_P
        return _json_safe(d)


@dataclass
class Difference:
    """B minus A for one metric, with Welch's t-test and its 95% confidence interval."""

    metric: str
    mean_a: float | None
    mean_b: float | None
    diff: float | None
    ci95: tuple[float, float] | None
    p_value: float | None  # two-sided
    n_a: int
    n_b: int


@dataclass
class SideVsTarget:
    name: str
    target: float
    target_source: str
    p_value: float | None
    is_record: bool


@dataclass
class Comparison:
    name_a: str
    name_b: str
    differences: list[Difference]
    failed_a: list[str]
    failed_b: list[str]
    # each side's val loss against its target (its job's target_loss unless --target): p and whether a record
    targets: list["SideVsTarget"] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # on the inputs: skipped files, duplicates

    def to_dict(self) -> dict[str, Any]:
        return _json_safe(asdict(self))


def _json_safe(x: Any) -> Any:
    """NaN/inf become None so that `--json` output is strict JSON."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def one_sided_p(mean: float, std: float, n: int, target: float) -> float:
    """p-value of H0: true mean >= target, from summary numbers (same as ttest_1samp, alternative='less')."""
    if n < 2:
        return math.nan
    if std == 0:
        return 0.0 if mean < target else 1.0
    t = (mean - target) / (std / math.sqrt(n))
    return float(sps.t.cdf(t, df=n - 1))


def seeds_needed(mean: float, std: float, target: float = TARGET_VAL_LOSS, alpha: float = RECORD_P) -> int | None:
    """Smallest n >= 2 for which a sample with this mean and std would give p < alpha; None if no n will."""
    if mean >= target:
        return None
    if std == 0:
        return 2
    n = np.arange(2, MAX_SEEDS_NEEDED + 1)
    p = sps.t.cdf((mean - target) / (std / np.sqrt(n)), df=n - 1)
    hits = np.nonzero(p < alpha)[0]
    return int(n[hits[0]]) if hits.size else None


def mean_ci95(values: Sequence[float]) -> tuple[float, float] | None:
    """Student-t 95% interval for the mean; None below two values. Equal values have no spread to
    estimate: the interval is that one point (degenerate), and scipy is not asked (it would warn about 0 * inf)."""
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return None
    if np.ptp(x) == 0:
        return (float(x[0]), float(x[0]))
    lo, hi = sps.t.interval(0.95, df=x.size - 1, loc=x.mean(), scale=sps.sem(x))
    return (float(lo), float(hi))


def steps_of(runs: Sequence[SeedSummary]) -> dict[int | None, int]:
    """How many complete runs there are of each step count (None: an llm.c log cut before its end)."""
    counts: dict[int | None, int] = {}
    for r in runs:
        if _counts(r):
            counts[r.total_steps] = counts.get(r.total_steps, 0) + 1
    return counts


def group_by_steps(runs: Sequence[SeedSummary]) -> list[tuple[int | None, list[SeedSummary]]]:
    """The runs split by their step count, shortest first; runs with no known count last."""
    groups: dict[int | None, list[SeedSummary]] = {}
    for r in runs:
        groups.setdefault(r.total_steps, []).append(r)
    return sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))


def _counts(r: SeedSummary) -> bool:
    return r.complete and r.val_loss is not None and math.isfinite(r.val_loss)


def sweep_stats(runs: Sequence[SeedSummary], target: float = TARGET_VAL_LOSS) -> SweepStats:
    runs = list(runs)
    out = SweepStats(runs=runs, target=target)
    good = [r for r in runs if _counts(r)]
    for r in runs:
        if not _counts(r):
            log.info("%s left out of the statistics: %s", r.name or f"seed {r.seed}", r.reason or "incomplete")
    out.n_complete = len(good)
    if not good:
        out.notes.append("no complete seeds: nothing to test")
        return out
    lengths = steps_of(good)
    if len(lengths) > 1:
        mix = ", ".join(f"{n} run(s) of {'unknown' if k is None else k} steps" for k, n in sorted(
            lengths.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)))
        out.notes.append(f"these runs have different step counts ({mix}): one mean over them compares unlike "
                         "runs; `speedrun stats --group-by steps` gives one table per step count")
    losses = np.array([r.val_loss for r in good], dtype=float)
    out.val_loss_mean = float(losses.mean())
    if losses.size >= 2:
        out.val_loss_std = float(losses.std(ddof=1))
        out.p_value = one_sided_p(out.val_loss_mean, out.val_loss_std, losses.size, target)
        if out.val_loss_std > 0:
            out.t_statistic = float((out.val_loss_mean - target) / (out.val_loss_std / math.sqrt(losses.size)))
        out.seeds_needed = seeds_needed(out.val_loss_mean, out.val_loss_std, target)
        if out.val_loss_std == 0:
            out.notes.append(f"all {losses.size} val losses are {losses[0]:.4f} (no spread): the t-test is degenerate, "
                             f"p is {out.p_value:g} because the mean is {'below' if out.p_value == 0 else 'not below'} "
                             "the target; more seeds with real spread make it meaningful")
        if out.seeds_needed is None:
            out.notes.append(f"mean val loss {out.val_loss_mean:.4f} is not below the target {target}: "
                             "no number of seeds makes this a record")
    else:
        out.notes.append("one complete seed: a t-test needs at least two")
    times = [r.train_time_s for r in good if r.train_time_s is not None]
    if times:
        out.train_time_mean_s = float(np.mean(times))
        out.train_time_ci95_s = mean_ci95(times)
        if len(times) >= 2 and np.ptp(times) == 0:
            out.notes.append(f"all {len(times)} train times are {times[0]:.2f} s (no spread): the 95% interval is "
                             "degenerate, that one point")
    avgs = [r.step_avg_ms for r in good if r.step_avg_ms is not None]
    out.step_avg_mean_ms = float(np.mean(avgs)) if avgs else None
    mems = [r.peak_mem_mib for r in good if r.peak_mem_mib is not None]
    out.peak_mem_max_mib = max(mems) if mems else None
    return out


def welch(a: Sequence[float], b: Sequence[float], metric: str) -> Difference:
    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    d = Difference(metric, None, None, None, None, None, int(xa.size), int(xb.size))
    if xa.size:
        d.mean_a = float(xa.mean())
    if xb.size:
        d.mean_b = float(xb.mean())
    if d.mean_a is not None and d.mean_b is not None:
        d.diff = d.mean_b - d.mean_a
    if xa.size >= 2 and xb.size >= 2 and (xa.var() > 0 or xb.var() > 0):
        res = sps.ttest_ind(xb, xa, equal_var=False)
        ci = res.confidence_interval(0.95)
        d.p_value, d.ci95 = float(res.pvalue), (float(ci.low), float(ci.high))
    return d


def compare(a: Sequence[SeedSummary], b: Sequence[SeedSummary], name_a: str = "A", name_b: str = "B",
            targets: Sequence[tuple[float, str]] = ()) -> Comparison:
    """Differences B - A of final val loss and train time over the complete seeds of each sweep; with
    targets ((value, where it came from) for A and B), each side's one-sided test against its target."""
    ga = [r for r in a if r.complete]
    gb = [r for r in b if r.complete]

    def col(runs: list[SeedSummary], attr: str) -> list[float]:
        return [getattr(r, attr) for r in runs if getattr(r, attr) is not None]

    diffs = [welch(col(ga, m), col(gb, m), m) for m in ("val_loss", "train_time_s", "step_avg_ms")]
    sides = []
    for name, runs, (target, source) in zip((name_a, name_b), (a, b), targets):
        s = sweep_stats(list(runs), target)
        sides.append(SideVsTarget(name, target, source, s.p_value, s.is_record))
    return Comparison(name_a, name_b, diffs,
                      [r.name for r in a if not r.complete], [r.name for r in b if not r.complete], sides)


# ---- rich rendering (the CLI prints these) ----

def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def runs_table(runs: Sequence[SeedSummary], title: str = "Seeds") -> Table:
    t = Table(title=title)
    for name in ("run", "val loss", "train time (s)", "step avg (ms)", "peak mem (MiB)", "status"):
        t.add_column(name, justify="left" if name in ("run", "status") else "right", no_wrap=name == "run")
    for r in runs:
        # The reason goes in the failed panel below, where it has room.
        status = "[green]complete[/]" if r.complete else "[bold red]FAILED[/]"
        t.add_row(r.name or str(r.seed), _f(r.val_loss, ".4f"), _f(r.train_time_s, ".2f"),
                  _f(r.step_avg_ms, ".2f"), _f(r.peak_mem_mib, "d"), status)
    return t


def summary_table(s: SweepStats) -> Table:
    t = Table(title="Summary", show_header=False)
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("complete seeds", f"{s.n_complete} of {len(s.runs)}")
    t.add_row("target val loss", f"{s.target}" + (f" ({s.target_source})" if s.target_source else ""))
    std = f" ± {s.val_loss_std:.4f}" if s.val_loss_std is not None else ""
    t.add_row("val loss (mean ± std)", _f(s.val_loss_mean, ".4f") + std)
    t.add_row(f"p (mean ≤ {s.target}, one-sided t-test)", _f(s.p_value, ".3g"))
    verdict = "[bold green]yes[/]" if s.is_record else "[yellow]no[/]"
    t.add_row(f"record (p < {RECORD_P})", verdict)
    t.add_row(f"seeds needed for p < {RECORD_P} at this spread", "-" if s.seeds_needed is None else str(s.seeds_needed))
    ci = s.train_time_ci95_s
    ci_text = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
    t.add_row("train time (s, mean [95% CI])", _f(s.train_time_mean_s, ".2f") + ci_text)
    t.add_row("step avg (ms, mean)", _f(s.step_avg_mean_ms, ".2f"))
    t.add_row("peak memory (MiB, max)", _f(s.peak_mem_max_mib, "d"))
    return t


def failed_panel(runs: Sequence[SeedSummary]) -> Panel | None:
    bad = [r for r in runs if not r.complete]
    if not bad:
        return None
    lines = "\n".join(f"{r.name or r.seed}: {r.reason or 'incomplete'}" for r in bad)
    return Panel(lines, title=f"{len(bad)} seed(s) FAILED or incomplete: left out of the mean",
                 border_style="bold red")


def render_stats(s: SweepStats, title: str = "Seeds") -> Group:
    parts: list[Any] = [runs_table(s.runs, title), summary_table(s)]
    panel = failed_panel(s.runs)
    if panel is not None:
        parts.append(panel)
    parts.extend(Text(n, style="yellow") for n in s.notes)  # Text: a file name's [brackets] are not markup
    return Group(*parts)


def render_comparison(c: Comparison) -> Group:
    t = Table(title=f"B minus A (means; Welch's t-test, two-sided p)\nA = {c.name_a}\nB = {c.name_b}")
    for name in ("metric", "A", "B", "B - A", "95% CI", "p", "n A/B"):
        t.add_column(name, justify="left" if name == "metric" else "right", no_wrap=name in ("metric", "95% CI"))
    fmt = {"val_loss": ".4f", "train_time_s": ".2f", "step_avg_ms": ".2f"}
    for d in c.differences:
        f = fmt.get(d.metric, ".4g")
        ci = f"[{d.ci95[0]:{f}}, {d.ci95[1]:{f}}]" if d.ci95 else "-"
        diff = "-" if d.diff is None else format(d.diff, "+" + f)
        t.add_row(d.metric, _f(d.mean_a, f), _f(d.mean_b, f), diff, ci, _f(d.p_value, ".3g"), f"{d.n_a} / {d.n_b}")
    parts: list[Any] = [t]
    for side in c.targets:
        verdict = "[bold green]yes[/]" if side.is_record else "[yellow]no[/]"
        parts.append(f"{side.name}: target {side.target} ({side.target_source}); p (mean ≤ target) "
                     f"{_f(side.p_value, '.3g')}; record (p < {RECORD_P}): {verdict}")
    for name, failed in ((c.name_a, c.failed_a), (c.name_b, c.failed_b)):
        if failed:
            parts.append(f"[bold red]{name}: {len(failed)} failed/incomplete seed(s) left out: {', '.join(failed)}[/]")
    parts.extend(Text(n, style="yellow") for n in c.notes)
    return Group(*parts)

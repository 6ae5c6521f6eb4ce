"""Robust aggregates over seeds for the sweep comparison, as RL reviewers expect them (Agarwal et al.,
"Deep RL at the Edge of the Statistical Precipice", NeurIPS 2021): the interquartile mean (IQM) with a
stratified percentile-bootstrap confidence interval, the probability of improvement of one group over
another, and the env steps to reach a fraction of the way from the random policy's travel time to the
DUE's.

The definitions are rliable's (IQM = `scipy.stats.trim_mean(x, 0.25)` over all runs and tasks; runs
resampled with replacement within each task; probability of improvement = Mann-Whitney U / (n m) per task,
averaged over tasks), implemented with numpy: rliable would add arch, statsmodels and seaborn for a few
dozen lines. Everything is seeded: the same inputs give the same intervals.

A *stratum* is one task (scenario): a sequence of per-seed values. `analyze compare` groups runs by their
whole config, so each group is a single stratum and the bootstrap is the plain one over its seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_REPS = 2000
BOOTSTRAP_SEED = 0
CI_LEVEL = 0.95

Strata = Sequence[Sequence[float]]


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap CI (NaN bounds below 2 values: nothing to resample) and the
    number of values behind it."""

    value: float
    lo: float
    hi: float
    n: int


NO_INTERVAL = Interval(math.nan, math.nan, math.nan, 0)


def _clean(strata: Strata) -> list[np.ndarray]:
    """Each stratum as float64 without NaN (a run without the metric); +inf (never reached) is kept and
    ranks last. Empty strata are dropped."""
    out = []
    for s in strata:
        v = np.asarray(list(s), np.float64)
        v = v[~np.isnan(v)]
        if v.size:
            out.append(v)
    return out


def _iqm_rows(x: np.ndarray) -> np.ndarray:
    """IQM of each row of a 2-D array (all bootstrap replicates at once): scipy.stats.trim_mean(row, 0.25).
    +inf sorts last and is trimmed like any other value; kept, it makes the IQM +inf."""
    n = x.shape[1]
    k = int(0.25 * n)  # as trim_mean: floor(n / 4) values cut at each end, none below 4 values
    return np.sort(x, axis=1)[:, k : n - k].mean(axis=1)


def iqm(values: Sequence[float]) -> float:
    """Interquartile mean: the mean after cutting floor(n/4) values at each end (rliable's IQM; the plain
    mean below 4 values). NaN values are left out; +inf counts as the largest value. NaN if empty."""
    v = _clean([values])
    return float(_iqm_rows(v[0][None, :])[0]) if v else math.nan


def _quantile(sorted_stats: np.ndarray, q: float) -> float:
    """Linear-interpolated quantile (numpy's default) of sorted values that may hold +inf: numpy would
    interpolate inf * 0 into NaN."""
    pos = q * (len(sorted_stats) - 1)
    i = math.floor(pos)
    a, b, f = sorted_stats[i], sorted_stats[min(i + 1, len(sorted_stats) - 1)], pos - i
    return float(a) if f == 0 or a == b else float(a + (b - a) * f)


def _resample(rng: np.random.Generator, strata: list[np.ndarray], reps: int) -> list[np.ndarray]:
    """`reps` resamples of each stratum, with replacement and within the stratum: (reps, n_s) each."""
    return [s[rng.integers(0, s.size, size=(reps, s.size))] for s in strata]


def _interval(value: float, stats: np.ndarray, level: float, n: int) -> Interval:
    """`value` with the percentile interval of its bootstrap replicates `stats`."""
    s = np.sort(stats)
    alpha = (1 - level) / 2
    return Interval(value, _quantile(s, alpha), _quantile(s, 1 - alpha), n)


def iqm_interval(
    strata: Strata, reps: int = BOOTSTRAP_REPS, seed: int = BOOTSTRAP_SEED, level: float = CI_LEVEL
) -> Interval:
    """IQM over all values of all strata, with a stratified percentile-bootstrap `level` CI: each replicate
    resamples every stratum's seeds with replacement, then takes the IQM of the pooled resample."""
    clean = _clean(strata)
    n = sum(s.size for s in clean)
    if not n:
        return NO_INTERVAL
    value = float(_iqm_rows(np.concatenate(clean)[None, :])[0])
    if n < 2:
        return Interval(value, math.nan, math.nan, n)
    boot = _iqm_rows(np.concatenate(_resample(np.random.default_rng(seed), clean, reps), axis=1))
    return _interval(value, boot, level, n)


def _p_better(x: np.ndarray, y: np.ndarray, lower_is_better: bool) -> np.ndarray:
    """Per replicate row: the share of (x, y) pairs where x is better, ties counting 1/2 (U / (n m))."""
    a, b = x[..., :, None], y[..., None, :]
    wins = (a < b) if lower_is_better else (a > b)
    return (wins + 0.5 * (a == b)).mean(axis=(-2, -1))


def probability_of_improvement(
    x_strata: Strata,
    y_strata: Strata,
    lower_is_better: bool,
    reps: int = BOOTSTRAP_REPS,
    seed: int = BOOTSTRAP_SEED,
    level: float = CI_LEVEL,
) -> Interval:
    """P(X better than Y): per task the Mann-Whitney share of seed pairs in which X beats Y (ties 1/2),
    then the mean over the tasks both have (strata paired by position). CI: percentile bootstrap
    resampling X's and Y's seeds independently within each task. NaN CI when both have one value."""
    pairs = [(np.asarray(x, np.float64), np.asarray(y, np.float64)) for x, y in zip(x_strata, y_strata, strict=True)]
    pairs = [(x[~np.isnan(x)], y[~np.isnan(y)]) for x, y in pairs]
    pairs = [(x, y) for x, y in pairs if x.size and y.size]
    if not pairs:
        return NO_INTERVAL
    value = float(np.mean([_p_better(x, y, lower_is_better) for x, y in pairs]))
    n = sum(x.size for x, _ in pairs)
    if all(x.size < 2 and y.size < 2 for x, y in pairs):
        return Interval(value, math.nan, math.nan, n)
    rng = np.random.default_rng(seed)
    boot = np.zeros(reps)
    for x, y in pairs:
        xs, ys = _resample(rng, [x, y], reps)
        boot += _p_better(xs, ys, lower_is_better)
    return _interval(value, boot / len(pairs), level, n)


# ---------------------------------------------------------------------------- sample efficiency
START_POLICY = "random"
TARGET_POLICY = "due"
TARGET_FALLBACKS = ("shortest_path", "fastest_path", "free_flow")  # if the references lack `due`
# travel time with every agent counted (unfinished ones until the horizon); mean_travel_time counts arrivals only
EFFICIENCY_METRICS = ("mean_time_censored", "mean_travel_time")
EFFICIENCY_METRIC = EFFICIENCY_METRICS[0]


@dataclass(frozen=True)
class Level:
    """A travel-time level `fraction` of the way from `start`'s travel time to `target`'s."""

    value: float
    fraction: float
    start: str
    target: str
    start_value: float
    target_value: float
    fallback: bool  # target is not the one asked for (DUE missing from the references)
    metric: str = EFFICIENCY_METRIC  # the runs' and references' travel-time metric it is a level of

    @property
    def label(self) -> str:
        return f"{self.fraction:g} of {self.start}→{self.target}"


def efficiency_level(
    references: dict[str, dict[str, float]],
    fraction: float,
    target: str = TARGET_POLICY,
    start: str = START_POLICY,
    metric: str = EFFICIENCY_METRIC,
) -> tuple[Level | None, str]:
    """(level, note): travel time start + fraction * (target - start), from the references' `metric`
    (default mean_time_censored: every agent counted, so the random policy, which loses most agents,
    is slow rather than fast over its few arrivals); when `target` is missing, the first of
    TARGET_FALLBACKS present, said in the note; (None, why) when the start or every target is missing."""

    def tt(policy: str) -> float | None:
        v = references.get(policy, {}).get(metric)
        return v if v is not None and math.isfinite(v) else None

    t0 = tt(start)
    if t0 is None:
        return None, f"no {start} {metric} in the references: sample efficiency left out"
    chosen = next((p for p in (target, *TARGET_FALLBACKS) if p != start and tt(p) is not None), None)
    if chosen is None:
        others = ", ".join(TARGET_FALLBACKS)
        return None, f"no {target} (nor {others}) {metric} in the references: sample efficiency left out"
    t1 = tt(chosen)
    assert t1 is not None
    note = "" if chosen == target else f"no {target} reference: sample efficiency measured towards {chosen} instead"
    return Level(t0 + fraction * (t1 - t0), fraction, start, chosen, t0, t1, chosen != target, metric), note


def steps_or_inf(steps: float) -> float:
    """A run's env steps to the level, +inf when it never got there (or has no travel time at all): ranked
    worst, so such a run can only push its group's IQM up, to +inf when the trimming keeps it."""
    return steps if math.isfinite(steps) else math.inf

"""Robust statistics of `analyze compare` (analysis/robust.py): IQM, stratified bootstrap CIs,
probability of improvement, sample efficiency. The CLI side is in test_analysis.py."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import trim_mean

from analysis.load import RunData
from analysis.robust import (
    efficiency_level,
    iqm,
    iqm_interval,
    probability_of_improvement,
    steps_or_inf,
)
from analysis.stats import time_to_threshold


def width(iv) -> float:
    return iv.hi - iv.lo


# ---------------------------------------------------------------------------- IQM
def test_iqm_of_known_values():
    assert iqm([1, 2, 3, 4, 5, 6, 7, 8]) == pytest.approx(4.5)  # 1, 2 and 7, 8 dropped
    assert iqm([1, 2, 3, 4, 5, 6, 7, 1000]) == pytest.approx(4.5)  # an outlier seed does not move it
    assert iqm([1, 2, 3, 100]) == pytest.approx(2.5)
    assert iqm([330, 340, 350]) == pytest.approx(340)  # below 4 values: the mean
    assert iqm([5.0, math.nan, 7.0]) == pytest.approx(6.0)  # a run without the metric is left out
    assert math.isnan(iqm([])) and math.isnan(iqm([math.nan]))


def test_iqm_is_rliables_trim_mean():
    rng = np.random.default_rng(1)
    for n in range(1, 14):
        v = rng.normal(size=n)
        assert iqm(v) == pytest.approx(trim_mean(v, 0.25))


def test_iqm_ranks_never_reached_last():
    assert iqm([1, 2, 3, math.inf]) == pytest.approx(2.5)  # the one inf is trimmed
    assert iqm([1, 2, math.inf, math.inf]) == math.inf  # half never reached: so is the IQM
    assert iqm([1, 2, math.inf]) == math.inf  # below 4 values nothing is trimmed


# ---------------------------------------------------------------------------- bootstrap CI
def test_iqm_interval_contains_the_iqm_is_deterministic_and_narrows_with_seeds():
    base = [300.0, 310.0, 318.0, 325.0, 333.0, 340.0, 352.0, 360.0]
    few = iqm_interval([base])
    many = iqm_interval([base * 8])  # same distribution, 8x the seeds
    assert few.n == 8 and many.n == 64
    assert few.lo <= few.value <= few.hi and many.lo <= many.value <= many.hi
    assert few.value == many.value == pytest.approx(iqm(base))
    assert 0 < width(many) < width(few) / 2
    assert iqm_interval([base]) == few  # fixed seed: the same interval every time
    assert iqm_interval([base], seed=1) != few
    assert width(iqm_interval([base], reps=200)) > 0


def test_iqm_interval_of_one_or_no_value():
    one = iqm_interval([[7.0]])
    assert one.value == 7.0 and one.n == 1 and math.isnan(one.lo) and math.isnan(one.hi)
    assert math.isnan(iqm_interval([[]]).value)


def test_bootstrap_is_stratified_by_task():
    # two tasks on different scales: resampling within each keeps 4 values of each in every replicate,
    # so the pooled IQM is always (0 + 0 + 10 + 10) / 4; resampling the pool ignores the tasks and varies
    easy, hard = [0.0] * 4, [10.0] * 4
    strat = iqm_interval([easy, hard])
    assert (strat.value, strat.lo, strat.hi, strat.n) == (5.0, 5.0, 5.0, 8)
    pooled = iqm_interval([easy + hard])
    assert pooled.value == 5.0 and width(pooled) > 5


# ---------------------------------------------------------------------------- probability of improvement
def test_probability_of_improvement_on_constructed_groups():
    fast, slow = [300.0, 310.0, 320.0], [400.0, 410.0]
    assert probability_of_improvement([fast], [slow], lower_is_better=True).value == 1.0
    assert probability_of_improvement([slow], [fast], lower_is_better=True).value == 0.0
    assert probability_of_improvement([fast], [fast], lower_is_better=True).value == 0.5  # ties count 1/2
    assert probability_of_improvement([fast], [slow], lower_is_better=False).value == 0.0  # e.g. a return
    # 330 vs (330, 340, 350): 1/2 + 1 + 1; 340 vs them: 0 + 1/2 + 1 -> 4 of 6 pairs
    iv = probability_of_improvement([[330.0, 340.0]], [[330.0, 340.0, 350.0]], lower_is_better=True)
    assert iv.value == pytest.approx(4 / 6) and iv.n == 2
    assert 0.0 <= iv.lo <= iv.value <= iv.hi <= 1.0 and iv.hi > iv.lo
    sure = probability_of_improvement([fast], [slow], lower_is_better=True)
    assert sure.lo == sure.hi == 1.0  # no resample of these seeds reverses the order
    one = probability_of_improvement([[1.0]], [[2.0]], lower_is_better=True)
    assert one.value == 1.0 and math.isnan(one.lo)


def test_probability_of_improvement_averages_over_tasks():
    # task 1: X always better; task 2: X always worse -> 1/2, not the pooled pair share
    iv = probability_of_improvement([[1.0, 2.0], [50.0]], [[5.0], [10.0, 11.0]], lower_is_better=True)
    assert iv.value == pytest.approx(0.5)
    with pytest.raises(ValueError):
        probability_of_improvement([[1.0]], [[1.0], [2.0]], lower_is_better=True)  # tasks must pair up


# ---------------------------------------------------------------------------- sample efficiency
def test_efficiency_level_from_random_to_due_and_its_fallback():
    refs = {"random": {"mean_travel_time": 700.0}, "due": {"mean_travel_time": 380.0},
            "shortest_path": {"mean_travel_time": 400.0}}  # fmt: skip
    tt = "mean_travel_time"
    level, note = efficiency_level(refs, 0.5, metric=tt)
    assert level is not None and note == ""
    assert level.value == 540.0 and (level.start, level.target, level.fallback) == ("random", "due", False)
    assert efficiency_level(refs, 0.25, metric=tt)[0].value == 620.0
    del refs["due"]
    level, note = efficiency_level(refs, 0.5, metric=tt)
    assert level.value == 550.0 and level.target == "shortest_path" and level.fallback
    assert "no due reference" in note and "shortest_path" in note
    level, note = efficiency_level({"due": {tt: 380.0}}, 0.5, metric=tt)
    assert level is None and "no random mean_travel_time" in note


def test_efficiency_level_counts_every_agent_by_default():
    # random loses most agents: fast over its few arrivals, slow with every agent counted
    refs = {"random": {"mean_travel_time": 560.0, "mean_time_censored": 1040.0},
            "due": {"mean_travel_time": 440.0, "mean_time_censored": 440.0}}  # fmt: skip
    level, _ = efficiency_level(refs, 0.5)
    assert level is not None and level.metric == "mean_time_censored" and level.value == 740.0
    assert efficiency_level(refs, 0.5, metric="mean_travel_time")[0].value == 500.0
    level, note = efficiency_level({k: {"mean_travel_time": v["mean_travel_time"]} for k, v in refs.items()}, 0.5)
    assert level is None and "no random mean_time_censored in the references" in note


def test_steps_to_level_reads_the_levels_metric():
    n = 6
    metrics = {"iteration": np.arange(n, dtype=np.float64), "env_steps": 100.0 * np.arange(1, n + 1),
               "wall_s": np.arange(1.0, n + 1), "mean_travel_time": np.full(n, 300.0),
               "mean_time_censored": np.array([900, 800, 700, 600, 500, 400], np.float64)}  # fmt: skip
    run = RunData(Path("x.h5"), {"algorithm": "ippo"}, metrics, {}, 4)
    assert time_to_threshold(run, 650.0, window=1)[0] == 100.0  # default metric: mean_travel_time, 300 s
    assert time_to_threshold(run, 650.0, window=1, metric="mean_time_censored")[0] == 400.0


def curve_run(tt: list[float], steps_per_iteration: float = 100.0) -> RunData:
    n = len(tt)
    metrics = {"iteration": np.arange(n, dtype=np.float64), "mean_travel_time": np.asarray(tt, np.float64),
               "env_steps": steps_per_iteration * np.arange(1, n + 1), "wall_s": np.arange(1.0, n + 1)}  # fmt: skip
    return RunData(Path("x.h5"), {"algorithm": "ippo"}, metrics, {}, 4)


def test_steps_to_level_on_a_constructed_curve():
    run = curve_run([700, 650, 600, 550, 500, 450, 400, 350])
    # trailing 3-iteration means: (600+550+500)/3 = 550 at i = 4, then 500 at i = 5
    assert time_to_threshold(run, 550.0, window=3)[0] == 500.0
    assert time_to_threshold(run, 540.0, window=3)[0] == 600.0
    assert steps_or_inf(time_to_threshold(run, 540.0, window=3)[0]) == 600.0
    # one lucky iteration is not enough: the smoothed curve never gets below 500
    spike = curve_run([700, 700, 300, 700, 700, 700])
    assert steps_or_inf(time_to_threshold(spike, 500.0, window=3)[0]) == math.inf


def test_a_group_that_never_reaches_the_level_does_not_look_faster():
    reached = [500.0, 600.0, 700.0, 800.0]
    some_never = [500.0, 600.0, math.inf, math.inf]
    assert iqm_interval([reached]).value == pytest.approx(650.0)
    iv = iqm_interval([some_never])
    assert iv.value == math.inf and iv.hi == math.inf  # not "550 steps over the seeds that made it"
    one_never = iqm_interval([[500.0, 600.0, 700.0, math.inf]])
    assert one_never.value == pytest.approx(650.0) and one_never.hi == math.inf

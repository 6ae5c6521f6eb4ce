"""Statistics over per-iteration metrics and LLM programs: final values, seed aggregates, confidence
bands on a common x grid, time to a threshold, and SED before/after refinement figures."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from reled_hpc.expert.indices import plan_preference
from reled_hpc.expert.summary import sed_summary
from reled_hpc.finite import finite_stat

from .load import Dump, RunData

FINAL_WINDOW = 5  # "final" = mean of the last 5 committed iterations
X_KEYS = ("env_steps", "wall_s", "iteration")


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample std, n) over the finite values; std is NaN below 2 values."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan, int(v.size)


def t_quantile(n: int, level: float = 0.95) -> float:
    """Student-t quantile for a two-sided `level` interval of a mean over n samples."""
    if n < 2:
        return math.nan
    try:
        from scipy.stats import t

        return float(t.ppf(0.5 + level / 2, n - 1))
    except ImportError:  # pragma: no cover - scipy is a dependency; normal approximation otherwise
        return 1.959964


def seconds_per_iteration(run: RunData) -> float:
    """Median wall seconds of one iteration (wall_s is cumulative; the median ignores warm-up)."""
    w = run.metric("wall_s")
    w = w[np.isfinite(w)]
    if w.size == 0:
        return math.nan
    return float(np.median(np.diff(np.r_[0.0, w])))


def x_values(run: RunData, x: str) -> np.ndarray:
    return run.iterations.astype(np.float64) if x == "iteration" else run.metric(x)


@dataclass
class Band:
    """Mean over runs of a metric on a common x grid, with a 95% confidence band (t interval)."""

    x: np.ndarray
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    n: int


def mean_band(curves: Sequence[tuple[np.ndarray, np.ndarray]], points: int = 200) -> Band | None:
    """Interpolate each (x, y) curve onto a grid over the x range all curves cover, then mean and CI.

    The common range (not the longest run) keeps the number of seeds behind the mean constant.
    """
    clean = []
    for x, y in curves:
        ok = np.isfinite(x) & np.isfinite(y)
        x, y = np.asarray(x, np.float64)[ok], np.asarray(y, np.float64)[ok]
        if x.size:
            order = np.argsort(x, kind="stable")
            clean.append((x[order], y[order]))
    if not clean:
        return None
    lo_x, hi_x = max(c[0][0] for c in clean), min(c[0][-1] for c in clean)
    if hi_x < lo_x:  # disjoint ranges: no common grid
        return None
    grid = np.linspace(lo_x, hi_x, points) if hi_x > lo_x else np.array([lo_x])
    ys = np.stack([np.interp(grid, cx, cy) for cx, cy in clean])
    mean = ys.mean(axis=0)
    n = len(clean)
    half = t_quantile(n) * ys.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else np.zeros_like(mean)
    return Band(grid, mean, mean - half, mean + half, n)


def time_to_threshold(
    run: RunData, threshold: float, window: int = FINAL_WINDOW, metric: str = "mean_travel_time"
) -> tuple[float, float]:
    """(env steps, wall s) when the trailing `window`-iteration mean of `metric` (a travel time) first is
    <= threshold.

    Smoothed like the final value so that one lucky iteration does not count; NaN if never reached.
    """
    tt = run.metric(metric)
    n = len(tt)
    if n == 0:
        return math.nan, math.nan
    w = max(1, min(window, n))
    steps, wall = run.metric("env_steps"), run.metric("wall_s")
    for i in range(w - 1, n):
        seg = tt[i - w + 1 : i + 1]
        seg = seg[np.isfinite(seg)]
        if seg.size and seg.mean() <= threshold:
            return float(steps[i]), float(wall[i])
    return math.nan, math.nan


# ---------------------------------------------------------------------------- SED programs
PROGRAM_COLUMNS = ("iteration", "rank", "cycle", "subset", "round", "executed", "rvi", "pdi", "latency_s",
                   "prompt_tokens", "completion_tokens", "routes_changed")  # fmt: skip
# text/error are left out: they are the only large program columns and no statistic needs them


def read_programs(dump: Dump) -> dict[str, np.ndarray]:
    """The numeric programs/ columns of the committed iterations (small: a few rows per iteration)."""
    parts = list(dump.iter_chunks("programs", columns=PROGRAM_COLUMNS))
    if not parts:
        return {c: np.empty(0) for c in PROGRAM_COLUMNS}
    return {c: np.concatenate([p[c] for p in parts]) for c in PROGRAM_COLUMNS}


def refinement_pairs(progs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per (iteration, rank, cycle, subset): the first round's RVI/PDI and the best (kept) attempt's.
    Subset numbers are per rank: every rank's expert partitions its own agents."""
    keys = zip(*(progs[c].tolist() for c in ("iteration", "rank", "cycle", "subset")), strict=True)
    by: dict[tuple[int, int, int, int], list[int]] = {}
    for i, key in enumerate(keys):
        by.setdefault(key, []).append(i)
    keys = ("iteration", "rounds", "rvi0", "pdi0", "rvi", "pdi", "changed")
    out: dict[str, list[float]] = {k: [] for k in keys}
    for (it, *_), rows in sorted(by.items()):
        first = min(rows, key=lambda i: int(progs["round"][i]))
        # the expert's own preference; the dump does not keep route counts, so they do not tell plans apart
        best = min(rows, key=lambda i: plan_preference(bool(progs["executed"][i]), 0, progs["rvi"][i], progs["pdi"][i]))
        out["iteration"].append(it)
        out["rounds"].append(len(rows))
        out["rvi0"].append(float(progs["rvi"][first]))
        out["pdi0"].append(float(progs["pdi"][first]))
        out["rvi"].append(float(progs["rvi"][best]))
        out["pdi"].append(float(progs["pdi"][best]))
        out["changed"].append(float(sum(int(progs["routes_changed"][i]) for i in rows)))  # revisions with new routes
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


def revision_stats(progs: dict[str, np.ndarray], pairs: dict[str, np.ndarray]) -> dict[str, Any]:
    """What the RVI/PDI feedback did: revisions (rounds after the first), how many of them changed the
    routes, and of the subset-cycles that were revised, how many kept a plan with a lower RVI or PDI than
    round 1 through a revision that changed the routes (issue 13's 'cycles improved', per subset)."""
    revised = pairs["rounds"] > 1
    better = (pairs["rvi"] < pairs["rvi0"]) | (pairs["pdi"] < pairs["pdi0"])
    revisions = progs["round"] > 1  # round 1 is the first answer
    return {
        "revisions": int(revisions.sum()),
        "revisions_changed_routes": int(progs["routes_changed"][revisions].astype(bool).sum()),
        "revised_subset_cycles": int(revised.sum()),
        "improved_subset_cycles": int((revised & better & (pairs["changed"] > 0)).sum()),
    }


def sed_stats(run: RunData, progs: dict[str, np.ndarray]) -> dict[str, Any]:
    """SED figures of a run: programs, execution rate, RVI/PDI before and after refinement, LLM cost."""
    n = len(progs["iteration"])
    out: dict[str, Any] = {"programs": n}
    if n:
        pairs = refinement_pairs(progs)
        lat = progs["latency_s"]
        pt, ct = progs["prompt_tokens"], progs["completion_tokens"]
        summary = sed_summary(progs, run.metrics)  # the package's counts: rate = executed / answered
        out.update(
            answered=summary.generated,
            executed=summary.executed,
            execution_rate=summary.execution_rate,
            subset_cycles=len(pairs["iteration"]),
            **revision_stats(progs, pairs),
            rounds_mean=finite_stat(pairs["rounds"], np.mean),
            rvi_before_mean=finite_stat(pairs["rvi0"], np.mean),
            rvi_before_max=finite_stat(pairs["rvi0"], np.max),
            rvi_after_mean=finite_stat(pairs["rvi"], np.mean),
            rvi_after_max=finite_stat(pairs["rvi"], np.max),
            pdi_before_mean=finite_stat(pairs["pdi0"], np.mean),
            pdi_before_max=finite_stat(pairs["pdi0"], np.max),
            pdi_after_mean=finite_stat(pairs["pdi"], np.mean),
            pdi_after_max=finite_stat(pairs["pdi"], np.max),
            llm_latency_mean_s=finite_stat(lat, np.mean),
            prompt_tokens=int(pt[pt >= 0].sum()),
            completion_tokens=int(ct[ct >= 0].sum()),
        )
    # per-iteration metrics: also present for runs whose programs are not in the dump
    for key, name in (("rvi_max", "rvi_max_mean"), ("pdi_max", "pdi_max_mean"), ("alpha_mean", "alpha_mean"),
                      ("dtw_mean", "dtw_mean"), ("llm_latency_s", "llm_latency_per_iteration_s")):  # fmt: skip
        out[name] = finite_stat(run.metric(key), np.mean)
    if "execution_rate" not in out:
        out["execution_rate"] = finite_stat(run.metric("execution_rate"), np.mean)
    out["external_change_max"] = finite_stat(run.metric("external_change_max"), np.max)
    return out


def first_round_by_iteration(progs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per iteration: the max over subsets of the first-round RVI and PDI (before refinement)."""
    if not len(progs["iteration"]):
        return {"iteration": np.empty(0), "rvi0": np.empty(0), "pdi0": np.empty(0)}
    pairs = refinement_pairs(progs)
    its = np.unique(pairs["iteration"])
    out = {"iteration": its, "rvi0": np.empty(len(its)), "pdi0": np.empty(len(its))}
    for j, it in enumerate(its):
        sel = pairs["iteration"] == it
        out["rvi0"][j] = finite_stat(pairs["rvi0"][sel], np.max)
        out["pdi0"][j] = finite_stat(pairs["pdi0"][sel], np.max)
    return out

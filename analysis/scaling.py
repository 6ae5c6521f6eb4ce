"""The scaling table (`reled-hpc analyze scaling --table`): per run group and total agent count, the
final and held-out travel time, sample efficiency, seconds per iteration and the SED (LLM expert)
share of the wall time.

Sample efficiency needs a level on the same scale for every group of an agent count, and the random and
DUE references of `reled-hpc references` exist per scenario set, not per agent count. The level is
therefore taken from the runs themselves, per agent count: `fraction` of the way from the untrained
policy (the mean over the count's runs of their first iteration's travel time, every agent counted) to
the best final value any run of that count reached (the same metric, trailing FINAL_WINDOW mean).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .load import Group, RunData, last_finite
from .robust import EFFICIENCY_METRIC, iqm
from .stats import FINAL_WINDOW, seconds_per_iteration, time_to_threshold
from .tables import fmt_num, fmt_pct

DEFAULT_FRACTION = 0.5


@dataclass
class ScalingRow:
    group: str
    agents: int
    runs: int
    final_time: float  # IQM over runs of the final trailing-window travel time, arrived agents
    final_time_censored: float  # the same, every agent counted (unfinished ones until the horizon)
    final_arrival: float
    held_out_time: float  # IQM of the last held-out greedy evaluation's time, every agent counted (NaN: none)
    level: float  # the agent count's sample-efficiency level (module doc)
    steps_to_level: float  # IQM of env steps to it; inf when a run never got there
    reached: int
    seconds_per_iteration: float  # IQM of the runs' median
    sed_share: float  # sum of the expert step's wall time (SED cycles: LLM, sandbox, drives) / run wall time
    wall_s: float  # IQM of the runs' wall time


def sed_share(run: RunData) -> float:
    """The expert step's share of the run's wall time (0 for algorithms without one)."""
    wall = last_finite(run.metric("wall_s"))
    spent = run.metric("expert_s")
    spent = spent[np.isfinite(spent)]
    if not math.isfinite(wall) or wall <= 0:
        return math.nan
    return float(spent.sum() / wall) if spent.size else 0.0


def _first(run: RunData, metric: str) -> float:
    v = run.metric(metric)
    v = v[np.isfinite(v)]
    return float(v[0]) if v.size else math.nan


def scaling_rows(
    groups: Sequence[Group], fraction: float = DEFAULT_FRACTION, window: int = FINAL_WINDOW
) -> tuple[list[ScalingRow], list[str]]:
    """One row per (group, total agents), sorted by group then agents; notes say how each level was set."""
    by_count: dict[int, list[RunData]] = {}
    cells: dict[tuple[str, int], list[RunData]] = {}
    order: list[str] = []
    for g in groups:
        order.append(g.label)
        for r in g.runs:
            if r.total_agents is None:
                continue
            by_count.setdefault(r.total_agents, []).append(r)
            cells.setdefault((g.label, r.total_agents), []).append(r)
    levels: dict[int, float] = {}
    notes = []
    for n, runs in sorted(by_count.items()):
        starts = [s for s in (_first(r, EFFICIENCY_METRIC) for r in runs) if math.isfinite(s)]
        ends = [e for e in (r.final(EFFICIENCY_METRIC, window) for r in runs) if math.isfinite(e)]
        if not starts or not ends:
            levels[n] = math.nan
            notes.append(f"{n} agents: no {EFFICIENCY_METRIC} in the runs, no sample-efficiency level")
            continue
        start, best = float(np.mean(starts)), min(ends)
        levels[n] = start + fraction * (best - start)
        notes.append(
            f"{n} agents: level {levels[n]:.1f} s = {fraction:g} of the way from the untrained policy "
            f"({start:.1f} s, first iteration, mean of {len(starts)} runs) to the best final value ({best:.1f} s)"
        )
    rows = []
    for (label, n), runs in sorted(cells.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        steps = [time_to_threshold(r, levels[n], window, EFFICIENCY_METRIC)[0] for r in runs]
        held = [last_finite(r.metric("eval_time_censored")) for r in runs]
        rows.append(
            ScalingRow(
                group=label,
                agents=n,
                runs=len(runs),
                final_time=iqm([r.final("mean_travel_time", window) for r in runs]),
                final_time_censored=iqm([r.final(EFFICIENCY_METRIC, window) for r in runs]),
                final_arrival=iqm([r.final("arrival_rate", window) for r in runs]),
                held_out_time=iqm(held),
                level=levels[n],
                steps_to_level=iqm([s if math.isfinite(s) else math.inf for s in steps]),
                reached=sum(math.isfinite(s) for s in steps),
                seconds_per_iteration=iqm([seconds_per_iteration(r) for r in runs]),
                sed_share=iqm([sed_share(r) for r in runs]),
                wall_s=iqm([last_finite(r.metric("wall_s")) for r in runs]),
            )
        )
    return rows, notes


HEADERS = ("run group", "agents", "runs", "final travel time (s)", "final time, every agent (s)",
           "final arrival (%)", "held-out time, every agent (s)", "level (s)", "env steps to level",
           "reached", "s / iteration", "SED share of wall time", "wall time (s)")  # fmt: skip


def _cells(r: ScalingRow) -> list[str]:
    steps = "never" if r.steps_to_level == math.inf else fmt_num(r.steps_to_level, 0)
    return [r.group, str(r.agents), str(r.runs), fmt_num(r.final_time, 1), fmt_num(r.final_time_censored, 1),
            fmt_num(100 * r.final_arrival, 1), fmt_num(r.held_out_time, 1), fmt_num(r.level, 1), steps,
            f"{r.reached}/{r.runs}", fmt_num(r.seconds_per_iteration, 1), fmt_pct(r.sed_share),
            fmt_num(r.wall_s, 0)]  # fmt: skip


def scaling_markdown(rows: Sequence[ScalingRow], notes: Sequence[str]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "| " + " | ".join("---" for _ in HEADERS) + " |"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    lines.append("")
    lines.append(f"Values: IQM over the runs of a cell (the value itself for one run); final = trailing "
                 f"{FINAL_WINDOW}-iteration mean. SED share: the expert step's wall time (LLM requests, "
                 "sandbox, driving the plans) over the run's.")  # fmt: skip
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def scaling_csv(rows: Sequence[ScalingRow]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(list(ScalingRow.__dataclass_fields__))
    for r in rows:
        w.writerow([getattr(r, k) for k in ScalingRow.__dataclass_fields__])
    return buf.getvalue()

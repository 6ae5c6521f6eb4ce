"""The scaling table (analysis/scaling.py): levels per agent count from the runs, steps to them, the SED
share of the wall time; on RunData with known curves (the CLI: test_analysis.py::test_scaling)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from analysis.load import RunData, group_runs
from analysis.scaling import scaling_csv, scaling_markdown, scaling_rows, sed_share


def _run(algorithm: str, agents: int, seed: int, times: list[float], expert_s: float = 0.0) -> RunData:
    n = len(times)
    wall = 10.0 * np.arange(1, n + 1)
    metrics = {
        "iteration": np.arange(n, dtype=np.int32),
        "env_steps": 100.0 * np.arange(1, n + 1),
        "wall_s": wall,
        "mean_travel_time": np.asarray(times, float) - 5.0,
        "mean_time_censored": np.asarray(times, float),
        "arrival_rate": np.full(n, 0.9),
        "expert_s": np.where(np.arange(n) % 2 == 0, expert_s, 0.0),
        "eval_time_censored": np.r_[np.full(n - 1, np.nan), times[-1] + 1.0],
    }
    cfg = {"algorithm": algorithm, "seed": seed, "env": {"n_agents": agents}, "dist": {"total_agents": 0}}
    return RunData(Path(f"/x/{algorithm}-{agents}-{seed}"), cfg, metrics, {}, 4)


def test_levels_steps_and_sed_share_per_agent_count():
    flat = [1000.0] * 8
    runs = [
        # 10 agents: untrained 1000 s everywhere; ippo ends at 400 s, reled at 600 s: level 700 s
        _run("ippo", 10, 0, [1000.0, 900, 800, 700, 600, 500, 400, 400, 400, 400]),
        _run("reled", 10, 0, [1000.0, 700, 700, 700, 700, 700, 600, 600, 600, 600], expert_s=4.0),
        # 20 agents: reled never improves, ippo does
        _run("ippo", 20, 0, [1000.0, 800, 600, 400, 200, 200, 200, 200]),
        _run("reled", 20, 0, flat, expert_s=2.0),
    ]
    rows, notes = scaling_rows(group_runs(runs, ignore=("agents", "ranks")), fraction=0.5, window=1)
    by = {(r.group, r.agents): r for r in rows}
    assert [(r.group, r.agents) for r in rows] == [("ippo", 10), ("ippo", 20), ("reled", 10), ("reled", 20)]
    assert by["ippo", 10].level == by["reled", 10].level == pytest.approx(700.0)
    assert by["ippo", 20].level == pytest.approx(600.0)
    assert "10 agents: level 700.0 s" in notes[0] and "best final value (400.0 s)" in notes[0]
    # window 1: the first iteration at or below the level
    assert by["ippo", 10].steps_to_level == 400.0 and by["reled", 10].steps_to_level == 200.0
    assert by["reled", 20].steps_to_level == math.inf and by["reled", 20].reached == 0
    assert by["ippo", 10].final_time == 395.0 and by["ippo", 10].final_time_censored == 400.0
    assert by["reled", 10].held_out_time == 601.0
    # expert_s 4 s on every other of 10 iterations over 100 s of wall time
    assert by["reled", 10].sed_share == pytest.approx(0.2) and by["ippo", 10].sed_share == 0.0
    assert sed_share(runs[3]) == pytest.approx(8.0 / 80.0)
    md = scaling_markdown(rows, notes)
    assert "| reled | 20 | 1 |" in md and "| never | 0/1 |" in md and "| 20.0 % |" in md
    csv_text = scaling_csv(rows)
    assert csv_text.splitlines()[0].startswith("group,agents,runs,final_time") and len(csv_text.splitlines()) == 5

"""`analyze compare` with the held-out greedy evaluation (eval.every): each run's last evaluation, IQM [CI]
over seeds, the probability of improvement on held-out time, the references' held-out figures, and no
held-out columns for a sweep that never evaluated."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.stats import trim_mean

from analysis.load import Group, RunData, group_runs, load_sweep
from analysis.tables import compare, to_html, to_markdown
from reled_hpc.cli import main
from reled_hpc.io import TrajectoryWriter

EVAL = ("eval_time_censored", "eval_travel_time", "eval_arrival_rate", "eval_return")
N_IT = 6
TIME_HEADER, ARRIVAL_HEADER = "held-out travel time, greedy (s)", "held-out arrival (%)"
# each seed's LAST held-out time and arrival; earlier evaluations are far off, so that any other choice
# (first, mean, training window) shows. 4 seeds: the IQM drops the best and the worst one, unlike the mean.
IPPO_TIME, IPPO_ARRIVAL = [400.0, 410.0, 430.0, 700.0], [0.8, 0.85, 0.9, 0.5]
RELED_TIME, RELED_ARRIVAL = [300.0, 310.0, 320.0, 330.0], [0.95, 0.96, 0.97, 0.98]


def write_dump(path: Path, algorithm: str, seed: int, train_tt: float, held_out: dict[int, tuple[float, float]] | None,
               eval_columns: bool = True) -> None:  # fmt: skip
    """A metrics-only dump; `held_out`: {iteration: (time, arrival)} of the evaluations, NaN elsewhere.
    eval_columns=False: an older dump without the eval_* columns at all."""
    cfg = {"algorithm": algorithm, "seed": seed, "iterations": N_IT, "env": {"map": "grid", "n_agents": 4},
           "eval": {"every": 2 if held_out else 0}}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = ("ranks", *EVAL) if eval_columns else ("ranks",)
    with TrajectoryWriter(path, config_yaml=yaml.safe_dump(cfg), obs_dim=4, a_max=2, extra_metrics=extra) as w:
        for it in range(N_IT):
            m = {"env_steps": 100.0 * (it + 1), "wall_s": float(it + 1), "mean_travel_time": train_tt,
                 "arrival_rate": 0.9, "mean_return": -1.0, "ranks": 1.0}  # fmt: skip
            if held_out and it in held_out:
                m["eval_time_censored"], m["eval_arrival_rate"] = held_out[it]
                m["eval_travel_time"], m["eval_return"] = 1.0, 1.0  # other eval metrics: not tabulated
            w.end_iteration(m)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """ippo evaluates at 0, 2, 4 and the last iteration 5; reled's last evaluation is at 3 (cut short:
    NaN after it). reled is better held out but worse in training, so the two cannot be mixed up."""
    root = tmp_path_factory.mktemp("eval_sweep")
    for s in range(4):
        ippo = {it: (IPPO_TIME[s] + 1000.0, 0.1) for it in (0, 2, 4)} | {5: (IPPO_TIME[s], IPPO_ARRIVAL[s])}
        write_dump(root / f"ippo-s{s}" / "trajectories.h5", "ippo", s, 300.0, ippo)
        reled = {0: (RELED_TIME[s] + 2000.0, 0.2), 3: (RELED_TIME[s], RELED_ARRIVAL[s])}
        write_dump(root / f"reled-s{s}" / "trajectories.h5", "reled", s, 500.0, reled)
    return root


def rows_of(root: Path, references: dict | None = None) -> dict[str, dict]:
    sweep = load_sweep(root)
    cmp = compare(group_runs(sweep.runs), references or {}, None)
    return {r["label"]: r for r in cmp.rows}


def run_compare(capsys, *args: str) -> str:
    assert main(["analyze", "compare", *map(str, args)]) == 0
    return capsys.readouterr().out


def test_rows_hold_the_iqm_of_each_runs_last_evaluation(sweep):
    rows = rows_of(sweep)
    ippo, reled = rows["ippo"], rows["reled"]
    expect = trim_mean(IPPO_TIME, 0.25)  # (410 + 430) / 2, computed apart from analysis.robust
    assert expect == 420.0 and expect != np.mean(IPPO_TIME)
    assert ippo["eval_time_censored_iqm"] == pytest.approx(expect)
    assert ippo["eval_time_censored_iqm_lo"] <= expect <= ippo["eval_time_censored_iqm_hi"]
    assert ippo["eval_time_censored_iqm_lo"] < ippo["eval_time_censored_iqm_hi"]
    assert ippo["eval_time_censored_mean"] == pytest.approx(np.mean(IPPO_TIME))
    assert ippo["eval_time_censored_std"] == pytest.approx(np.std(IPPO_TIME, ddof=1))
    assert ippo["eval_arrival_rate_iqm"] == pytest.approx(trim_mean(IPPO_ARRIVAL, 0.25))
    lo, hi = ippo["eval_arrival_rate_iqm_lo"], ippo["eval_arrival_rate_iqm_hi"]
    assert lo <= trim_mean(IPPO_ARRIVAL, 0.25) <= hi
    # reled's last finite evaluation (iteration 3), not the NaN iterations after it
    assert reled["eval_time_censored_iqm"] == pytest.approx(trim_mean(RELED_TIME, 0.25))
    assert reled["eval_arrival_rate_iqm"] == pytest.approx(trim_mean(RELED_ARRIVAL, 0.25))
    # every reled seed beats every ippo seed held out, and loses in training
    poi = ippo["poi"]["reled"]
    assert poi["eval_time_censored"].value == 1.0 and poi["mean_travel_time"].value == 0.0
    assert reled["poi"] == {}  # the focus group has no row against itself


def test_markdown_csv_and_html_show_the_held_out_columns(sweep, tmp_path, capsys):
    csv_path = tmp_path / "t.csv"
    out = run_compare(capsys, sweep, "--csv", csv_path)
    header = out.splitlines()[0]
    cols = [c.strip() for c in header.strip("|").split("|")]
    # after the training finals and their probability of improvement
    i = cols.index("P(reled better): travel time")
    assert cols[i + 1 : i + 4] == [TIME_HEADER, ARRIVAL_HEADER, "P(reled better): held-out time"]
    ippo_line = next(line for line in out.splitlines() if line.startswith("| ippo |"))
    cells = [c.strip() for c in ippo_line.strip("|").split("|")]
    assert cells[i + 1].startswith("420.0 [") and cells[i + 2].startswith("82.5 [")  # IQM [CI], arrival in %
    assert cells[i + 3] == "1.00 [1.00, 1.00]"
    assert "the greedy policy at the run's last evaluation" in out and "unfinished one until the horizon" in out
    rows = {r["label"]: r for r in csv.DictReader(io.StringIO(csv_path.read_text()))}
    assert float(rows["ippo"]["eval_time_censored_iqm"]) == 420.0
    assert float(rows["ippo"]["eval_time_censored_mean"]) == pytest.approx(np.mean(IPPO_TIME))
    assert float(rows["ippo"]["eval_arrival_rate_iqm_hi"]) >= 0.825
    assert float(rows["ippo"]["p_better[reled]_eval_time_censored"]) == 1.0
    assert rows["reled"]["p_better[reled]_eval_time_censored"] == ""
    page = to_html(compare(group_runs(load_sweep(sweep).runs), {}, None))  # the report's table
    assert f"<th>{TIME_HEADER}</th>" in page and "<td>420.0 [" in page


def test_reference_rows_take_the_held_out_figures(sweep, tmp_path, capsys):
    refs = {
        "due": {"mean_travel_time": 380.0, "arrival_rate": 1.0, "mean_return": 1.0, "mean_time_censored": 390.0,
                "eval_mean_travel_time": 111.0, "eval_arrival_rate": 0.93, "eval_mean_return": 0.5,
                "eval_mean_time_censored": 350.0},
        "random": {"mean_travel_time": 700.0, "arrival_rate": 0.4},  # no held-out figures
    }  # fmt: skip
    rows = rows_of(sweep, refs)
    due, rnd = rows["due (reference)"], rows["random (reference)"]
    assert due["eval_time_censored_iqm"] == 350.0 and due["eval_arrival_rate_iqm"] == 0.93
    assert math.isnan(due["eval_time_censored_iqm_lo"]) and math.isnan(rnd["eval_time_censored_iqm"])
    path = tmp_path / "references.json"
    path.write_text(json.dumps({"_meta": {"ranks": 1}, **refs}))
    out = run_compare(capsys, sweep, "--references", path)
    cols = [c.strip() for c in out.splitlines()[0].strip("|").split("|")]
    t, a = cols.index(TIME_HEADER), cols.index(ARRIVAL_HEADER)
    cells = {c[0]: c for c in ([x.strip() for x in line.strip("|").split("|")] for line in out.splitlines()[2:])
             if len(c) == len(cols)}  # fmt: skip
    assert cells["due (reference)"][t] == "350.0" and cells["due (reference)"][a] == "93.0"
    assert cells["random (reference)"][t] == "-"


def test_a_sweep_without_evaluation_has_no_held_out_columns(tmp_path, capsys):
    for s in range(3):  # an older dump without the columns, and runs with eval.every 0 (all NaN)
        write_dump(tmp_path / f"ippo-s{s}" / "trajectories.h5", "ippo", s, 300.0, None, eval_columns=s > 0)
        write_dump(tmp_path / f"reled-s{s}" / "trajectories.h5", "reled", s, 280.0, None)
    csv_path = tmp_path / "t.csv"
    out = run_compare(capsys, tmp_path, "--csv", csv_path)
    assert "held-out" not in out and "P(reled better): travel time" in out
    rows = {r["label"]: r for r in csv.DictReader(io.StringIO(csv_path.read_text()))}
    assert rows["ippo"]["eval_time_censored_iqm"] == "" and rows["ippo"]["p_better[reled]_eval_time_censored"] == ""


def test_seeds_without_an_evaluation_are_left_out_and_a_group_without_any_shows_a_dash():
    def run(seed: int, held_out: list[float]) -> RunData:
        n = len(held_out)
        metrics = {"iteration": np.arange(n, dtype=np.float64), "eval_time_censored": np.asarray(held_out),
                   "mean_travel_time": np.full(n, 300.0)}  # fmt: skip
        return RunData(Path(f"s{seed}.h5"), {"algorithm": "ippo", "seed": seed}, metrics, {}, 2)

    nan = math.nan
    evaluated = Group("a", {}, [run(0, [900.0, nan, 100.0, nan]), run(1, [nan, nan, nan, nan]), run(2, [200.0])])
    never = Group("b", {}, [run(3, [nan, nan])])
    cmp = compare([evaluated, never], {}, None)
    a, b = cmp.rows
    assert a["eval_time_censored_iqm"] == 150.0 and math.isnan(b["eval_time_censored_iqm"])
    md = to_markdown(cmp)
    assert TIME_HEADER in md and "| b | 1 | 300.0 | - | - | - | - |" in md
    assert "| a | 3 | 300.0 [300.0, 300.0] | - | - | 150.0 [100.0, 200.0] | - |" in md

"""`reled-hpc analyze`: summary, curves, compare, sed, scaling, report on synthetic and real dumps;
damaged files; bounded memory on a multi-million-row dump."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from analysis.load import group_runs, load_run, load_runs, parse_ref_args
from analysis.rows import dtw_by_iteration, map_scale
from analysis.stats import mean_band, t_quantile
from reled_hpc.cli import main
from reled_hpc.io import TrajectoryWriter

OBS_DIM, A_MAX = 36, 4
SCALE_M = 1000.0  # scale_m of the fake map manifest the synthetic configs point at
SHIFT_M = 50.0  # expert positions = agent positions + this in x: DTW = SHIFT_M / SCALE_M exactly
KAPPA = 5.0
EXTRA = ("ranks", "external_change_max", "decisions")
N_IT = 12


# ---------------------------------------------------------------------------- synthetic dumps
def decision_rows(it: int, n_agents: int, steps: int, dx: float = 0.0, agent0: int = 0) -> dict[str, np.ndarray]:
    """`steps` decisions per agent, agent-major: each agent walks north 10 m per decision."""
    n = n_agents * steps
    aid = np.repeat(np.arange(agent0, agent0 + n_agents, dtype=np.int32), steps)
    k = np.tile(np.arange(steps), n_agents)
    mask = np.ones((n, A_MAX), bool)
    mask[:, 3] = False
    return {
        "iteration": np.full(n, it, np.int32),
        "rank": np.zeros(n, np.int16),
        "episode": np.full(n, it, np.int32),
        "agent_id": aid,
        "t": (k * 10.0).astype(np.float32),
        "obs": np.zeros((n, OBS_DIM), np.float32),
        "action": (k % 3).astype(np.int16),
        "action_mask": mask,
        "reward": np.full(n, -0.1, np.float32),
        "done": k == steps - 1,
        "logp": np.zeros(n, np.float32),
        "value": np.zeros(n, np.float32),
        "x": (aid * 100.0 + dx).astype(np.float32),
        "y": (k * 10.0).astype(np.float32),
    }


def config(map_dir: Path, algorithm: str, seed: int, n_agents: int = 4, feedback: bool = True, **kw) -> dict:
    cfg = {
        "name": f"{algorithm}-s{seed}",
        "algorithm": algorithm,
        "seed": seed,
        "iterations": N_IT,
        "episodes_per_iteration": 1,
        "runs_dir": "runs",
        "env": {"map": str(map_dir), "n_agents": n_agents, "traffic": "light", "horizon_s": 600.0},
        "ppo": {"lr": 0.0005},
        "qmix": {"lr": 0.0005},
        "hpo": {"expert": "llm" if algorithm == "reled" else "oracle", "kappa": KAPPA, "dtw_radius": 1},
        "sed": {"feedback": feedback, "tau_R": 50.0, "tau_P": 0.5},
        "dist": {"total_agents": 0},
    }
    cfg.update(kw)
    return cfg


def travel_time(it: int, seed: int) -> float:
    return 600.0 - 30.0 * it + 10.0 * seed


def write_dump(
    path: Path,
    cfg: dict,
    iterations: int = N_IT,
    steps: int = 5,
    sed: bool = False,
    hpo_metrics: bool = True,
    tt_offset: float = 0.0,
    censored: bool = False,
) -> Path:
    """A dump through the real writer: rows, SED programs and metrics following a known curve. `censored`:
    also the travel time with every agent counted (the same curve: every agent arrives here), an extra
    metric left out by default so the byte layout test_damaged_dumps.py cuts into stays the same."""
    n_agents, seed = cfg["env"]["n_agents"], cfg["seed"]
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = (*EXTRA, "mean_time_censored") if censored else EXTRA
    with TrajectoryWriter(
        path, config_yaml=yaml.safe_dump(cfg), obs_dim=OBS_DIM, a_max=A_MAX, extra_metrics=extra
    ) as w:
        for it in range(iterations):
            w.append_rows("agent", decision_rows(it, n_agents, steps))
            m = {
                "env_steps": 1000.0 * (it + 1),
                "wall_s": 2.0 * (it + 1) * n_agents / 4,
                "mean_travel_time": travel_time(it, seed) + tt_offset,
                "arrival_rate": min(1.0, 0.3 + 0.05 * it),
                "mean_return": -10.0 + 0.5 * it,
                "ranks": 1.0,
            }
            if censored:
                m["mean_time_censored"] = m["mean_travel_time"]
            if sed:
                w.append_rows("expert", decision_rows(it, n_agents, steps, dx=SHIFT_M))
                progs = []
                for subset in range(2):
                    progs.append({"cycle": it, "subset": subset, "round": 1, "text": "def plan(api): pass",
                                  "executed": subset == 0, "error": "" if subset == 0 else "SyntaxError",
                                  "rvi": 100.0, "pdi": 1.0, "latency_s": 2.0, "prompt_tokens": 1000,
                                  "completion_tokens": 200})  # fmt: skip
                    progs.append({"cycle": it, "subset": subset, "round": 2, "text": "def plan(api): return {}",
                                  "executed": True, "rvi": 30.0, "pdi": 0.3, "latency_s": 1.0,
                                  "prompt_tokens": 1500, "completion_tokens": 100,
                                  "routes_changed": subset == 0})  # fmt: skip
                w.append_programs(progs)
                m.update(rvi_max=30.0, pdi_max=0.3, execution_rate=0.75, llm_latency_s=3.0,
                         external_change_max=10.0 + it)  # fmt: skip
                if hpo_metrics:
                    m.update(alpha_mean=math.exp(-KAPPA * SHIFT_M / SCALE_M), dtw_mean=SHIFT_M / SCALE_M)
            w.end_iteration(m)
    return path


REFERENCES = {
    "shortest_path": {"mean_travel_time": 400.0, "mean_time_censored": 400.0, "arrival_rate": 1.0, "mean_return": 0.5},
    "random": {"mean_travel_time": 700.0, "mean_time_censored": 700.0, "arrival_rate": 0.4, "mean_return": -12.0},
    "due": {"mean_travel_time": 380.0, "mean_time_censored": 380.0, "arrival_rate": 1.0, "mean_return": 1.0},
}


@pytest.fixture(scope="module")
def map_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fakemap")
    (d / "manifest.json").write_text(json.dumps({"name": "fake", "scale_m": SCALE_M}))
    return d


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, map_dir) -> Path:
    """ippo (4 agents, 3 seeds; 8 agents, 2 seeds), reled-llm with and without feedback (2 seeds each)."""
    root = tmp_path_factory.mktemp("sweep")
    for s in range(3):
        write_dump(root / f"ippo-s{s}" / "trajectories.h5", config(map_dir, "ippo", s), censored=True)
    for s in range(2):
        write_dump(root / f"ippo8-s{s}" / "trajectories.h5", config(map_dir, "ippo", s, n_agents=8), censored=True)
        write_dump(root / "reled" / f"fb-s{s}" / "trajectories.h5", config(map_dir, "reled", s), sed=True,
                   censored=True)  # fmt: skip
        write_dump(root / "reled" / f"nofb-s{s}" / "trajectories.h5",
                   config(map_dir, "reled", s, feedback=False), sed=True, tt_offset=-20.0, censored=True)  # fmt: skip
    (root / "references.json").write_text(json.dumps(REFERENCES))
    return root


def kv_table(text: str) -> dict[str, str]:
    """The summary's 'field  value' lines as a dict (fields stripped of their indent)."""
    out = {}
    for line in text.splitlines():
        parts = re.split(r"\s{2,}", line.strip(), maxsplit=1)
        if len(parts) == 2:
            out[parts[0]] = parts[1]
    return out


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["analyze", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------------------- units
def test_mean_band_is_t_interval_on_common_grid():
    x1, x2 = np.array([0.0, 10.0, 20.0]), np.array([0.0, 5.0, 10.0, 15.0])
    band = mean_band([(x1, np.array([0.0, 10.0, 20.0])), (x2, np.array([2.0, 7.0, 12.0, 17.0]))], points=3)
    assert band is not None and band.n == 2
    assert band.x.tolist() == [0.0, 7.5, 15.0]  # the range both runs cover
    np.testing.assert_allclose(band.mean, [1.0, 8.5, 16.0])
    half = t_quantile(2) * np.std([0.0, 2.0], ddof=1) / math.sqrt(2)
    np.testing.assert_allclose(band.hi - band.mean, half)
    assert math.isclose(t_quantile(2), 12.7062, rel_tol=1e-4)


def test_ref_args():
    assert parse_ref_args(["shortest_path=299.9", "random.arrival_rate=0.4"]) == {
        "shortest_path": {"mean_travel_time": 299.9},
        "random": {"arrival_rate": 0.4},
    }
    with pytest.raises(Exception, match="POLICY=VALUE"):
        parse_ref_args(["shortest_path"])


def test_grouping_and_labels(sweep):
    runs, bad = load_runs(sorted(sweep.rglob("trajectories.h5")))
    assert not bad and len(runs) == 9
    labels = {g.label: len(g.runs) for g in group_runs(runs)}
    assert labels == {
        "ippo (agents=4)": 3,
        "ippo (agents=8)": 2,
        "reled (sed.feedback=False)": 2,
        "reled (sed.feedback=True)": 2,
    }


def test_dtw_recomputed_from_rows_matches_definition(tmp_path, map_dir):
    path = write_dump(tmp_path / "r.h5", config(map_dir, "reled", 0, n_agents=3), iterations=3, sed=True)
    assert map_scale(yaml.safe_load(yaml.safe_dump(config(map_dir, "reled", 0))))[0] == SCALE_M
    from analysis.load import open_dump

    with open_dump(path) as d:
        out = dtw_by_iteration(d, [0, 2], SCALE_M, KAPPA, 1, n_agents=5)  # 2 agents never decided: alpha 1
    np.testing.assert_allclose(out["dtw_mean"], SHIFT_M / SCALE_M, rtol=1e-6)
    np.testing.assert_allclose(out["alpha_mean"], (3 * math.exp(-KAPPA * SHIFT_M / SCALE_M) + 2) / 5, rtol=1e-6)


# ---------------------------------------------------------------------------- commands
def test_help_of_every_command(capsys):
    for cmd in ([], ["summary"], ["curves"], ["compare"], ["sed"], ["scaling"], ["report"]):
        with pytest.raises(SystemExit) as exc:
            main(["analyze", *cmd, "--help"])
        assert exc.value.code == 0
        assert "usage: reled-hpc analyze" in capsys.readouterr().out


def test_summary_table_and_json(sweep, capsys):
    run = sweep / "reled" / "fb-s1" / "trajectories.h5"
    rc, out, err = run_cli(capsys, "summary", run)
    assert rc == 0 and err == ""
    assert "reled (llm expert)" in out and "12 committed (0-11) of 12 configured" in out
    table = kv_table(out)
    assert table["mean travel time"] == "340.0 s"  # iterations 7-11: 600 - 30 * 9 + 10
    assert table["arrival rate"] == "75.0 %" and table["mean return"] == "-5.50"
    assert table["programs"] == "48 (36 executed, 75.0 %), 24 subset-cycles, 2.00 rounds each"
    assert table["RVI round 1 -> kept (mean)"] == "100.00 -> 30.00"
    # subset 1's revisions lowered the indices without new routes: not counted as improved
    assert table["revisions"] == (
        "24, 12 changed the routes; 12 of 24 revised subset-cycles kept new routes with a lower RVI or PDI than round 1"
    )
    assert table["PDI round 1 -> kept (max)"] == "1.000 -> 0.300 nats"
    assert table["tokens"] == "60,000 prompt, 7,200 completion"
    assert table["LLM latency"] == "1.5 s per request (mean)"
    rc, out, _ = run_cli(capsys, "summary", run.parent, "--json")  # a run folder works too
    s = json.loads(out)
    assert s["config"]["agents"] == 4 and s["config"]["seed"] == 1
    assert s["final"]["mean_travel_time"] == pytest.approx(340.0)
    assert s["final"]["arrival_rate"] == pytest.approx(np.mean([min(1.0, 0.3 + 0.05 * i) for i in range(7, 12)]))
    assert s["rows"]["agent"]["rows"] == N_IT * 4 * 5 and s["rows"]["agent"]["invalid_actions"] == 0
    assert s["rows"]["agent"]["return_last"] == pytest.approx(-0.5)  # 5 decisions of -0.1
    assert s["rows"]["expert"]["action_share"] == pytest.approx([0.4, 0.4, 0.2, 0.0])
    sed = s["sed"]
    assert sed["rvi_before_max"] == 100.0 and sed["rvi_after_max"] == 30.0
    assert sed["pdi_before_mean"] == pytest.approx(1.0) and sed["pdi_after_mean"] == pytest.approx(0.3)
    assert sed["llm_latency_mean_s"] == pytest.approx(1.5) and sed["execution_rate"] == 0.75
    assert s["wall_s"] == pytest.approx(24.0) and s["env_steps"] == 12000


def test_curves_png_and_svg(sweep, tmp_path, capsys):
    out = tmp_path / "c.png"
    rc, text, err = run_cli(capsys, "curves", *sorted(sweep.rglob("trajectories.h5")), "-o", out)
    assert rc == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "9 runs in 4 groups" in text
    svg = tmp_path / "c.svg"
    args = ["--x", "wall_s", "--metric", "mean_travel_time", "--ref", "shortest_path=420", "--title", "two seeds"]
    rc, text, _ = run_cli(capsys, "curves", sweep / "ippo-s0", sweep / "ippo-s1", "-o", svg, *args)
    body = svg.read_text()
    assert rc == 0 and "<svg" in body and "shortest_path (reference)" in body and "wall time (s)" in body
    assert "ippo (n=2)" in body  # references.json found 1 folder up, the grouping label from the config
    rc, _, err = run_cli(capsys, "curves", sweep / "ippo-s0", "-o", tmp_path / "c.txt")
    assert rc == 2 and "unsupported figure format '.txt'" in err
    rc, _, err = run_cli(capsys, "curves", sweep / "ippo-s0", "-o", svg, "--metric", "nope")
    assert rc == 2 and "no metric ['nope'] in these dumps" in err


def test_compare_markdown_csv_and_threshold(sweep, tmp_path, capsys):
    md, csv_path = tmp_path / "t.md", tmp_path / "t.csv"
    rc, out, _ = run_cli(capsys, "compare", sweep, "-o", md, "--csv", csv_path)
    assert rc == 0 and md.read_text() == out
    assert "| run group | seeds | final travel time (s) |" in out and "env steps to 400 s" in out
    assert "| ippo (agents=4) | 3 | 340.0 [330.0, 350.0] |" in out  # IQM [95% CI]: seeds' finals 330, 340, 350
    assert "| shortest_path (reference) | - | 400.0 |" in out
    rows = {r["label"]: r for r in csv.DictReader(io.StringIO(csv_path.read_text()))}
    ippo = rows["ippo (agents=4)"]
    # trailing 5-iteration mean of 600 - 30 i + 10 s first <= 400 at i = 9, 9, 10 (steps 1000 (i + 1))
    assert float(ippo["steps_to_threshold_mean"]) == pytest.approx(np.mean([10000, 10000, 11000]))
    assert float(ippo["steps_to_threshold_std"]) == pytest.approx(np.std([10000, 10000, 11000], ddof=1))
    assert ippo["reached"] == "3/3" and ippo["n_seeds"] == "3"
    assert float(ippo["mean_travel_time_mean"]) == 340.0 and float(ippo["mean_travel_time_std"]) == 10.0
    assert float(rows["reled (sed.feedback=False)"]["mean_travel_time_mean"]) == pytest.approx(335.0 - 20.0)
    assert rows["random (reference)"]["reference"] == "True"
    rc, out, _ = run_cli(capsys, "compare", sweep, "--threshold-travel-time", "100")
    assert "env steps to 100 s" in out and "| 0/3 |" in out


def test_compare_robust_statistics(sweep, tmp_path, capsys):
    csv_path = tmp_path / "t.csv"
    rc, out, _ = run_cli(capsys, "compare", sweep, "--csv", csv_path)
    assert rc == 0
    header = out.splitlines()[0]
    for col in ("P(reled (sed.feedback=False) better): travel time", "P(reled (sed.feedback=True) better): travel time",
                "env steps to 0.5 of random→due (540 s)", "reached 540 s"):  # fmt: skip
        assert f"| {col} |" in header, col
    assert "IQM over the group's seeds" in out and "lower is better" in out and "(700 s) to due (380 s)" in out
    rows = {r["label"]: r for r in csv.DictReader(io.StringIO(csv_path.read_text()))}
    ippo, nofb, fb = rows["ippo (agents=4)"], rows["reled (sed.feedback=False)"], rows["reled (sed.feedback=True)"]
    assert float(ippo["mean_travel_time_iqm"]) == 340.0
    lo, hi = float(ippo["mean_travel_time_iqm_lo"]), float(ippo["mean_travel_time_iqm_hi"])
    assert 330.0 <= lo < 340.0 < hi <= 350.0
    # finals (travel time): ippo 330, 340, 350; reled fb 330, 340; reled without feedback 310, 320
    p = "p_better[reled (sed.feedback=False)]_mean_travel_time"
    assert float(ippo[p]) == 1.0 and float(fb[p]) == 1.0 and nofb[p] == ""  # no row against itself
    assert float(ippo["p_better[reled (sed.feedback=True)]_mean_travel_time"]) == pytest.approx(4 / 6)
    assert float(nofb["p_better[reled (sed.feedback=True)]_mean_travel_time"]) == 0.0
    assert float(ippo["p_better[reled (sed.feedback=False)]_arrival_rate"]) == 0.5  # equal arrival rates
    # trailing 5-iteration mean 660 - 30 i + 10 s (- 20 without feedback) first <= 540 s at i = 4, 5, 5
    assert float(ippo["steps_to_level_iqm"]) == pytest.approx(np.mean([5000, 6000, 6000]))
    assert ippo["level_reached"] == "3/3" and float(nofb["steps_to_level_iqm"]) == 5000.0
    rc, again, _ = run_cli(capsys, "compare", sweep)
    assert again == out  # the bootstrap is seeded

    rc, out, _ = run_cli(capsys, "compare", sweep, "--focus", "ippo (agents=8)")
    assert "P(ippo (agents=8) better): travel time" in out and "P(reled" not in out
    rc, _, err = run_cli(capsys, "compare", sweep, "--focus", "nope")
    assert rc == 2 and "--focus 'nope': no group has that label or algorithm" in err


def test_compare_sample_efficiency_never_reached_and_fallback(sweep, tmp_path, capsys):
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps({"random": {"mean_time_censored": 700.0}, "due": {"mean_time_censored": 345.0}}))
    rc, out, _ = run_cli(capsys, "compare", sweep, "--references", refs, "--efficiency-fraction", "1")
    assert rc == 0 and "env steps to 1 of random→due (345 s)" in out
    # ippo seeds' last trailing means are 330, 340, 350 s: seed 2 never gets to 345 s, and with 3 seeds
    # nothing is trimmed, so the group's IQM is "never", not the mean of the two that did
    assert re.search(r"\| ippo \(agents=4\) \| 3 \| .* \| never \[12,000, ∞\] \| 2/3 \|", out), out
    assert re.search(r"\| reled \(sed.feedback=False\) \| 2 \| .* \| 11,500 \[11,000, 12,000\] \| 2/2 \|", out)
    refs.write_text(json.dumps({k: v for k, v in REFERENCES.items() if k != "due"}))
    rc, out, _ = run_cli(capsys, "compare", sweep, "--references", refs)
    assert "env steps to 0.5 of random→shortest_path (550 s)" in out
    assert "no due reference: sample efficiency measured towards shortest_path instead" in out
    refs.write_text(json.dumps({"shortest_path": REFERENCES["shortest_path"]}))
    rc, out, _ = run_cli(capsys, "compare", sweep, "--references", refs)
    assert "env steps to 0.5" not in out and "no random mean_time_censored in the references" in out


def test_compare_names_a_corrupt_run_and_tabulates_the_rest(sweep, tmp_path, capsys):
    root = tmp_path / "sw"
    shutil.copytree(sweep / "reled", root / "reled")
    bad = root / "broken" / "trajectories.h5"
    bad.parent.mkdir()
    bad.write_bytes(b"this is not an HDF5 file\n" * 100)
    rc, out, err = run_cli(capsys, "compare", root)
    assert rc == 0
    assert f"reled-hpc: warning: {bad}: not an HDF5 file" in err
    assert "| reled (sed.feedback=True) | 2 |" in out and "| reled (sed.feedback=False) | 2 |" in out
    assert f"Skipped (unreadable): {bad}: not an HDF5 file" in out


def test_sed_plot_and_recompute(sweep, tmp_path, map_dir, capsys):
    out = tmp_path / "sed.png"
    rc, text, err = run_cli(capsys, "sed", sweep / "reled" / "fb-s0", "-o", out)
    assert rc == 0 and out.stat().st_size > 10_000 and "48 programs" in text and "recomputed" not in text
    # alpha/DTW missing from the metrics: recomputed from the rows
    path = write_dump(tmp_path / "nohpo.h5", config(map_dir, "reled", 0), iterations=4, sed=True, hpo_metrics=False)
    rc, text, err = run_cli(capsys, "sed", path, "-o", tmp_path / "sed.svg")
    assert rc == 0 and "alpha/DTW of 4 iterations recomputed from the rows" in text
    rc, _, err = run_cli(capsys, "sed", sweep / "ippo-s0", "-o", tmp_path / "x.png")
    assert rc == 2 and "no SED/HPO data" in err


def test_scaling(sweep, tmp_path, capsys):
    out = tmp_path / "scaling.png"
    rc, text, err = run_cli(capsys, "scaling", sweep, "-o", out)
    assert rc == 0 and out.stat().st_size > 10_000
    assert "agent counts [4, 8]" in text and "3 groups" in text and err == ""
    # the table beside the figure (analysis/scaling.py; its values: test_analysis_scaling.py)
    md, csv_path = tmp_path / "t" / "scaling.md", tmp_path / "scaling.csv"
    rc, text, err = run_cli(capsys, "scaling", sweep, "-o", out, "--table", md, "--csv", csv_path)
    assert rc == 0, err
    table = md.read_text()
    assert table in text and "| run group | agents |" in table
    assert {ln.split(" | ")[1] for ln in table.splitlines() if ln.startswith("| ippo")} == {"4", "8"}
    n_rows = sum(ln.startswith("| ") for ln in table.splitlines()) - 2
    assert n_rows >= 4 and csv_path.read_text().count("\n") == 1 + n_rows


def test_report_is_self_contained(sweep, tmp_path, capsys):
    root = tmp_path / "sw"
    shutil.copytree(sweep, root)
    (root / "zz" / "trajectories.h5").parent.mkdir()
    (root / "zz" / "trajectories.h5").write_bytes(b"")
    out = tmp_path / "report.html"
    rc, _, err = run_cli(capsys, "report", root, "-o", out, "--max-sed-plots", "1")  # figures take time
    assert rc == 0 and "not an HDF5 file" in err
    page = out.read_text()
    for section in ("<h2>Comparison</h2>", "<h2>Learning curves</h2>", "<h2>Scaling</h2>", "<h2>SED / HPO</h2>",
                    "<h2>Problems</h2>", "shortest_path (reference)", "ippo (agents=8)"):  # fmt: skip
        assert section in page, section
    assert "P(reled (sed.feedback=True) better): travel time" in page and "IQM over the group&#x27;s seeds" in page
    assert page.count("data:image/png;base64,") == 2 + 1 + 1  # curves x2, scaling, 1 of the 4 reled runs
    assert "3 more runs with SED data not shown" in page
    # nothing external: no links, scripts or files beside the page
    assert "http://" not in page and "https://" not in page and "<script" not in page and "<link" not in page
    assert 'src="' not in page.replace('src="data:image/png;base64,', "")


# ---------------------------------------------------------------------------- damaged files
def test_truncated_dump_reports_the_readable_part(tmp_path, map_dir, capsys):
    full = write_dump(tmp_path / "full.h5", config(map_dir, "reled", 0, n_agents=50), iterations=30, steps=20,
                      sed=True)  # fmt: skip
    data = full.read_bytes()
    cut = tmp_path / "cut" / "trajectories.h5"
    cut.parent.mkdir()
    cut.write_bytes(data[: len(data) * 6 // 10])
    rc, out, err = run_cli(capsys, "summary", cut)
    assert rc == 0
    assert f"reled-hpc: warning: {cut}: the file is {len(data) * 6 // 10:,} bytes, its superblock records" in err
    assert "Analysed the readable part" in err and "rows past the damage are left out" in err
    original, salvaged = load_run(full), load_run(cut)
    n = salvaged.n_iterations
    assert n >= 1
    for k, v in salvaged.metrics.items():  # what is reported is the data, not zeros read past the end
        np.testing.assert_array_equal(v, original.metrics[k][:n])
    assert 0 < salvaged.rows["agent"] < original.rows["agent"]
    assert salvaged.rows["agent"] % (50 * 20) == 0  # whole iterations only
    rc, out, err = run_cli(capsys, "sed", cut, "-o", tmp_path / "cut.png")
    assert rc == 0 and "cut short" in err
    # almost nothing left: no iteration is made up from zeros
    tiny = tmp_path / "tiny.h5"
    tiny.write_bytes(data[:20_000])
    rc, out, err = run_cli(capsys, "summary", tiny, "--json")
    if rc == 0:
        assert json.loads(out)["iterations"]["committed"] == 0
    else:
        assert str(tiny) in err


KILLED_WRITER = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, sys.argv[2])
    from test_analysis import EXTRA, OBS_DIM, A_MAX, decision_rows
    from reled_hpc.io import TrajectoryWriter
    w = TrajectoryWriter(sys.argv[1], config_yaml="algorithm: ippo\\n", obs_dim=OBS_DIM, a_max=A_MAX,
                         extra_metrics=EXTRA)
    for it in range(6):
        w.append_rows("agent", decision_rows(it, 100, 30))
        if it < 5:
            w.end_iteration({"mean_travel_time": 100.0 + it})
    os._exit(0)  # as SIGKILL: no close, superblock still says "open for write"
    """
)


def test_killed_writer_then_cut_copy(tmp_path, cli):
    """A running job's dump copied half-way: 'open for write' flags and short. Must not hang (SWMR retries)."""
    path = tmp_path / "k" / "trajectories.h5"
    path.parent.mkdir()
    subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path), str(Path(__file__).parent)], check=True,
                   timeout=120)  # fmt: skip
    p = cli("analyze", "summary", str(path), "--json", timeout=60)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["iterations"]["committed"] == 5
    cut = tmp_path / "cut.h5"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size * 9 // 10])
    t0 = time.perf_counter()
    p = cli("analyze", "summary", str(cut), "--json", timeout=60)
    assert p.returncode == 0, p.stderr
    assert time.perf_counter() - t0 < 30 and "cut short" in p.stderr
    s = json.loads(p.stdout)
    assert s["iterations"]["committed"] <= 5
    assert s["rows"]["agent"]["rows"] < 5 * 3000 and s["rows"]["agent"]["rows"] % 3000 == 0  # whole iterations


def test_unfinished_iteration_is_named_and_ignored(tmp_path, map_dir, capsys):
    path = write_dump(tmp_path / "run" / "trajectories.h5", config(map_dir, "ippo", 0), iterations=3)
    with TrajectoryWriter(path, config_yaml="", obs_dim=OBS_DIM, a_max=A_MAX, extra_metrics=EXTRA, resume=True) as w:
        w.append_rows("agent", decision_rows(3, 500, 10))  # 5000 rows: whole chunks reach the file, no commit
    rc, out, err = run_cli(capsys, "summary", path.parent)
    assert rc == 0 and "3 committed (0-2)" in out
    assert f"reled-hpc: warning: {path}: ignoring rows of an unfinished iteration" in err
    assert f"'agent': {4096 - 60}" in err  # the rows up to the chunk boundary reached the file


def test_non_hdf5_and_missing_files(tmp_path, capsys):
    junk = tmp_path / "junk.h5"
    junk.write_text("hello")
    rc, _, err = run_cli(capsys, "summary", junk)
    assert rc == 2 and err.strip() == f"reled-hpc: error: {junk}: not an HDF5 file"
    rc, _, err = run_cli(capsys, "summary", tmp_path / "nope.h5")
    assert rc == 2 and "no such file" in err
    rc, _, err = run_cli(capsys, "compare", tmp_path)
    assert rc == 2 and "no trajectories.h5 found" in err


# ---------------------------------------------------------------------------- memory on a big dump
BIG_ITERATIONS, BIG_AGENTS, BIG_STEPS = 50, 1000, 60  # 3,000,000 agent rows
ROW_BYTES = 4 + 2 + 4 + 4 + 4 + OBS_DIM * 4 + 2 + A_MAX + 4 + 1 + 4 + 4 + 4 + 4  # 193 B per agent row
BIG_HPO_MISSING = 5  # iterations without alpha/DTW in the metrics: sed recomputes them from the rows

# Peak RSS of one command in a fresh interpreter. ru_maxrss would not do: Linux carries it over fork
# and exec, so the child starts at pytest's own peak. VmHWM belongs to the process's own memory map,
# and writing 5 to clear_refs resets it to the current RSS: peak - rss_before is the command's own.
MEASURE = textwrap.dedent(
    """
    import json, sys, time
    from reled_hpc.cli import main
    small, big, out = sys.argv[1:4]
    def status_mb(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    def measure(argv):
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before, t0 = status_mb("VmRSS"), time.perf_counter()
        assert main(argv) == 0
        return {"rise_mb": status_mb("VmHWM") - before, "peak_mb": status_mb("VmHWM"),
                "seconds": time.perf_counter() - t0}
    res = {}
    for cmd in ("summary", "sed"):
        extra = ["-o", out + "/" + cmd + ".png"] if cmd == "sed" else []
        measure(["analyze", cmd, small, *extra])  # warm-up: imports, fonts, the first figure
        res[cmd] = {"small": measure(["analyze", cmd, small, *extra]), "big": measure(["analyze", cmd, big, *extra])}
    print("RESULT " + json.dumps(res))
    """
)


def write_big_dump(path: Path, map_dir: Path) -> Path:
    cfg = config(map_dir, "reled", 0, n_agents=BIG_AGENTS)
    with TrajectoryWriter(path, config_yaml=yaml.safe_dump(cfg), obs_dim=OBS_DIM, a_max=A_MAX,
                          extra_metrics=EXTRA) as w:  # fmt: skip
        for it in range(BIG_ITERATIONS):
            for part in range(4):  # appended in chunks, as the learner does
                n = BIG_AGENTS // 4
                w.append_rows("agent", decision_rows(it, n, BIG_STEPS, agent0=part * n))
            w.append_rows("expert", decision_rows(it, BIG_AGENTS, 10, dx=SHIFT_M))
            w.append_programs([{"cycle": it, "subset": 0, "round": 1, "text": "x" * 500, "executed": True,
                                "rvi": 40.0, "pdi": 0.2}])  # fmt: skip
            hpo = it < BIG_ITERATIONS - BIG_HPO_MISSING
            w.end_iteration({"env_steps": 1e4 * (it + 1), "wall_s": 10.0 * (it + 1), "mean_travel_time": 500.0 - it,
                             "arrival_rate": 0.9, "mean_return": -1.0, "rvi_max": 40.0, "pdi_max": 0.2,
                             "external_change_max": 5.0, "alpha_mean": 0.8 if hpo else math.nan,
                             "dtw_mean": 0.05 if hpo else math.nan, "ranks": 1.0})  # fmt: skip
    return path


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peak RSS")
def test_summary_and_sed_memory_bounded_on_a_big_dump(tmp_path, map_dir):
    t0 = time.perf_counter()
    big = write_big_dump(tmp_path / "big.h5", map_dir)
    t_write = time.perf_counter() - t0
    small = write_dump(tmp_path / "small.h5", config(map_dir, "reled", 0), iterations=6, sed=True)
    rows = BIG_ITERATIONS * BIG_AGENTS * BIG_STEPS
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(small), str(big), str(tmp_path)], capture_output=True,
                          text=True, timeout=300, env=os.environ.copy())  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.split("RESULT ", 1)[1])
    raw_mb = rows * ROW_BYTES / 2**20
    figures = [
        f"{c}: peak RSS rise {r['big']['rise_mb']:.1f} MB on the big dump (peak {r['big']['peak_mb']:.0f} MB, "
        f"{r['big']['seconds']:.1f} s), {r['small']['rise_mb']:.1f} MB on a 240-row dump"
        for c, r in res.items()
    ]
    disk_mb = big.stat().st_size / 2**20
    print(
        f"\nbig dump: {rows:,} agent rows ({raw_mb:,.0f} MB raw, {disk_mb:.0f} MB on disk), written in {t_write:.1f} s"
    )
    print("\n".join(figures))
    # The agent rows are 3M x 193 B = 552 MB raw (obs alone 412 MB, x/y/agent_id/episode 46 MB): holding
    # a whole row column would show here; streaming 64k-row chunks costs a few MB.
    for cmd, r in res.items():
        assert r["big"]["rise_mb"] < r["small"]["rise_mb"] + 40, (cmd, r)


# ---------------------------------------------------------------------------- a real training run
def test_real_training_run_through_the_console_script(tmp_path, cli):
    runs = tmp_path / "runs"
    p = cli("train", "configs/ippo.yaml", "--name", "t", "--set", "iterations=2", "--set", "env.n_agents=4",
            "--set", "env.horizon_s=200", "--set", f"runs_dir={runs}", "--set", "tensorboard=false")  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    dump = runs / "t" / "trajectories.h5"
    assert dump.is_file()
    p = cli("analyze", "summary", str(dump))
    assert p.returncode == 0, p.stderr
    assert "ippo" in p.stdout and "2 committed (0-1) of 2 configured" in p.stdout and "helsinki" in p.stdout
    p = cli("analyze", "summary", str(dump), "--json")
    s = json.loads(p.stdout)
    assert s["config"]["agents"] == 4 and s["rows"]["agent"]["rows"] > 0 and s["sed"] is None
    png = tmp_path / "curves.png"
    p = cli("analyze", "curves", str(dump), "-o", str(png), "--ref", "shortest_path=150")
    assert p.returncode == 0, p.stderr
    assert png.read_bytes()[:4] == b"\x89PNG"
    html = tmp_path / "report.html"
    p = cli("analyze", "report", str(runs), "-o", str(html))
    assert p.returncode == 0, p.stderr
    page = html.read_text()
    assert "<h2>Comparison</h2>" in page and "data:image/png;base64," in page and "| ippo |" not in page
    assert "<td>ippo</td>" in page

"""The MPI runtime: per-iteration time split into rollout, expert, DTW, communication, update and
HDF5 write, bytes moved, memory per rank, and how iteration time grows with the agent count.

Each agent count runs `reled-hpc train` under `mpiexec -n R` for a few iterations of RELED (oracle
expert) on the shipped map; the first iteration is a warm-up and is left out of the averages.
On a 2-core machine R ranks share the cores: read overhead and growth, not speed-up.
`--learner central allreduce` runs every agent count with each update (`dist.learner`) in one
invocation, so the two are compared under the same machine load; `--repeats K` runs each config K
times in ABBA order and reports medians (rollouts are the same work under either update, so their
run-to-run spread is the machine's noise; `learner_part_s` = update + comm + write is what the update changes).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..dist.comm import mpiexec_command

PARTS = ("rollout_s", "expert_s", "dtw_s", "comm_s", "update_s", "write_s")


def run_one(ranks: int, agents: int, iterations: int, map_name: str, horizon: float, algorithm: str,
            learner: str = "auto", dump: str = "auto", traffic: str = "light",
            commit: str = "inline", scenario_period: int = 1,
            minibatch_per_rank: bool = False) -> dict[str, Any]:  # fmt: skip
    from ..experiment.run_dir import RunDir
    from ..io import TrajectoryReader

    with tempfile.TemporaryDirectory(prefix="reled_bench_dist_") as tmp:
        cfg = {
            "name": "bench", "algorithm": algorithm, "seed": 0, "iterations": iterations, "episodes_per_iteration": 1,
            "checkpoint_every": iterations, "runs_dir": tmp, "tensorboard": False,
            "env": {"map": map_name, "n_agents": agents, "traffic": traffic, "horizon_s": horizon,
                    "depart_window_s": min(120.0, horizon / 4)},
            "dist": {"total_agents": agents, "learner": learner, "dump": dump,
                     "async_commit": commit == "background"},
            "hpo": {"scenario_period": scenario_period},
            "ppo": {"minibatch_per_rank": minibatch_per_rank},
        }  # fmt: skip
        path = Path(tmp) / "bench.yaml"
        path.write_text(yaml.safe_dump(cfg))
        cli = ["train", str(path)]
        cmd = mpiexec_command(ranks, cli) if ranks > 1 else [sys.executable, "-m", "reled_hpc.cli", *cli]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True)
        total = time.perf_counter() - t0
        if res.returncode != 0:
            raise RuntimeError(f"benchmark run failed ({' '.join(cmd)}):\n{res.stderr[-3000:]}")
        with TrajectoryReader(RunDir(Path(tmp) / "bench").dump) as r:
            m = r.metrics()
    steady = slice(1, None) if len(m["iteration"]) > 1 else slice(0, None)
    wall = np.diff(np.r_[0.0, m["wall_s"]])[steady]
    parts = {k: float(np.mean(m[k][steady])) for k in PARTS}
    iter_s = float(np.mean(wall))
    return {
        "ranks": ranks,
        "learner": learner,
        "dump": dump,
        "commit": commit,
        "scenario_period": scenario_period,
        "minibatch_per_rank": minibatch_per_rank,
        "agents": agents,
        "agents_per_rank": agents / ranks,
        "iteration_s": round(iter_s, 3),
        **{k: round(v, 4) for k, v in parts.items()},
        "share": {k.removesuffix("_s"): round(v / iter_s, 4) for k, v in parts.items()},
        "comm_bytes_per_iteration": int(np.mean(m["comm_bytes"][steady])),
        "decisions_per_iteration": int(np.mean(m["decisions"][steady])),
        "env_steps_per_iteration": int(np.mean(np.diff(np.r_[0.0, m["env_steps"]])[steady])),
        "peak_rss_mb_per_rank": round(float(np.max(m["rss_mb_max"])), 1),
        "peak_rss_mb_rank0": round(float(np.max(m["rss_mb_rank0"])), 1),
        # per-rank data rank 0 received in gathers (rows, alphas, row counts); metric reductions apart
        "root_gather_bytes_per_iteration": int(np.mean(m["root_gather_bytes"][steady])),
        "process_wall_s": round(total, 1),
    }


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One config's runs: the first run's fields with every time the median over the runs, and the
    per-run iteration times and learner-dependent times (update + comm + write) beside them."""
    out = dict(runs[0])
    learner_part = [r["update_s"] + r["comm_s"] + r["write_s"] for r in runs]
    out["learner_part_s"] = round(float(np.median(learner_part)), 4)
    if len(runs) > 1:
        for k in ("iteration_s", *PARTS):
            out[k] = round(float(np.median([r[k] for r in runs])), 4)
        out["share"] = {k.removesuffix("_s"): round(out[k] / out["iteration_s"], 4) for k in PARTS}
        out["iteration_s_runs"] = [r["iteration_s"] for r in runs]
        out["learner_part_s_runs"] = [round(v, 4) for v in learner_part]
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ranks", type=int, nargs="+", default=[2], help="rank counts; several: one run each")
    p.add_argument("--agents", type=int, nargs="+", default=[100, 500, 1000], help="total agents, split over ranks")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--map", default="helsinki")
    p.add_argument("--horizon", type=float, default=300.0, help="episode horizon (simulated s)")
    p.add_argument("--traffic", default="light", choices=["none", "light", "medium", "heavy"])
    p.add_argument("--per-rank", action="store_true", help="--agents are per rank (total = agents x ranks)")
    p.add_argument(
        "--commit",
        nargs="+",
        default=["inline"],
        choices=["background", "inline"],
        help="dist.async_commit on (background) or off (inline); several: each config runs with each",
    )
    p.add_argument("--scenario-period", type=int, default=1, help="hpo.scenario_period of the runs")
    p.add_argument("--dump", nargs="+", default=["auto"], choices=["auto", "single", "sharded"],
                   help="dist.dump of the runs; several: each agent count runs with each")  # fmt: skip
    p.add_argument("--algorithm", default="reled", choices=["ippo", "mappo", "qmix", "reled"])
    p.add_argument("--learner", nargs="+", default=["auto"], choices=["auto", "central", "allreduce"],
                   help="dist.learner of the runs; several: each agent count runs with each, alternating")  # fmt: skip
    p.add_argument(
        "--minibatch-per-rank",
        action="store_true",
        help="ppo.minibatch_per_rank: R x minibatch rows per step, for either update (the same steps)",
    )
    p.add_argument("--repeats", type=int, default=1,
                   help="run every config this many times, the order reversed every other round (ABBA); "
                        "comparisons use the median of each config's runs")  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    # alternate the updates per agent count, so slow drift of the machine's load hits both alike
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    configs = [(r, n * r if args.per_rank else n, learner, dump, commit)
               for r in args.ranks for n in args.agents for learner in args.learner for dump in args.dump
               for commit in args.commit]  # fmt: skip
    runs: dict[tuple, list[dict[str, Any]]] = {c: [] for c in configs}
    for k in range(args.repeats):
        for c in configs if k % 2 == 0 else configs[::-1]:
            r, n, learner, dump, commit = c
            runs[c].append(run_one(r, n, args.iterations, args.map, args.horizon, args.algorithm, learner, dump,
                                   args.traffic, commit, args.scenario_period, args.minibatch_per_rank))  # fmt: skip
            print(
                f"bench dist: {learner}/{dump}/{commit} R={r} agents={n} round {k + 1}/{args.repeats}: "
                f"{runs[c][-1]['iteration_s']} s per iteration",
                file=sys.stderr,
                flush=True,
            )
    results = [_median_run(runs[c]) for c in configs]
    out: dict[str, Any] = {"bench": "dist", "ranks": args.ranks, "map": args.map, "horizon_s": args.horizon,
                           "algorithm": args.algorithm, "learners": args.learner, "dumps": args.dump,
                           "traffic": args.traffic, "results": results}  # fmt: skip
    if len(args.learner) > 1:
        keys = ("iteration_s", "update_s", "comm_s", "learner_part_s", "comm_bytes_per_iteration")
        groups: dict[tuple[int, int, str], dict[str, Any]] = {}
        for r in results:
            row = groups.setdefault((r["ranks"], r["agents"], r["dump"]),
                                    {"ranks": r["ranks"], "agents": r["agents"], "dump": r["dump"]})  # fmt: skip
            row.update({f"{r['learner']}_{k}": r[k] for k in keys})
        out["learner_comparison"] = list(groups.values())
    if len(args.commit) > 1:
        out["commit_comparison"] = [
            {k: r[k] for k in ("ranks", "agents", "learner", "dump", "commit", "iteration_s", "write_s")}
            for r in results
        ]
    if len(args.ranks) > 1:
        # what rank 0 carries as ranks are added (same agents per rank with --per-rank)
        keys = ("peak_rss_mb_rank0", "root_gather_bytes_per_iteration", "iteration_s")
        out["rank_scaling"] = [{k: r[k] for k in ("ranks", "agents", "learner", "dump", *keys)} for r in results]
    base = (args.learner[0], args.dump[0], args.commit[0])
    first = [r for r in results if (r["learner"], r["dump"], r["commit"]) == base]
    if len(first) > 1 and len(args.ranks) == 1:
        a0, a1 = first[0], first[-1]
        out["growth"] = {
            "agents_factor": a1["agents"] / a0["agents"],
            "iteration_time_factor": round(a1["iteration_s"] / a0["iteration_s"], 2),
            "comm_bytes_factor": round(a1["comm_bytes_per_iteration"] / max(a0["comm_bytes_per_iteration"], 1), 2),
            # marginal memory: what one more agent costs a rank (the baseline is torch + SUMO)
            "rss_kb_per_added_agent_per_rank": round(
                (a1["peak_rss_mb_per_rank"] - a0["peak_rss_mb_per_rank"])
                * 1024
                / max(a1["agents_per_rank"] - a0["agents_per_rank"], 1),
                1,
            ),
        }
    return out

"""Learner throughput: update samples/s per algorithm, DTW pairs/s, and where an iteration's time goes.

One real rollout per agent count (Helsinki, the current policy, plus the oracle expert's episode
for RELED) feeds every measurement, so the batch sizes are those of a real iteration.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..experiment.config import HPOConfig
from ..expert.oracle import OracleExpert
from ..learn.config import PPOConfig, QMIXConfig
from ..learn.hpo import agent_alphas
from ..learn.ppo import PPOLearner
from ..learn.qmix import QMIXLearner
from ..learn.rollout import collect_episode
from ..sim.env import EnvConfig, NavigationEnv


def _write_rows(path: Path, batch: dict[str, np.ndarray], expert: dict[str, np.ndarray], cfg: EnvConfig) -> float:
    from ..experiment.metrics import EXTRA_METRIC_INFO, EXTRA_METRICS, dump_rows
    from ..io import TrajectoryWriter

    t0 = time.perf_counter()
    with TrajectoryWriter(path, config_yaml="bench: true\n", obs_dim=cfg.obs_dim, a_max=cfg.a_max,
                          extra_metrics=EXTRA_METRICS, metric_info=EXTRA_METRIC_INFO,
                          obs_features=cfg.obs_features) as w:  # fmt: skip
        w.append_rows("agent", dump_rows(batch, 0))
        w.append_rows("expert", dump_rows(expert, 0))
        w.end_iteration({"iteration": 0.0})
    return time.perf_counter() - t0


def bench_agents(n_agents: int, map_name: str, horizon: float, seed: int) -> dict[str, Any]:
    cfg = EnvConfig(map=map_name, n_agents=n_agents, traffic="light", horizon_s=horizon, seed=seed)
    g_dim = len(NavigationEnv.GLOBAL_FEATURES)
    out: dict[str, Any] = {"agents": n_agents}
    with NavigationEnv(cfg) as env:
        ppo = PPOLearner(cfg.a_max, g_dim, PPOConfig(), seed=seed)
        t0 = time.perf_counter()
        batch, _ = collect_episode(env, ppo.actor(), seed, 0)
        rollout_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        expert, _ = OracleExpert().demonstrate(env, seed, 0)
        expert_s = time.perf_counter() - t0
        scale = env.graph.scale
    n = len(batch["action"])
    t0 = time.perf_counter()
    alpha, dtw = agent_alphas(batch, expert, n_agents, scale, kappa=HPOConfig.kappa)
    dtw_s = time.perf_counter() - t0
    pairs = int(np.isfinite(dtw).sum())
    with tempfile.TemporaryDirectory() as tmp:
        write_s = _write_rows(Path(tmp) / "b.h5", batch, expert, cfg)
    updates: dict[str, dict[str, float]] = {}
    PPOLearner(cfg.a_max, g_dim, PPOConfig(), seed=seed).update(batch)  # warm-up: torch's first-call costs
    for algo in ("ippo", "mappo", "reled", "qmix"):
        if algo == "qmix":
            learner: Any = QMIXLearner(cfg.a_max, g_dim, QMIXConfig(), seed=seed)
        else:
            learner = PPOLearner(cfg.a_max, g_dim, PPOConfig(), central=algo == "mappo", seed=seed)
        t0 = time.perf_counter()
        if algo == "reled":
            learner.update(batch, expert, alpha, n_agents)
        else:
            learner.update(batch)
        dt = time.perf_counter() - t0
        # samples/s counts each decision row once per update call (PPO: epochs passes; QMIX: replayed groups)
        updates[algo] = {"update_s": round(dt, 3), "samples_per_s": round(n / dt, 1)}
    reled_update = updates["reled"]["update_s"]
    total = rollout_s + expert_s + dtw_s + reled_update + write_s
    out.update(
        decisions=n,
        expert_decisions=len(expert["action"]),
        rollout_s=round(rollout_s, 3),
        expert_rollout_s=round(expert_s, 3),
        dtw_pairs=pairs,
        dtw_s=round(dtw_s, 4),
        dtw_pairs_per_s=round(pairs / dtw_s, 1) if dtw_s > 0 else None,
        hdf5_write_s=round(write_s, 4),
        hdf5_rows_per_s=round((n + len(expert["action"])) / write_s, 1),
        updates=updates,
        reled_iteration_share={
            "rollout": round(rollout_s / total, 3),
            "expert_rollout": round(expert_s / total, 3),
            "dtw": round(dtw_s / total, 4),
            "update": round(reled_update / total, 3),
            "hdf5_write": round(write_s / total, 4),
        },
    )
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--agents", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--map", default="helsinki")
    p.add_argument("--horizon", type=float, default=600.0, help="episode horizon of the rollout (simulated s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (training uses 1 by default; 0: torch's)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    return {
        "bench": "learner",
        "map": args.map,
        "horizon_s": args.horizon,
        "torch_threads": torch.get_num_threads(),
        "results": [bench_agents(n, args.map, args.horizon, args.seed) for n in args.agents],
    }

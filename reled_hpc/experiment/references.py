"""Reference policies (shortest path, random, ...) on a run's own scenarios: the reference points of
its learning curve, on exactly the traffic the final policy faces, and of its held-out evaluation."""

from __future__ import annotations

import dataclasses

import numpy as np

from ..finite import finite_mean
from ..sim.env import NavigationEnv
from ..sim.policies import make_policy, run_episode
from .config import TrainConfig, agent_counts
from .seeds import eval_seed, scenario_seed

REFERENCE_METRICS = ("mean_travel_time", "arrival_rate", "mean_return", "mean_time_censored")


def reference_travel_time(cfg: TrainConfig, policy: str, last: int = 5, ranks: int = 1) -> dict[str, float]:
    """A reference policy's metrics on the scenarios the run's last `last` iterations see on every
    rank (the same traffic the final policy faces), averaged."""
    its = range(max(cfg.iterations - last, 0), cfg.iterations)
    ms = []
    for rank, n in enumerate(agent_counts(cfg, ranks)):
        seeds = sorted({scenario_seed(cfg, it, k, rank) for it in its for k in range(cfg.episodes_per_iteration)})
        with NavigationEnv(dataclasses.replace(cfg.env, n_agents=n)) as env:
            ms += [run_episode(env, make_policy(policy, env, cfg.seed), seed=s) for s in seeds]
    return {k: finite_mean(np.array([m[k] for m in ms], np.float64)) for k in REFERENCE_METRICS}  # NaN: nobody arrived


def reference_eval(cfg: TrainConfig, policy: str, ranks: int = 1) -> dict[str, float]:
    """A reference policy's metrics on the run's held-out evaluation scenarios (`eval.episodes` per rank,
    `seeds.eval_seed`), as `eval_<metric>`: the held-out evaluation's reference points."""
    ms = []
    for rank, n in enumerate(agent_counts(cfg, ranks)):
        with NavigationEnv(dataclasses.replace(cfg.env, n_agents=n)) as env:
            ms += [run_episode(env, make_policy(policy, env, cfg.seed), seed=eval_seed(cfg, rank, k))
                   for k in range(cfg.eval.episodes)]  # fmt: skip
    return {f"eval_{k}": finite_mean(np.array([m[k] for m in ms], np.float64)) for k in REFERENCE_METRICS}

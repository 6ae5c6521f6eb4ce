"""Held-out evaluation: the greedy policy on traffic scenarios training never sees.

Every `eval.every` iterations, and at the last one, each rank drives `eval.episodes` fixed held-out
scenarios (`seeds.eval_seed`: a seed stream of their own, the same at every evaluation and for every
algorithm run with one seed and rank count) with the greedy policy, without dumping or learning from
them. Travel time counts every agent: `eval_time_censored` charges an agent that has not arrived its
time until the episode's end (so a policy cannot look fast by losing agents), `eval_travel_time` is
the mean over arrived agents, shown next to `eval_arrival_rate`. `reled-hpc references` runs the
reference policies on the same scenarios (`experiment/references.py`).
"""

from __future__ import annotations

import numpy as np

from ..learn.rollout import collect_episode
from ..sim.env import NavigationEnv
from ..sim.policies import Actor

EVAL_METRICS = ("eval_time_censored", "eval_travel_time", "eval_arrival_rate", "eval_return")
# env.metrics() key of each evaluation metric
_SOURCE = {"eval_time_censored": "mean_time_censored", "eval_travel_time": "mean_travel_time",
           "eval_arrival_rate": "arrival_rate", "eval_return": "mean_return"}  # fmt: skip


def evaluation_due(every: int, iteration: int, iterations: int) -> bool:
    """Evaluate at iterations 0, every, 2 * every, ... and at the run's last iteration (every > 0)."""
    return every > 0 and (iteration % every == 0 or iteration == iterations - 1)


def evaluate(env: NavigationEnv, greedy: Actor, seeds: list[int]) -> dict[str, float]:
    """The mean of each EVAL_METRICS over the held-out scenarios `seeds`, driven with `greedy`
    (episode -1: nothing of it is dumped; greedy actors draw no random numbers, so training is unchanged)."""
    rows = [collect_episode(env, greedy, seed, -1)[1] for seed in seeds]
    out = {}
    for name, key in _SOURCE.items():
        v = np.array([m[key] for m in rows], np.float64)
        v = v[np.isfinite(v)]  # mean_travel_time is NaN in an episode where nobody arrived
        out[name] = float(v.mean()) if v.size else float("nan")
    return out

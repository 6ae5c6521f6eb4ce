"""Reference policies (no learning): random, shortest_path (static lengths), fastest_path (live
travel times). They act through the same env API as learners, are the reference points of every
learning curve, and are the oracle experts of HPO."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from .env import NavigationEnv

REFERENCE_POLICIES = ("random", "shortest_path", "fastest_path")


class Policy(Protocol):
    def act(
        self, env: NavigationEnv, obs: dict[str, np.ndarray], infos: dict[str, dict[str, Any]]
    ) -> dict[str, int]: ...


def deciding(obs: dict[str, np.ndarray], infos: dict[str, dict[str, Any]]) -> list[str]:
    """Agents in a step's output that need an action (ended agents carry an all-False mask)."""
    return [a for a in obs if infos[a]["action_mask"].any()]


class RandomPolicy:
    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def act(self, env, obs, infos):
        return {a: int(self.rng.choice(np.flatnonzero(infos[a]["action_mask"]))) for a in deciding(obs, infos)}


class ShortestPathPolicy:
    def act(self, env, obs, infos):
        return {a: env.shortest_choice(a) for a in deciding(obs, infos)}


class FastestPathPolicy:
    def act(self, env, obs, infos):
        return {a: env.fastest_choice(a) for a in deciding(obs, infos)}


def make_policy(name: str, seed: int = 0) -> Policy:
    if name == "random":
        return RandomPolicy(seed)
    if name == "shortest_path":
        return ShortestPathPolicy()
    if name == "fastest_path":
        return FastestPathPolicy()
    raise ValueError(f"unknown reference policy {name!r} (one of {', '.join(REFERENCE_POLICIES)})")


def run_episode(
    env: NavigationEnv, policy: Policy, seed: int | None = None, max_sim_steps: int | None = None, progress=None
) -> dict[str, float]:
    """Run one episode (or until `max_sim_steps`), return env.metrics(). `progress(env)` is called per step."""
    obs, infos = env.reset(seed=seed)
    while not env.done:
        if max_sim_steps is not None and env.sim_steps >= max_sim_steps:
            break
        obs, _, _, _, infos = env.step(policy.act(env, obs, infos))
        if progress is not None:
            progress(env)
    return env.metrics()

"""Oracle experts: the reference routing policies driven in SUMO on the agents' own scenario."""

from __future__ import annotations

from typing import Any

from ..learn.rollout import Batch, collect_episode
from ..sim.env import NavigationEnv
from ..sim.policies import make_policy
from .base import PolicyLogProbs

ORACLE_POLICIES = ("shortest_path", "fastest_path")


class OracleExpert:
    """Drives `policy` through the env from the same start state (same seed). Results are cached
    per seed, so an expert episode is paid once per scenario. The policy plays no part."""

    policy_dependent = False

    def __init__(self, policy: str = "shortest_path", cache_size: int = 8) -> None:
        if policy not in ORACLE_POLICIES:
            raise ValueError(f"unknown oracle policy {policy!r} (one of {', '.join(ORACLE_POLICIES)})")
        self.policy = policy
        self.name = f"oracle:{policy}"
        self._cache: dict[int, tuple[Batch, dict[str, Any]]] = {}
        self._cache_size = cache_size

    def set_policy(self, policy_log_probs: PolicyLogProbs | None) -> None:
        pass  # a reference route does not depend on the learner

    def demonstrate(self, env: NavigationEnv, seed: int, episode: int) -> tuple[Batch, dict[str, Any]]:
        hit = self._cache.get(seed)
        if hit is None:
            batch, metrics = collect_episode(env, make_policy(self.policy, env), seed, episode)
            hit = (
                batch,
                {"expert_travel_time": metrics["mean_travel_time"], "expert_arrival": metrics["arrival_rate"]},
            )
            if len(self._cache) >= self._cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[seed] = hit
        batch, stats = hit
        out = dict(batch)
        out["episode"] = out["episode"].copy()
        out["episode"][:] = episode
        return out, stats

"""Interaction probe: how much the agents' worlds depend on each other, measured during training for
any algorithm (SED measures it only for its own subsets).

Every `probe.every` iterations each rank drives one fixed probe scenario twice with the current
greedy policy: once as is, and once with a fixed random subset of its agents switched to a reference
policy (`probe.switch_to`). From the two runs:
- `probe_external_change`: |change of the mean return of the agents outside the subset| in RVI's
  units (r_max / (1 - gamma)), as SED's `external_change_max`;
- `probe_external_tt_change`: the same change as a share of their mean travel time (every agent
  counted, unfinished ones until the episode's end), well defined where returns are near 0;
- `route_churn`: the share of agents whose greedy route on the probe scenario differs from the
  previous probe's (NaN at the first probe): how much the policy, and so every agent's world, moved.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..expert.indices import measured_external_change
from ..learn.rollout import collect_episode
from ..sim.env import NavigationEnv
from ..sim.policies import Actor, make_policy

PROBE_METRICS = ("probe_external_change", "probe_external_tt_change", "route_churn")


class SubsetActor:
    """`base` for every agent but those in `subset`, which act on `other` (both see every row)."""

    def __init__(self, env: NavigationEnv, base: Actor, other: Actor, subset: set[str]) -> None:
        self.env, self.base, self.other, self.subset = env, base, other, subset

    def __call__(self, obs: np.ndarray, mask: np.ndarray, gstate: np.ndarray):
        acts, logp, value = self.base(obs, mask, gstate)
        sel = np.array([a in self.subset for a in self.env.deciding_agents], bool)
        if sel.any():
            alt, _, _ = self.other(obs, mask, gstate)
            acts = np.where(sel, alt, acts)
        return acts, logp, value


@dataclass
class InteractionProbe:
    """One rank's probe: a fixed scenario and subset, and the routes of the last probe."""

    scenario_seed: int
    subset_share: float
    switch_to: str
    rng_seed: int
    last_routes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def run(self, env: NavigationEnv, greedy: Actor, gamma: float, episode: int) -> dict[str, float]:
        """The probe's metrics (PROBE_METRICS) for the current greedy policy."""
        order = list(env.possible_agents)
        k = max(1, round(self.subset_share * len(order)))
        subset = set(np.random.default_rng(self.rng_seed).choice(order, size=min(k, len(order)), replace=False))
        base_ret, base_tt, routes = self._drive(env, greedy, episode)
        switched = SubsetActor(env, greedy, make_policy(self.switch_to, env, self.rng_seed), subset)
        sw_ret, sw_tt, _ = self._drive(env, switched, episode)
        outside = np.array([a not in subset for a in order])
        scale = env.config.reward_bound / (1.0 - gamma)
        change = measured_external_change(base_ret, sw_ret, outside, scale)
        tt0 = float(base_tt[outside].mean()) if outside.any() else float("nan")
        tt_change = abs(float(sw_tt[outside].mean()) - tt0) / tt0 if outside.any() and tt0 > 0 else float("nan")
        churn = float("nan")
        if self.last_routes:
            churn = float(np.mean([routes[a] != self.last_routes.get(a) for a in order]))
        self.last_routes = routes
        return {"probe_external_change": change.normalised, "probe_external_tt_change": tt_change,
                "route_churn": churn}  # fmt: skip

    def _drive(self, env: NavigationEnv, actor: Actor, episode: int):
        collect_episode(env, actor, self.scenario_seed, episode)
        sts = [env.agents_state[a] for a in env.possible_agents]
        ret = np.array([s.ret for s in sts])
        tt = np.array([(s.end_time if s.end_time is not None else env.time) - s.trip.depart for s in sts])
        return ret, tt, {s.vid: tuple(s.plan) for s in sts}

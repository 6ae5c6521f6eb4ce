"""Does routing matter, and do agents interact? Free-flow vs dynamic user equilibrium on a scenario.

Per (map, demand, agents), on one scenario (seed): the agents' mean travel time under free-flow
(all-or-nothing) routing and under SUMO's dynamic user equilibrium (duaIterate), both driven in the
env; `due_gain` = 1 - due / free_flow; and how much the other agents' mean return and travel time
move when a random subset switches from its free-flow to its equilibrium routes. Travel times count
every agent (an unfinished one until the episode's end: `mean_time_censored`); arrival rates beside.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from ..experiment.probe import SubsetActor
from ..learn.rollout import collect_episode
from ..sim.demand import scenario_trips
from ..sim.env import EnvConfig, NavigationEnv
from ..sim.policies import EquilibriumPlanner, RouteActor, free_flow_routes

# (label, map, demand section, agents, env overrides); ingolstadt drives its own 1,035 URB trips
CASES: dict[str, tuple[str, dict[str, Any], int, dict[str, Any]]] = {
    "helsinki-commute-100": ("helsinki", {"kind": "commute"}, 100, {}),
    "helsinki-commute-500": ("helsinki", {"kind": "commute"}, 500, {}),
    # URB's trips depart over 30 min: a horizon that lets the last ones arrive
    "ingolstadt-urb": (
        "ingolstadt",
        {"kind": "file", "file": "@ingolstadt", "agents": "all"},
        1035,
        {"horizon_s": 3600.0},
    ),
}


def _demand(section: dict[str, Any]) -> dict[str, Any]:
    if section.get("file") == "@ingolstadt":  # the shipped URB demand, wherever the package lies
        from ..sim.maps import shipped_dir

        section = {**section, "file": str(shipped_dir("ingolstadt") / "agents.csv")}
    return section


def _drive(env: NavigationEnv, actor: Any, seed: int) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    _, m = collect_episode(env, actor, seed, 0)
    sts = [env.agents_state[a] for a in env.possible_agents]
    ret = np.array([s.ret for s in sts])
    tt = np.array([(s.end_time if s.end_time is not None else env.time) - s.trip.depart for s in sts])
    return m, ret, tt


def bench_case(label: str, seed: int, iterations: int, subset_share: float, traffic: str) -> dict[str, Any]:
    map_name, demand, agents, extra = CASES[label]
    from ..config import from_dict

    env = {"map": map_name, "n_agents": agents, "traffic": traffic, "seed": seed, "demand": _demand(demand), **extra}
    cfg = from_dict(EnvConfig, env, f"bench scenario {label}")
    with NavigationEnv(cfg) as env:
        t0 = time.perf_counter()
        agent_trips, bg_trips = scenario_trips(env.graph, cfg, seed)
        demand_s = time.perf_counter() - t0
        free = RouteActor(env, free_flow_routes, fallback="free_flow")
        m_free, ret_free, tt_free = _drive(env, free, seed)
        planner = EquilibriumPlanner(iterations)
        m_due, _, _ = _drive(env, RouteActor(env, planner, fallback="fastest_path"), seed)
        a = planner.last
        assert a is not None
        order = list(env.possible_agents)
        k = max(1, round(subset_share * len(order)))
        subset = set(np.random.default_rng(seed).choice(order, size=k, replace=False).tolist())
        switched = SubsetActor(env, RouteActor(env, free_flow_routes, fallback="free_flow"),
                               RouteActor(env, planner, fallback="fastest_path"), subset)  # fmt: skip
        _, ret_sw, tt_sw = _drive(env, switched, seed)
    out = np.array([x not in subset for x in order])
    r0, t0_ = float(ret_free[out].mean()), float(tt_free[out].mean())
    return {
        "label": label,
        "map": map_name,
        "demand": demand["kind"],
        "agents": agents,
        "background_vehicles": len(bg_trips),
        "seed": seed,
        "free_flow_travel_time_s": round(m_free["mean_time_censored"], 1),
        "free_flow_arrival_rate": m_free["arrival_rate"],
        "due_travel_time_s": round(m_due["mean_time_censored"], 1),
        "due_arrival_rate": m_due["arrival_rate"],
        "due_gain": round(1.0 - m_due["mean_time_censored"] / m_free["mean_time_censored"], 4),
        "subset": k,
        # |change of the others' mean return| / |their mean return|, and the same for travel time
        "external_return_change": round(abs(float(ret_sw[out].mean()) - r0) / abs(r0), 4) if r0 else None,
        "external_travel_time_change": round(abs(float(tt_sw[out].mean()) - t0_) / t0_, 4),
        "due_wall_s": round(a.wall_s, 1),
        "due_iterations": a.iterations,
        "due_relative_gap": round(a.relative_gap, 4),
        "due_cached": a.cached,
        "demand_s": round(demand_s, 3),
        "agent_trips": len(agent_trips),
    }


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--case", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, default=20, help="duaIterate steps")
    p.add_argument("--subset-share", type=float, default=0.2, help="share of agents that switch to DUE routes")
    p.add_argument("--traffic", default="light", choices=["none", "light", "medium", "heavy"])


def run(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "bench": "scenario",
        "results": [bench_case(c, args.seed, args.iterations, args.subset_share, args.traffic) for c in args.case],
    }

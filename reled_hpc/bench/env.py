"""Environment throughput: the controlled env against plain libsumo on the same demand."""

from __future__ import annotations

import argparse
import resource
import time
from typing import Any

from ..sim.env import EnvConfig, NavigationEnv
from ..sim.policies import actions, make_policy


def _raw_run(env: NavigationEnv, steps: int) -> tuple[float, float, int]:
    """Same map, background and agent trips, agents on fixed shortest-path routes, no control."""
    import libsumo

    env.reset(seed=env.seed_used)  # regenerates the identical demand in a fresh simulation
    g = env.graph
    for aid, st in env.agents_state.items():
        libsumo.route.add(f"raw_{aid}", [g.edge_ids[e] for e in g.route(st.trip.origin, st.trip.dest)])
        libsumo.vehicle.add(
            f"raw{aid}",
            f"raw_{aid}",
            typeID="agent",
            depart=f"{st.trip.depart:.1f}",
            departLane="best",
            departSpeed="max",
        )
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    for _ in range(steps):
        libsumo.simulationStep()
        n += 1
        if libsumo.simulation.getMinExpectedNumber() == 0:
            break
    return time.perf_counter() - t0, time.process_time() - c0, n


def _controlled_run(env: NavigationEnv, steps: int, seed: int) -> tuple[float, float, dict[str, Any]]:
    policy = make_policy("shortest_path", env)
    obs, infos = env.reset(seed=seed)
    t0, c0 = time.perf_counter(), time.process_time()
    while not env.done and env.sim_steps < steps:
        obs, _, _, _, infos = env.step(actions(policy, env, obs, infos))
    return time.perf_counter() - t0, time.process_time() - c0, env.metrics()


def bench_env(map_name: str, agents: int, steps: int, traffic: str, seed: int, repeats: int = 3) -> dict[str, Any]:
    """Controlled and raw runs alternate `repeats` times; the fastest of each is kept (this VM is noisy).
    The `_cpu` fields use this process's CPU time, which other processes' load disturbs less than wall time."""
    cfg = EnvConfig(
        map=map_name,
        n_agents=agents,
        traffic=traffic,
        seed=seed,
        horizon_s=float(max(steps, 1)),
        depart_window_s=min(60.0, steps / 4),
    )
    ctrl, raw, ctrl_cpu, raw_cpu = [], [], [], []
    with NavigationEnv(cfg) as env:
        for _ in range(repeats):
            wall, cpu, metrics = _controlled_run(env, steps, seed)
            sim_steps = env.sim_steps
            ctrl.append(wall)
            ctrl_cpu.append(cpu)
            raw_wall, cpu, raw_steps = _raw_run(env, sim_steps)  # exactly as many simulated seconds
            raw.append(raw_wall)
            raw_cpu.append(cpu)
    ctrl_wall, raw_wall = min(ctrl), min(raw)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {
        "bench": "env",
        "map": map_name,
        "agents": agents,
        "traffic": traffic,
        "background_vehicles": metrics["bg_vehicles"],
        "repeats": repeats,
        "sim_steps": sim_steps,
        "decisions": metrics["decisions"],
        "controlled_wall_s": round(ctrl_wall, 3),
        "controlled_wall_s_all": [round(w, 3) for w in ctrl],
        "decisions_per_s": round(metrics["decisions"] / ctrl_wall, 1),
        "sim_steps_per_s": round(sim_steps / ctrl_wall, 1),
        "raw_sim_steps": raw_steps,
        "raw_wall_s": round(raw_wall, 3),
        "raw_wall_s_all": [round(w, 3) for w in raw],
        "raw_sumo_steps_per_s": round(raw_steps / raw_wall, 1),
        "overhead_ratio": round((ctrl_wall / sim_steps) / (raw_wall / max(raw_steps, 1)), 3),
        "controlled_cpu_s": round(min(ctrl_cpu), 3),
        "raw_cpu_s": round(min(raw_cpu), 3),
        "overhead_ratio_cpu": round((min(ctrl_cpu) / sim_steps) / (max(min(raw_cpu), 1e-9) / max(raw_steps, 1)), 3),
        "arrival_rate": metrics["arrival_rate"],
        "agents_active_at_end": metrics["active"] + metrics["truncated"],
        "peak_rss_mb": round(rss_mb, 1),
    }


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--map", default="helsinki")
    p.add_argument("--agents", type=int, default=100)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--traffic", default="light", choices=["none", "light", "medium", "heavy"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="alternating controlled/raw runs; the fastest of each counts")


def run(args: argparse.Namespace) -> dict[str, Any]:
    return bench_env(args.map, args.agents, args.steps, args.traffic, args.seed, args.repeats)

"""Environment throughput: the controlled env against plain libsumo on the same demand."""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

from ..sim.env import EnvConfig, NavigationEnv
from ..sim.policies import actions, make_policy


class _StepTimer:
    """Accumulates the wall time spent inside `libsumo.simulationStep` while installed: the env looks
    the function up on every step, so the controlled run's SUMO part is timed without touching the env."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self) -> _StepTimer:
        import libsumo

        self._real = real = libsumo.simulationStep
        perf = time.perf_counter

        def timed(*args: Any) -> Any:
            t = perf()
            out = real(*args)
            self.seconds += perf() - t
            return out

        libsumo.simulationStep = timed
        return self

    def __exit__(self, *exc: object) -> None:
        import libsumo

        libsumo.simulationStep = self._real


class _PythonLoad:
    """Synthetic interpreter work of a chosen length: attribute and dict traffic over 20,000 small
    objects in shuffled order, the kind of work the env's decision path does between SUMO steps.
    Run between the raw run's steps, it shows what interleaved Python alone costs SUMO's step."""

    def __init__(self) -> None:
        self.items = [_Cell(i) for i in range(20_000)]
        random.Random(0).shuffle(self.items)
        self.index = {id(c): c for c in self.items}
        self.pos = 0
        t = time.perf_counter()
        self._walk(2_000)
        self.per_item = (time.perf_counter() - t) / 2_000
        self.k = 0

    def set_length(self, seconds_per_call: float) -> None:
        self.k = max(int(seconds_per_call / self.per_item), 0)

    def observed(self, seconds_per_call: float) -> None:
        """Recalibrates from a run's actual length per call: between SUMO's steps the objects are
        colder than in the start-up calibration, so an item costs more there."""
        if self.k > 0 and seconds_per_call > 0:
            self.per_item = seconds_per_call / self.k

    def _walk(self, k: int) -> int:
        """Visits the next k objects, wrapping around the list."""
        items, index, acc, n = self.items, self.index, 0, len(self.items)
        while k > 0:
            p = self.pos
            chunk = items[p : p + k]
            for c in chunk:
                c = index[id(c)]
                if c.a % 3:
                    c.b.append(acc)
                    c.b.pop()
                else:
                    acc += c.a
            k -= len(chunk)
            self.pos = (p + len(chunk)) % n
        return acc

    def __call__(self) -> None:
        self._walk(self.k)


class _Cell:
    __slots__ = ("a", "b")

    def __init__(self, i: int) -> None:
        self.a, self.b = i, [i]


def _raw_run(
    env: NavigationEnv, steps: int, seed: int, between: Callable[[], None] | None = None
) -> tuple[float, float, int, float]:
    """Same map, background and agent trips, agents on fixed shortest-path routes, no control.
    Returns (wall s, CPU s, steps, s inside simulationStep); `between` runs after every step."""
    import libsumo

    env.reset(seed=seed)  # the controlled run's demand, regenerated in a fresh simulation
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
    with _StepTimer() as timer:  # the same timer as the controlled run's: same cost on both sides
        t0, c0 = time.perf_counter(), time.process_time()
        n = 0
        for _ in range(steps):
            libsumo.simulationStep()
            n += 1
            if libsumo.simulation.getMinExpectedNumber() == 0:
                break
            if between is not None:
                between()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return wall, cpu, n, timer.seconds


def _controlled_run(env: NavigationEnv, steps: int, seed: int) -> tuple[float, float, float, dict[str, Any]]:
    """Returns (wall s, CPU s, s inside simulationStep, env metrics)."""
    policy = make_policy("shortest_path", env)
    obs, infos = env.reset(seed=seed)
    with _StepTimer() as timer:
        t0, c0 = time.perf_counter(), time.process_time()
        while not env.done and env.sim_steps < steps:
            obs, _, _, _, infos = env.step(actions(policy, env, obs, infos))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return wall, cpu, timer.seconds, env.metrics()


def _config(map_name: str, agents: int, steps: int, traffic: str, seed: int) -> EnvConfig:
    return EnvConfig(
        map=map_name,
        n_agents=agents,
        traffic=traffic,
        seed=seed,
        horizon_s=float(max(steps, 1)),
        depart_window_s=min(60.0, steps / 4),
    )


def bench_env_side(
    side: str, map_name: str, agents: int, steps: int, traffic: str, seed: int, repeats: int = 3
) -> dict[str, Any]:
    """One side alone, `repeats` times: for a profiler attached to the whole process (perf, valgrind's
    callgrind with --toggle-collect on SUMO's step), which cannot tell the two sides apart in one run."""
    walls, inside = [], []
    with NavigationEnv(_config(map_name, agents, steps, traffic, seed)) as env:
        for _ in range(repeats):
            if side == "controlled":
                wall, _, sumo_s, _ = _controlled_run(env, steps, seed)
                n = env.sim_steps
            else:
                wall, _, n, sumo_s = _raw_run(env, steps, seed)
            walls.append(wall)
            inside.append(sumo_s)
    best = walls.index(min(walls))
    return {
        "bench": "env",
        "only": side,
        "map": map_name,
        "agents": agents,
        "repeats": repeats,
        "sim_steps": n,
        "wall_s": round(walls[best], 3),
        "wall_s_all": [round(w, 3) for w in walls],
        "sumo_step_s": round(inside[best], 3),
    }


def bench_env(
    map_name: str, agents: int, steps: int, traffic: str, seed: int, repeats: int = 3, interleave: bool = True
) -> dict[str, Any]:
    """Controlled and raw runs alternate `repeats` times; the fastest of each is kept (this VM is noisy),
    and each round's own ratio too (`overhead_ratio_paired_*`).
    The `_cpu` fields use this process's CPU time, which other processes' load disturbs less than wall time.
    With `interleave`, each round adds a raw run with synthetic Python work between the steps, as long
    per step as that round's controlled run spent outside SUMO's step (see `_PythonLoad`)."""
    cfg = _config(map_name, agents, steps, traffic, seed)
    ctrl, raw, ctrl_cpu, raw_cpu, ctrl_sumo, raw_sumo, mixed_sumo = [], [], [], [], [], [], []
    paired: list[float] = []  # each round's controlled over raw: the two share the machine's phase
    load = _PythonLoad() if interleave else None
    load_ms: list[float] = []
    with NavigationEnv(cfg) as env:
        for _ in range(repeats):
            wall, cpu, inside, metrics = _controlled_run(env, steps, seed)
            sim_steps = env.sim_steps
            ctrl.append(wall)
            ctrl_cpu.append(cpu)
            ctrl_sumo.append(inside)
            raw_wall, cpu, raw_steps, inside = _raw_run(env, sim_steps, seed)  # exactly as many simulated seconds
            paired.append((wall / sim_steps) / (raw_wall / max(raw_steps, 1)))
            raw.append(raw_wall)
            raw_cpu.append(cpu)
            raw_sumo.append(inside)
            if load is not None:
                load.set_length((ctrl[-1] - ctrl_sumo[-1]) / max(sim_steps, 1))
                mixed_wall, _, mixed_steps, inside = _raw_run(env, sim_steps, seed, load)
                mixed_sumo.append(inside)
                load_ms.append((mixed_wall - inside) / max(mixed_steps, 1) * 1e3)  # as run, not as asked
                load.observed(load_ms[-1] / 1e3)
    ctrl_wall, raw_wall = min(ctrl), min(raw)
    ctrl_wall_sumo = ctrl_sumo[ctrl.index(ctrl_wall)]  # SUMO's part of the fastest controlled run
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    out = {
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
        # the median of the rounds' own ratios: steadier than the ratio of two minima when the
        # machine's speed drifts between rounds (the minima may then come from different phases)
        "overhead_ratio_paired_median": round(statistics.median(paired), 3),
        "overhead_ratio_paired_all": [round(r, 3) for r in paired],
        "controlled_cpu_s": round(min(ctrl_cpu), 3),
        "raw_cpu_s": round(min(raw_cpu), 3),
        "overhead_ratio_cpu": round((min(ctrl_cpu) / sim_steps) / (max(min(raw_cpu), 1e-9) / max(raw_steps, 1)), 3),
        # where the controlled run's time goes: inside SUMO's step, and the Python around it (same run)
        "controlled_sumo_step_s": round(ctrl_wall_sumo, 3),
        "controlled_python_s": round(ctrl_wall - ctrl_wall_sumo, 3),
        "raw_sumo_step_s": round(min(raw_sumo), 3),
        "sumo_step_ratio": round((min(ctrl_sumo) / sim_steps) / (max(min(raw_sumo), 1e-9) / max(raw_steps, 1)), 3),
        "arrival_rate": metrics["arrival_rate"],
        "agents_active_at_end": metrics["active"] + metrics["truncated"],
        "peak_rss_mb": round(rss_mb, 1),
    }
    if load is not None:
        out["interleaved_python_ms_per_step"] = [round(ms, 4) for ms in load_ms]
        out["raw_interleaved_sumo_step_s"] = round(min(mixed_sumo), 3)
        out["sumo_step_ratio_interleaved"] = round(min(mixed_sumo) / max(min(raw_sumo), 1e-9), 3)
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--map", default="helsinki")
    p.add_argument("--agents", type=int, default=100)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--traffic", default="light", choices=["none", "light", "medium", "heavy"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="alternating controlled/raw runs; the fastest of each counts")
    p.add_argument(
        "--no-interleave",
        dest="interleave",
        action="store_false",
        help="skip the raw run with synthetic Python work between steps (the SUMO-step interference control)",
    )
    p.add_argument(
        "--only",
        choices=["controlled", "raw"],
        help="run one side alone, --repeats times, for a profiler attached to the process (no ratios)",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.only:
        return bench_env_side(args.only, args.map, args.agents, args.steps, args.traffic, args.seed, args.repeats)
    return bench_env(args.map, args.agents, args.steps, args.traffic, args.seed, args.repeats, args.interleave)

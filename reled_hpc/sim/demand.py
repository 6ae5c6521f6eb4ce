"""Traffic demand: agents' origin/destination pairs and background vehicles, seeded.

Background demand is a Poisson stream of shortest-path trips between random edges; the rate is
proportional to the network's lane length, so a level means the same density on any map.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from xml.sax.saxutils import quoteattr

import numpy as np

from ..errors import ConfigError
from .roadgraph import RoadGraph

# background vehicles per hour per lane-km of road
TRAFFIC_RATES = {"none": 0.0, "light": 40.0, "medium": 100.0, "heavy": 180.0}
MIN_DEPART_EDGE_M = 20.0  # a vehicle (5 m + gap) must fit on its first edge
JAM_SPACING_M = 7.5  # road length one standing vehicle takes


class EnvConfigLike(Protocol):
    """The env config fields demand reads (sim.env.EnvConfig; env imports this module)."""

    n_agents: int
    min_trip_m: float
    depart_window_s: float
    traffic: str
    horizon_s: float


@dataclass
class Trip:
    vid: str
    depart: float
    origin: int
    dest: int


def departure_edges(graph: RoadGraph) -> np.ndarray:
    return np.flatnonzero(graph.length >= MIN_DEPART_EDGE_M)


def capacity(graph: RoadGraph) -> int:
    """Vehicles the network holds at jam density."""
    return int((graph.length * graph.lanes).sum() / JAM_SPACING_M)


def sample_od(graph: RoadGraph, rng: np.random.Generator, min_trip_m: float, tries: int = 200) -> tuple[int, int]:
    """One origin/destination pair at least `min_trip_m` apart along the road."""
    edges = departure_edges(graph)
    for _ in range(tries):
        o, d = rng.choice(edges, size=2)
        if o != d and graph.cost_to(int(d))[o] >= min_trip_m:
            return int(o), int(d)
    raise ConfigError(
        f"no origin/destination pair at least {min_trip_m:.0f} m apart found in {tries} draws: "
        f"the map is too small for min_trip_m (its scale is {graph.scale:.0f} m)"
    )


def check_feasible(graph: RoadGraph, n_agents: int, map_name: str) -> None:
    cap = capacity(graph)
    if n_agents > cap:
        raise ConfigError(
            f"map {map_name!r} is too small for {n_agents} agents: its {graph.n_edges} edges hold at most "
            f"{cap} vehicles at jam density"
        )
    if len(departure_edges(graph)) < 2:
        raise ConfigError(f"map {map_name!r} has fewer than 2 edges long enough to depart from")


def agent_trips(graph: RoadGraph, n: int, rng: np.random.Generator, min_trip_m: float, window_s: float) -> list[Trip]:
    departs = np.sort(rng.uniform(0.0, window_s, size=n)) if window_s > 0 else np.zeros(n)
    trips = []
    for i in range(n):
        o, d = sample_od(graph, rng, min_trip_m)
        trips.append(Trip(f"a{i}", float(np.round(departs[i], 1)), o, d))
    return trips


def background_trips(
    graph: RoadGraph, level: str, horizon_s: float, rng: np.random.Generator, min_trip_m: float = 300.0
) -> list[Trip]:
    if level not in TRAFFIC_RATES:
        raise ConfigError(f"unknown traffic level {level!r} (one of {', '.join(TRAFFIC_RATES)})")
    lane_km = float((graph.length * graph.lanes).sum()) / 1000.0
    rate_per_s = TRAFFIC_RATES[level] * lane_km / 3600.0
    if rate_per_s <= 0:
        return []
    n = rng.poisson(rate_per_s * horizon_s)
    departs = np.sort(rng.uniform(0.0, horizon_s, size=n))
    min_trip = min(min_trip_m, 0.25 * graph.scale)
    return [Trip(f"bg{j}", float(np.round(t, 1)), *sample_od(graph, rng, min_trip)) for j, t in enumerate(departs)]


def scenario_trips(graph: RoadGraph, cfg: EnvConfigLike, seed: int) -> tuple[list[Trip], list[Trip]]:
    """The (agent trips, background trips) of scenario `seed`: a pure function of the graph, the env
    config and the seed, so the env, reference policies and equilibrium assignment see the same demand."""
    rng = np.random.default_rng(seed)
    agents = agent_trips(graph, cfg.n_agents, rng, cfg.min_trip_m, cfg.depart_window_s)
    return agents, background_trips(graph, cfg.traffic, cfg.horizon_s, rng)


def write_routes(path: Path, graph: RoadGraph, trips: list[Trip], vtype: str = "bg") -> None:
    """SUMO route file with each trip's shortest-path route."""
    # agents drive at most at the speed limit (speedDev 0): their travel times carry no per-driver
    # noise, and the env can bound when a vehicle may leave an edge (fewer queries)
    lines = [
        "<routes>",
        f'  <vType id="{vtype}" vClass="passenger"/>',
        '  <vType id="agent" vClass="passenger" speedDev="0"/>',
    ]
    for trip in trips:
        edges = " ".join(graph.edge_ids[e] for e in graph.route(trip.origin, trip.dest))
        lines.append(
            f'  <vehicle id="{trip.vid}" type="{vtype}" depart="{trip.depart:.1f}" departLane="best" '
            f'departSpeed="max"><route edges={quoteattr(edges)}/></vehicle>'
        )
    lines.append("</routes>")
    path.write_text("\n".join(lines) + "\n")

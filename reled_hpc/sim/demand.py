"""Traffic demand: agents' origin/destination pairs and background vehicles, seeded.

Background demand is a Poisson stream of shortest-path trips between random edges; the rate is
proportional to the network's lane length, so a level means the same density on any map.

Agents' trips come from `env.demand` (`DemandConfig`, docs/demand.md): `uniform` draws origins and
destinations over the whole map; `commute` between a few fixed origin zones and a few destination
zones on opposite sides of the map, departing in a peak window, so agents share corridors and
bottlenecks; `file` reads them (and optionally the background) from a trip/route file.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol
from xml.sax.saxutils import quoteattr

import numpy as np

from ..config import require
from ..errors import ConfigError
from .roadgraph import RoadGraph

if TYPE_CHECKING:
    from .tripfile import FileTrip

# background vehicles per hour per lane-km of road
TRAFFIC_RATES = {"none": 0.0, "light": 40.0, "medium": 100.0, "heavy": 180.0}
MIN_DEPART_EDGE_M = 20.0  # a vehicle (5 m + gap) must fit on its first edge
JAM_SPACING_M = 7.5  # road length one standing vehicle takes
DEMAND_KINDS = ("uniform", "commute", "file")
# commute zone centres lie in the first / last this share of the map along its long axis
ZONE_SIDE_SHARE = 0.3


@dataclass
class DemandConfig:
    kind: Literal["uniform", "commute", "file"] = "uniform"
    """Agents' trips: 'uniform' over the map, 'commute' between a few zones, 'file' from env.demand.file."""
    origin_zones: int = 2
    """commute: number of origin zones, spread over one end of the map (>= 1)."""
    dest_zones: int = 1
    """commute: number of destination zones, spread over the opposite end (>= 1)."""
    zone_radius_m: float = 250.0
    """commute: a zone is every departure edge whose midpoint lies within this many metres of its centre (> 0)."""
    origin_shares: list[float] = field(default_factory=list)
    """commute: weight of each origin zone, one per zone (>= 0, normalised); [] = equal shares."""
    dest_shares: list[float] = field(default_factory=list)
    """commute: weight of each destination zone, one per zone, drawn independently of the origin; [] = equal."""
    peak_window_s: float = 300.0
    """commute: agents depart uniformly in [0, this) s (>= 0, < env.horizon_s), in place of env.depart_window_s."""
    zones_seed: int = 2
    """commute: zone layout seed (which end is the origin, where zones sit); 2 suits helsinki, see docs/demand.md."""
    file: str = ""
    """file: a SUMO trips/routes file, a URB agents.csv, or a folder holding one (read by reled_hpc.sim.tripfile)."""
    agents: Literal["sample", "marked", "all"] = "sample"
    """file: the learning agents: 'sample' env.n_agents per scenario seed, 'marked' the file's, 'all' every vehicle."""
    background: Literal["file", "generated", "both"] = "file"
    """file: background traffic: the file's other vehicles, the generated env.traffic stream, or both."""

    def validate(self, where: str = "env.demand") -> None:
        require(self.kind in DEMAND_KINDS, f"{where}.kind", f"unknown kind {self.kind!r} (one of {DEMAND_KINDS})")
        require(self.origin_zones >= 1, f"{where}.origin_zones", f"must be >= 1, got {self.origin_zones}")
        require(self.dest_zones >= 1, f"{where}.dest_zones", f"must be >= 1, got {self.dest_zones}")
        require(self.zone_radius_m > 0, f"{where}.zone_radius_m", f"must be > 0, got {self.zone_radius_m}")
        require(self.peak_window_s >= 0, f"{where}.peak_window_s", f"must be >= 0, got {self.peak_window_s}")
        for key, shares, n in (
            ("origin_shares", self.origin_shares, self.origin_zones),
            ("dest_shares", self.dest_shares, self.dest_zones),
        ):
            if not shares:
                continue
            require(len(shares) == n, f"{where}.{key}", f"needs one share per zone ({n}), got {len(shares)}")
            require(min(shares) >= 0 and sum(shares) > 0, f"{where}.{key}", "shares must be >= 0 with a sum > 0")
        require(self.agents in ("sample", "marked", "all"), f"{where}.agents", f"unknown value {self.agents!r}")
        require(
            self.background in ("file", "generated", "both"),
            f"{where}.background",
            f"unknown value {self.background!r}",
        )
        if self.kind == "file":
            require(bool(self.file), f"{where}.file", "required when kind is 'file'")
            require(Path(self.file).exists(), f"{where}.file", f"{self.file} does not exist")


class EnvConfigLike(Protocol):
    """The env config fields demand reads (sim.env.EnvConfig; env imports this module)."""

    n_agents: int
    min_trip_m: float
    depart_window_s: float
    traffic: str
    horizon_s: float
    demand: DemandConfig


@dataclass
class Trip:
    vid: str
    depart: float
    origin: int
    dest: int
    route: tuple[int, ...] | None = None  # edges to drive (background from a file); None: the shortest path


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
        cost = graph.cost_to(int(d))[o]
        # finite: on maps that keep the edges leading into or out of the strongly connected core
        # (ingolstadt), not every edge reaches every other
        if o != d and np.isfinite(cost) and cost >= min_trip_m:
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


# ---- commute ----------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # edges is an array: no element-wise ==
class Zone:
    center: tuple[float, float]  # network coordinates (m)
    edges: np.ndarray  # departure edges whose midpoint lies within the radius


@dataclass(frozen=True)
class CommuteZones:
    origins: list[Zone]
    dests: list[Zone]


def _edge_mid(graph: RoadGraph, edges: np.ndarray) -> np.ndarray:
    return 0.5 * (graph.start_xy[edges] + graph.end_xy[edges])


def _spread(points: np.ndarray, cands: np.ndarray, k: int, rng: np.random.Generator, what: str) -> list[int]:
    """k of `cands` (indices into `points`), spread out: a random first one, then each next the one
    farthest from those already chosen (farthest-point sampling)."""
    chosen = [int(rng.choice(cands))]
    nearest = np.linalg.norm(points[cands] - points[chosen[0]], axis=1)
    for _ in range(k - 1):
        j = int(np.argmax(nearest))
        if nearest[j] <= 0:
            raise ConfigError(f"env.demand.{what}: the map has too few edges for {k} distinct zones")
        chosen.append(int(cands[j]))
        nearest = np.minimum(nearest, np.linalg.norm(points[cands] - points[cands[j]], axis=1))
    return chosen


def commute_zones(graph: RoadGraph, demand: DemandConfig) -> CommuteZones:
    """The commute zones of a map: a pure function of the graph and `demand` (not of the scenario seed).

    Zone centres are departure-edge midpoints. Origin centres lie in the first ZONE_SIDE_SHARE of the
    map along its principal (long) axis, destination centres in the last; which end is which, and
    the first centre of each side, come from `zones_seed`; further centres are farthest-point picks,
    so zones of a side are as far apart as the map allows and trips cross the map's middle, where
    several parallel routes exist."""
    edges = departure_edges(graph)
    mid = _edge_mid(graph, edges)
    rng = np.random.default_rng(demand.zones_seed)
    centred = mid - mid.mean(axis=0)
    axis = np.linalg.svd(centred, full_matrices=False)[2][0]
    axis = axis * np.sign(axis[np.argmax(np.abs(axis))])  # LAPACK's sign is arbitrary: fix it, then draw it
    if rng.random() < 0.5:
        axis = -axis
    proj = centred @ axis
    lo, hi = np.quantile(proj, [ZONE_SIDE_SHARE, 1.0 - ZONE_SIDE_SHARE])
    out = []
    for what, k, cands in (
        ("origin_zones", demand.origin_zones, np.flatnonzero(proj <= lo)),
        ("dest_zones", demand.dest_zones, np.flatnonzero(proj >= hi)),
    ):
        zones = []
        for c in _spread(mid, cands, k, rng, what):
            inside = np.linalg.norm(mid - mid[c], axis=1) <= demand.zone_radius_m
            zones.append(Zone((float(mid[c, 0]), float(mid[c, 1])), edges[inside]))
        out.append(zones)
    return CommuteZones(*out)


def _shares(shares: list[float], n: int) -> np.ndarray:
    w = np.asarray(shares, dtype=np.float64) if shares else np.ones(n)
    return w / w.sum()


def commute_trips(
    graph: RoadGraph, n: int, rng: np.random.Generator, min_trip_m: float, demand: DemandConfig, tries: int = 200
) -> list[Trip]:
    """n agent trips from an origin zone to a destination zone (drawn by their shares), departing
    uniformly in the peak window; origin and destination edges uniformly inside their zones, at
    least `min_trip_m` apart along the road."""
    zones = commute_zones(graph, demand)
    w = demand.peak_window_s
    departs = np.sort(rng.uniform(0.0, w, size=n)) if w > 0 else np.zeros(n)
    po, pd = _shares(demand.origin_shares, len(zones.origins)), _shares(demand.dest_shares, len(zones.dests))
    trips = []
    for i in range(n):
        # the zone pair is kept through the retries, so rejections do not skew the shares
        zo, zd = zones.origins[rng.choice(len(po), p=po)], zones.dests[rng.choice(len(pd), p=pd)]
        for _ in range(tries):
            o, d = int(rng.choice(zo.edges)), int(rng.choice(zd.edges))
            if o != d and min_trip_m <= graph.cost_to(d)[o] < np.inf:
                break
        else:
            raise ConfigError(
                f"env.demand: no trip from the origin zone at {zo.center[0]:.0f},{zo.center[1]:.0f} to the "
                f"destination zone at {zd.center[0]:.0f},{zd.center[1]:.0f} at least {min_trip_m:.0f} m long in "
                f"{tries} draws: enlarge env.demand.zone_radius_m or lower env.min_trip_m"
            )
        trips.append(Trip(f"a{i}", float(np.round(departs[i], 1)), o, d))
    return trips


# ---- file -----------------------------------------------------------------------------------------

_FILE_CACHE: OrderedDict[tuple[str, int, int], tuple[weakref.ref[RoadGraph], list[FileTrip]]] = OrderedDict()
_FILE_CACHE_SIZE = 8


def file_demand(path: str | Path, graph: RoadGraph) -> list[FileTrip]:
    """The parsed trip file (or folder), cached per (path, mtime, graph) in this process: resets do not re-parse."""
    from .tripfile import read_demand  # lazy: only kind 'file' needs the parser

    p = Path(path).resolve()
    # the parser also reads a folder's demand file and a URB csv's od_*.txt: any of them edited re-parses
    inputs = [p, *(p.iterdir() if p.is_dir() else p.parent.glob("od_*.txt") if p.name.lower().endswith(".csv") else [])]
    try:
        mtime = max(f.stat().st_mtime_ns for f in inputs)
    except OSError as exc:
        raise ConfigError(f"env.demand.file: cannot read {path}: {exc}") from exc
    key = (str(p), mtime, id(graph))
    hit = _FILE_CACHE.get(key)
    if hit is not None and hit[0]() is graph:  # id() alone could name a newer graph at a freed address
        _FILE_CACHE.move_to_end(key)
        return hit[1]
    trips = read_demand(p, graph)
    _FILE_CACHE[key] = (weakref.ref(graph), trips)
    while len(_FILE_CACHE) > _FILE_CACHE_SIZE:
        _FILE_CACHE.popitem(last=False)
    return trips


def file_trips(graph: RoadGraph, cfg: EnvConfigLike, rng: np.random.Generator) -> tuple[list[Trip], list[Trip]]:
    """(agent trips, the file's other vehicles) of a trip file. Agents keep the file's departure and
    origin/destination (they choose their own route) and are renamed a0.. in departure order; the
    others keep their route (None: the shortest path) under the id `file:<their id>`."""
    dcfg = cfg.demand
    trips = file_demand(dcfg.file, graph)
    n = cfg.n_agents
    if dcfg.agents == "sample":
        if len(trips) < n:
            raise ConfigError(
                f"env.demand.file: {dcfg.file} has {len(trips)} vehicles, fewer than env.n_agents = {n} to sample"
            )
        is_agent = np.zeros(len(trips), dtype=bool)
        is_agent[rng.choice(len(trips), size=n, replace=False)] = True
    else:
        is_agent = np.array([t.agent is True for t in trips] if dcfg.agents == "marked" else [True] * len(trips))
        k = int(is_agent.sum())
        if k != n:
            which = f"marks {k} agent vehicles" if dcfg.agents == "marked" else f"has {k} vehicles"
            raise ConfigError(f"env.demand.agents = {dcfg.agents!r}: {dcfg.file} {which}, but env.n_agents = {n}")
    agents, others = [], []
    for t, a in zip(trips, is_agent, strict=True):
        if a:
            agents.append(Trip(f"a{len(agents)}", float(t.depart), int(t.origin), int(t.dest)))
        else:
            route = tuple(int(e) for e in t.route) if t.route is not None else None
            others.append(Trip(f"file:{t.vid}", float(t.depart), int(t.origin), int(t.dest), route))
    return agents, others


# ---- scenarios ------------------------------------------------------------------------------------


def scenario_trips(graph: RoadGraph, cfg: EnvConfigLike, seed: int) -> tuple[list[Trip], list[Trip]]:
    """The (agent trips, background trips) of scenario `seed`: a pure function of the graph, the env
    config and the seed, so the env, reference policies and equilibrium assignment see the same demand."""
    rng = np.random.default_rng(seed)
    dcfg = cfg.demand
    if dcfg.kind == "file":
        agents, others = file_trips(graph, cfg, rng)
        if dcfg.background == "file":
            return agents, others
        generated = background_trips(graph, cfg.traffic, cfg.horizon_s, rng)
        if dcfg.background == "generated":
            return agents, generated
        # SUMO reads a route file in order and expects it sorted by departure (stable: ties keep file first)
        return agents, sorted(others + generated, key=lambda t: t.depart)
    if dcfg.kind == "commute":
        agents = commute_trips(graph, cfg.n_agents, rng, cfg.min_trip_m, dcfg)
    else:
        agents = agent_trips(graph, cfg.n_agents, rng, cfg.min_trip_m, cfg.depart_window_s)
    return agents, background_trips(graph, cfg.traffic, cfg.horizon_s, rng)


def write_routes(path: Path, graph: RoadGraph, trips: list[Trip], vtype: str = "bg") -> None:
    """SUMO route file with each trip's route (its given one, else its shortest path)."""
    # agents drive at most at the speed limit (speedDev 0): their travel times carry no per-driver
    # noise, and the env can bound when a vehicle may leave an edge (fewer queries)
    lines = [
        "<routes>",
        f'  <vType id="{vtype}" vClass="passenger"/>',
        '  <vType id="agent" vClass="passenger" speedDev="0"/>',
    ]
    for trip in trips:
        route = trip.route if trip.route is not None else graph.route(trip.origin, trip.dest)
        edges = " ".join(graph.edge_ids[e] for e in route)
        lines.append(
            f'  <vehicle id={quoteattr(trip.vid)} type="{vtype}" depart="{trip.depart:.1f}" departLane="best" '
            f'departSpeed="max"><route edges={quoteattr(edges)}/></vehicle>'
        )
    lines.append("</routes>")
    path.write_text("\n".join(lines) + "\n")

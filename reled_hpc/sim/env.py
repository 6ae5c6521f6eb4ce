"""Multi-agent vehicle navigation in SUMO (libsumo), PettingZoo-Parallel style.

Each agent is a vehicle with an origin and a destination edge. It chooses its route one junction
at a time, ahead of itself: an agent is asked for a decision whenever fewer than `lookahead`
planned edges lie ahead of the edge it is on (OSM edges are often crossed within one simulation
second, so choosing on arrival would be too late). Junctions with a single way on are taken
without asking. Between decisions SUMO drives. `step(actions)` applies the actions and advances
SUMO until at least one agent needs a decision, or the episode ends.

Agent states: pending (before its departure time) -> deciding <-> driving -> arrived | failed
(teleported, dead end) | truncated (horizon). Every agent is always in exactly one state.

SUMO drives each agent along its plan followed by the shortest way on to the goal (the "tail"),
so lane choice sees the road ahead and no vehicle can run out of route; the route is re-sent
only when a choice leaves the tail. Should a vehicle ever cross more than `lookahead` edges in
one step, the tail edges it took join the plan and count as `late_decisions`.

The dicts returned by `reset` and `step` hold the agents that need a decision now (terminated and
truncated False: `step` needs an action for each) and the agents whose episode ended in this
step (terminated or truncated True, with their final reward). `infos[a]["action_mask"]` marks the
valid candidates; `infos[a]["candidates"]` names their SUMO edges.
"""

from __future__ import annotations

import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from ..config import require
from ..errors import EnvError
from .demand import TRAFFIC_RATES, DemandConfig, Trip, capacity, check_feasible, scenario_trips, write_routes
from .maps import MapBundle, resolve_map
from .sumo_tools import sumo_home

# observation layout: SELF_FEATURES, then A_max rows of CAND_FEATURES
SELF_FEATURES = ("progress", "elapsed", "dist_to_goal", "n_candidates")
CAND_FEATURES = ("length", "speed_limit", "occupancy", "rel_speed", "dist_after", "detour", "heading", "is_goal")
LENGTH_UNIT_M = 1000.0  # edge lengths and detours in km
SPEED_UNIT = 30.0  # m/s


@dataclass
class EnvConfig:
    map: str = "helsinki"
    """Road network: 'helsinki' (shipped), 'grid', a built map folder or an OSM file (built on first use)."""
    n_agents: int = 20
    """Learning agents (vehicles) per env, i.e. per rank in training, in [1, 100000]; dist.total_agents overrides it."""
    traffic: Literal["none", "light", "medium", "heavy"] = "light"
    """Background traffic: 0, 40, 100 or 180 vehicles per hour per lane-km, the same density on any map."""
    horizon_s: float = 1200.0
    """Episode length in simulated seconds, in (0, 604800] (7 days); agents still on the road then are truncated."""
    lookahead: int = 3
    """An agent decides while fewer than this many planned edges lie ahead of its edge (>= 1)."""
    a_max: int = 4
    """Candidate edges per decision, the action space (>= 2); more exits: the a_max closest to the goal stay."""
    min_trip_m: float = 500.0
    """Least shortest-path length of an agent's trip, in metres (>= 0)."""
    depart_window_s: float = 60.0
    """Uniform demand: agents depart uniformly at random in the first this many seconds (>= 0; 0 = all at t = 0)."""
    reward_time_scale_s: float = 60.0
    """Each decision's reward is minus the seconds since the agent's last decision over this (> 0)."""
    arrival_bonus: float = 5.0
    """Reward added when an agent reaches its destination."""
    failure_penalty: float = 5.0
    """Reward subtracted when an agent fails (teleported by SUMO, or at a dead end)."""
    time_to_teleport_s: float = 300.0
    """SUMO's --time-to-teleport in seconds (> 0): a vehicle stuck this long is teleported (an agent then fails)."""
    invalid_action: Literal["error", "shortest_path"] = "error"
    """On an invalid action: 'error' raises EnvError, 'shortest_path' takes the candidate closest to the goal."""
    fastest_refresh_s: float = 30.0
    """Simulated seconds between the fastest_path policy's reads of live edge travel times (> 0)."""
    seed: int = 0
    """Episode k's scenario seed is seed + k when reset() gets none (training passes seeds derived from its own)."""
    demand: DemandConfig = field(default_factory=DemandConfig)
    """Agents' trips: uniform over the map, commute between zones, or from a file (docs/demand.md)."""

    def validate(self, where: str = "env") -> None:
        # generous bounds that catch typos (1e9 agents, a horizon of years) before SUMO or memory fail mid-run
        require(1 <= self.n_agents <= 100_000, f"{where}.n_agents", f"must be in [1, 100000], got {self.n_agents}")
        require(0 < self.horizon_s <= 7 * 86400, f"{where}.horizon_s",
                f"must be in (0, 604800] (7 days), got {self.horizon_s}")  # fmt: skip
        require(self.lookahead >= 1, f"{where}.lookahead", f"must be >= 1, got {self.lookahead}")
        require(self.a_max >= 2, f"{where}.a_max", f"must be >= 2, got {self.a_max}")
        require(self.min_trip_m >= 0, f"{where}.min_trip_m", f"must be >= 0, got {self.min_trip_m}")
        require(self.depart_window_s >= 0, f"{where}.depart_window_s", "must be >= 0")
        require(self.reward_time_scale_s > 0, f"{where}.reward_time_scale_s", "must be > 0")
        require(self.time_to_teleport_s > 0, f"{where}.time_to_teleport_s", "must be > 0")
        require(self.fastest_refresh_s > 0, f"{where}.fastest_refresh_s", "must be > 0")
        require(self.traffic in TRAFFIC_RATES, f"{where}.traffic", f"unknown level {self.traffic!r}")
        self.demand.validate(f"{where}.demand")
        if self.demand.kind == "commute":
            require(
                self.demand.peak_window_s < self.horizon_s,
                f"{where}.demand.peak_window_s",
                f"must be < {where}.horizon_s ({self.horizon_s}), got {self.demand.peak_window_s}",
            )

    @property
    def obs_dim(self) -> int:
        return len(SELF_FEATURES) + self.a_max * len(CAND_FEATURES)

    @property
    def obs_features(self) -> tuple[str, ...]:
        """Name of each of the obs_dim observation features, in order (candidate j's as `cand{j}.name`)."""
        return SELF_FEATURES + tuple(f"cand{j}.{f}" for j in range(self.a_max) for f in CAND_FEATURES)

    @property
    def reward_bound(self) -> float:
        """|r| <= r_max: a decision's time term is at most the horizon."""
        return self.horizon_s / self.reward_time_scale_s + max(self.arrival_bonus, self.failure_penalty)


@dataclass(slots=True)
class AgentState:
    vid: str
    trip: Trip
    plan: list[int]  # every edge of the route so far, origin first
    status: str = "pending"  # pending | deciding | driving | arrived | failed | truncated
    tail: list[int] = field(default_factory=list)  # provisional shortest path plan[-1] -> goal, REVERSED
    pos: int = 0  # plan index of the edge the vehicle is on
    order: int = 0  # rank in the order of edge checks (see _advance)
    odo0: float = -1.0  # odometer when it entered edge `pos`; < 0: checked every second until it leaves
    in_sumo: bool = False  # added to SUMO (maybe still waiting for insertion)
    inserted: bool = False  # on the road
    t_last: float = 0.0  # time of the last decision (reward accounting)
    ret: float = 0.0
    decisions: int = 0
    start_cost: float = 0.0  # shortest distance origin -> goal, for `progress`
    end_time: float | None = None
    reason: str = ""
    candidates: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    cand_dist: np.ndarray = field(default_factory=lambda: np.zeros(0))
    choice: ChoiceSet | None = None  # the current decision's (None outside a decision)


@dataclass(frozen=True, slots=True)
class ChoiceSet:
    """What a decision at the end of one edge towards one destination offers, and every part of its
    observation that does not change over time (all but occupancy and relative speed); cached per
    (edge, destination), so a repeated decision costs one dict lookup."""

    candidates: np.ndarray  # read-only
    dist: np.ndarray  # read-only: shortest distance to the goal from the start of each candidate
    dist_goal: float  # min(dist)
    names: tuple[str, ...]  # SUMO edge ids of the candidates
    # per candidate: (edge, length_km, speed_n, max(speed limit, 0.1), dist / scale, detour, heading, is_goal)
    rows: tuple[tuple[int, float, float, float, float, float, float, float], ...]


CHOICE_CACHE_MAX = 200_000  # (edge, destination) pairs kept; the cache is cleared whole when full


ENDED = ("arrived", "failed", "truncated")
_ORDER_STRIDE = 1 << 40  # AgentState.order: a later start of checks first, then by sequence number


def _first(item: tuple[int, AgentState, int]) -> int:
    return item[0]


_LIVE: weakref.ref[NavigationEnv] | None = None  # libsumo runs one simulation per process


def _claim(env: NavigationEnv) -> None:
    global _LIVE
    other = _LIVE() if _LIVE is not None else None
    if other is not None and other is not env:
        raise EnvError(
            "a NavigationEnv already runs a libsumo simulation in this process; libsumo holds one simulation "
            "per process and would silently replace it. Call close() on the other env first (one env per process "
            "or MPI rank)."
        )
    _LIVE = weakref.ref(env)


def _release(env: NavigationEnv) -> None:
    global _LIVE
    if _LIVE is not None and _LIVE() is env:
        _LIVE = None


class NavigationEnv:
    """See the module docstring. Use as a context manager or call close()."""

    metadata: ClassVar[dict[str, Any]] = {"name": "reled_navigation_v0", "is_parallelizable": True}

    def __init__(self, config: EnvConfig | None = None, map_bundle: MapBundle | None = None) -> None:
        self.config = config or EnvConfig()
        self.config.validate()
        self.map = map_bundle or resolve_map(self.config.map)
        self.graph = self.map.graph
        check_feasible(self.graph, self.config.n_agents, self.map.name)
        self.possible_agents = [f"a{i}" for i in range(self.config.n_agents)]
        self._workdir = tempfile.TemporaryDirectory(prefix="reled_env_")
        self._started = False
        self._closed = False
        self.episode = -1
        self.agents_state: dict[str, AgentState] = {}
        self.time = 0.0
        self.sim_steps = 0
        self._edge_stats: dict[int, tuple[float, float]] = {}
        self._fastest: tuple[float, dict[int, np.ndarray]] = (-1.0, {})
        self._heading_vec = self.graph.end_xy - self.graph.start_xy
        norms = np.linalg.norm(self._heading_vec, axis=1, keepdims=True)
        self._heading_vec = self._heading_vec / np.maximum(norms, 1e-9)
        g = self.graph
        self._length: list[float] = g.length.tolist()
        self._out_degree: list[int] = g.out_degree.tolist()
        self._speed: list[float] = g.speed.tolist()
        # whole seconds a vehicle that just entered an edge stays on it at least, minus one of margin
        self._min_stay: list[int] = ((g.length / g.speed).astype(np.int64) - 1).tolist()
        self._choice_cache: dict[int, ChoiceSet] = {}
        self._scalar_tables = (  # Python lists: scalar reads from lists are ~10x faster than from arrays
            (g.length / LENGTH_UNIT_M).tolist(),
            (g.speed / SPEED_UNIT).tolist(),
            g.speed.tolist(),
            g.start_xy.tolist(),
            g.end_xy.tolist(),
            self._heading_vec.tolist(),
        )

    # ---- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> NavigationEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._started:
            import libsumo

            libsumo.close()
            self._started = False
        _release(self)
        if not self._closed:
            self._workdir.cleanup()
            self._closed = True

    def _sumo_args(self, route_file: Path, seed: int) -> list[str]:
        return [
            "-n",
            str(self.map.net_file),
            "-r",
            str(route_file),
            "--step-length",
            "1",
            "--seed",
            str(seed),
            "--begin",
            "0",
            "--time-to-teleport",
            str(self.config.time_to_teleport_s),
            "--no-step-log",
            "true",
            "--no-warnings",
            "true",
            "--xml-validation",
            "never",
            "--device.rerouting.probability",
            "0",
            "--collision.action",
            "teleport",
        ]

    def _start(self, args: list[str]) -> None:
        import libsumo

        sumo_home()  # sets SUMO_HOME for libsumo's data files
        if self._started:
            libsumo.load(args)
        else:
            libsumo.start([str(Path(sumo_home(), "bin", "sumo")), *args])
            self._started = True

    # ---- episode -------------------------------------------------------------------------------
    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None):
        if self._closed:
            raise EnvError("this NavigationEnv was closed; create a new one")
        _claim(self)
        cfg = self.config
        self.episode += 1
        seed = cfg.seed + self.episode if seed is None else int(seed)
        self.seed_used = seed
        trips, self.bg_trips = scenario_trips(self.graph, cfg, seed)
        route_file = Path(self._workdir.name) / f"bg_{self.episode}.rou.xml"
        write_routes(route_file, self.graph, self.bg_trips)
        self._start(self._sumo_args(route_file, seed))
        self.time = 0.0
        self.sim_steps = 0
        self.decisions = 0
        self.invalid_actions = 0
        self.late_decisions = 0
        self._edge_stats = {}
        self._fastest = (-1.0, {})
        self.agents_state = {}
        for trip in trips:
            st = AgentState(vid=trip.vid, trip=trip, plan=[trip.origin], t_last=trip.depart)
            st.start_cost = float(self.graph.cost_to(trip.dest)[trip.origin])
            st.tail = self.graph.route(trip.origin, trip.dest)[:0:-1]
            self.agents_state[trip.vid] = st
        self._pending = sorted(trips, key=lambda t: (t.depart, t.vid))
        self._pending_i = 0
        # event bookkeeping: per-step work is proportional to the agents that can change, not to n
        self._deciding: dict[str, AgentState] = {}
        self._dirty: dict[str, AgentState] = {}
        self._checks: dict[int, list[AgentState]] = {}  # step -> agents whose edge may have changed
        self._order_seq = 0
        self._n_live = len(trips)
        self._n_arrived = 0
        self._bg_depart: dict[str, float] = {}
        self._bg_travel: list[float] = []
        self.bg_teleports = 0
        self.agent_teleports = 0
        # reset() returns no rewards: the time until the first decision is charged to the next one
        obs, _, _, _, infos = self._advance(charge=False)
        return obs, infos

    def step(self, actions: dict[str, int]):
        missing = [a for a in self._deciding if a not in actions]
        if missing:
            raise EnvError(
                f"step() needs an action for every deciding agent; missing {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}"
            )
        for aid in actions:
            st = self.agents_state.get(aid)
            if st is None:
                raise EnvError(f"unknown agent {aid!r}")
            if st.status != "deciding":
                raise EnvError(f"agent {aid!r} is {st.status}, not awaiting a decision")
        for aid, act in actions.items():
            self._apply(aid, self.agents_state[aid], act)
        return self._advance()

    # ---- decisions -----------------------------------------------------------------------------
    def _choice_set(self, edge: int, dest: int) -> ChoiceSet:
        key = edge * self.graph.n_edges + dest
        hit = self._choice_cache.get(key)
        if hit is not None:
            return hit
        g = self.graph
        succ = g.successors(edge)
        cost = g.cost_to(dest)[succ]
        # only ways on from which the goal can still be reached (all of them on a strongly connected map);
        # a list test: numpy's reductions cost more than the few successors they would scan
        if np.inf in cost.tolist():
            reach = np.isfinite(cost)
            succ, cost = succ[reach], cost[reach]
        dist = cost + g.length[succ]
        if len(succ) > self.config.a_max:  # keep the a_max closest to the goal (documented cap)
            keep = np.argsort(dist, kind="stable")[: self.config.a_max]
            succ, dist = succ[keep], dist[keep]
        succ.flags.writeable = False
        dist.flags.writeable = False
        length_km, speed_n, speed, start_xy, end_xy, head = self._scalar_tables
        cands, dists = succ.tolist(), dist.tolist()
        dist_goal = min(dists) if dists else 0.0
        gx, gy = end_xy[dest]
        rows = []
        for c, d in zip(cands, dists, strict=True):
            sx, sy = start_xy[c]
            tx, ty = gx - sx, gy - sy
            norm = (tx * tx + ty * ty) ** 0.5
            hx, hy = head[c]
            rows.append((
                c,
                length_km[c],
                speed_n[c],
                max(speed[c], 0.1),
                d / g.scale,
                (d - dist_goal) / LENGTH_UNIT_M,
                (hx * tx + hy * ty) / norm if norm > 1e-6 else 1.0,
                1.0 if c == dest else 0.0,
            ))  # fmt: skip
        cs = ChoiceSet(succ, dist, dist_goal, tuple(g.edge_ids[c] for c in cands), tuple(rows))
        if len(self._choice_cache) >= CHOICE_CACHE_MAX:
            self._choice_cache.clear()
        self._choice_cache[key] = cs
        return cs

    def _apply(self, aid: str, st: AgentState, act: Any) -> None:
        n = len(st.candidates)
        try:
            idx = int(act)
            valid = 0 <= idx < n and idx == act
        except (TypeError, ValueError):
            idx, valid = -1, False
        if not valid:
            if self.config.invalid_action == "error":
                raise EnvError(
                    f"agent {aid!r}: invalid action {act!r}; valid actions are 0..{n - 1} "
                    f"(see infos[agent]['action_mask'])"
                )
            self.invalid_actions += 1
            idx = int(np.argmin(st.cand_dist))
        self._take(st, int(st.candidates[idx]))
        st.decisions += 1
        self.decisions += 1
        self._extend_forced(st)
        if not self._needs_decision(st):
            del self._deciding[aid]
            st.status = "driving"

    def _extend_forced(self, st: AgentState) -> None:
        """Take single-exit junctions without asking, up to the lookahead."""
        g, plan, out_degree = self.graph, st.plan, self._out_degree
        while plan[-1] != st.trip.dest and out_degree[plan[-1]] == 1 and self._ahead(st) < self.config.lookahead:
            self._take(st, int(g.successors(plan[-1])[0]))

    def _take(self, st: AgentState, edge: int) -> None:
        """Append `edge` to the plan. SUMO drives plan + tail (the shortest way on, so its lane choice
        sees the road ahead); the route is only re-sent when the choice leaves that tail."""
        st.plan.append(edge)
        if st.tail and st.tail[-1] == edge:
            st.tail.pop()
        else:
            st.tail = self.graph.route(edge, st.trip.dest)[:0:-1]
            self._dirty[st.vid] = st

    def _ahead(self, st: AgentState) -> int:
        return len(st.plan) - 1 - st.pos

    def _needs_decision(self, st: AgentState) -> bool:
        return st.plan[-1] != st.trip.dest and len(st.plan) - 1 - st.pos < self.config.lookahead

    # ---- simulation loop -------------------------------------------------------------------------
    def _flush_routes(self) -> None:
        import libsumo

        ids = self.graph.edge_ids
        for aid, st in self._dirty.items():
            if st.status in ENDED:
                continue
            if st.in_sumo:
                # SUMO keeps the passed edges in front of the new route, so its route index keeps
                # counting from the plan's start (before insertion the route is replaced whole, and
                # pos is 0): the index is always a plan index
                libsumo.vehicle.setRoute(aid, [ids[e] for e in st.plan[st.pos :]] + [ids[e] for e in st.tail[::-1]])
            else:
                self._insert(st)
        self._dirty.clear()

    def _insert(self, st: AgentState) -> None:
        import libsumo

        ids = self.graph.edge_ids
        libsumo.route.add(f"r_{st.vid}", [ids[e] for e in st.plan] + [ids[e] for e in st.tail[::-1]])
        libsumo.vehicle.add(st.vid, f"r_{st.vid}", typeID="agent", depart="now", departLane="best", departSpeed="max")
        st.in_sumo = True

    def _catch_up(self, st: AgentState, pos: int) -> None:
        """The vehicle got past the plan onto its provisional tail (more than `lookahead` edges in one
        step): those edges become part of the plan, counted as late decisions."""
        while len(st.plan) - 1 < pos and st.tail:
            st.plan.append(st.tail.pop())
            self.late_decisions += 1

    def _end_agent(self, st: AgentState, status: str, reason: str, out: dict) -> None:
        cfg = self.config
        r = -(self.time - st.t_last) / cfg.reward_time_scale_s
        if status == "arrived":
            r += cfg.arrival_bonus
        elif status == "failed":
            r -= cfg.failure_penalty
        self._deciding.pop(st.trip.vid, None)
        st.status, st.reason, st.end_time = status, reason, self.time
        st.ret += r
        st.t_last = self.time
        self._n_live -= 1
        self._n_arrived += status == "arrived"
        out[st.trip.vid] = r

    def _advance(self, charge: bool = True):
        import libsumo

        cfg = self.config
        states = self.agents_state
        ended: dict[str, float] = {}
        get_route_index = libsumo.vehicle.getRouteIndex
        get_distance = libsumo.vehicle.getDistance
        length, speed, min_stay = self._length, self._speed, self._min_stay
        while True:
            self._activate_departures()
            if self._deciding or self._n_live == 0:
                break
            if self.time >= cfg.horizon_s:
                for st in states.values():
                    if st.status not in ENDED:
                        self._end_agent(st, "truncated", "horizon", ended)
                break
            self._flush_routes()
            libsumo.simulationStep()
            self.sim_steps += 1
            self.time = libsumo.simulation.getTime()
            step = self.sim_steps
            self._edge_stats.clear()
            for vid in libsumo.simulation.getDepartedIDList():
                st = states.get(vid)
                if st is None:
                    self._bg_depart[vid] = self.time
                elif st.status == "driving":
                    st.inserted = True
                    self._order_seq += 1
                    st.order = self._order_seq  # behind every vehicle already checked every second
                    self._checks.setdefault(step, []).append(st)
            for vid in libsumo.simulation.getStartingTeleportIDList():
                st = states.get(vid)
                if st is None:
                    self.bg_teleports += 1
                elif st.status not in ENDED:
                    self.agent_teleports += 1
                    libsumo.vehicle.remove(vid)
                    self._end_agent(st, "failed", "teleported (stuck or collision)", ended)
            for vid in libsumo.simulation.getArrivedIDList():
                st = states.get(vid)
                if st is None:
                    t0 = self._bg_depart.pop(vid, None)
                    if t0 is not None:
                        self._bg_travel.append(self.time - t0)
                elif st.status not in ENDED:
                    self._catch_up(st, len(st.plan) + len(st.tail) - 1)
                    st.pos = len(st.plan) - 1
                    self._end_agent(st, "arrived", "", ended)
            # A vehicle's edge is checked from when it can first have left it (min stay), then every second
            # but for the seconds in which its odometer shows it cannot reach the edge's end yet (queues).
            # The odometer skips must not reorder decisions: agents that must decide join `_deciding` in
            # the order of the check list without them, ranked by `order` (a vehicle whose checks start
            # anew after a min stay goes first, a departing one last; see the assignments).
            checks = self._checks
            later = checks.setdefault(step + 1, [])
            moved: list[tuple[int, AgentState, int]] = []
            for st in checks.pop(step, ()):
                if st.status != "driving":
                    continue
                pos = get_route_index(st.vid)
                if pos == st.pos:
                    if st.odo0 < 0:
                        later.append(st)
                        continue
                    # it was at most `limit` m into the edge when it entered it (see below) and has driven
                    # `odometer - odo0` m since, at <= the limit
                    e = st.plan[pos]
                    skip = int((length[e] - (get_distance(st.vid) - st.odo0)) / speed[e]) - 1
                    if skip <= 1:
                        st.odo0 = -1.0  # the odometer only grows: no bound from now on
                else:
                    plan = st.plan
                    if pos >= len(plan):
                        self._catch_up(st, pos)
                    st.pos = pos
                    # it entered edge `pos` within the last second at <= the limit (speedDev 0): it cannot
                    # leave before length/limit - 1 s
                    skip = min_stay[plan[pos]]
                    moved.append((st.order, st, skip))
                if skip <= 1:
                    later.append(st)
                else:
                    checks.setdefault(step + skip, []).append(st)
            moved.sort(key=_first)
            for _, st, skip in moved:
                if self._needs_decision(st):
                    st.status = "deciding"
                    self._deciding[st.vid] = st
                if skip > 1:  # its checks start anew at step + skip
                    self._order_seq += 1
                    st.order = self._order_seq - (step + skip) * _ORDER_STRIDE
                    st.odo0 = get_distance(st.vid)
                else:
                    st.odo0 = -1.0
        return self._emit(ended, charge)

    def _activate_departures(self) -> None:
        while self._pending_i < len(self._pending) and self._pending[self._pending_i].depart <= self.time:
            st = self.agents_state[self._pending[self._pending_i].vid]
            self._pending_i += 1
            self._extend_forced(st)
            if self._needs_decision(st):
                st.status = "deciding"
                self._deciding[st.trip.vid] = st
            else:  # origin chain reaches the goal or the lookahead without a choice
                st.status = "driving"
            self._dirty[st.trip.vid] = st  # inserted into SUMO at the next flush

    def _emit(self, ended: dict[str, float], charge: bool = True):
        cfg = self.config
        obs: dict[str, np.ndarray] = {}
        rewards: dict[str, float] = {}
        terms: dict[str, bool] = {}
        truncs: dict[str, bool] = {}
        infos: dict[str, dict[str, Any]] = {}
        no_mask = np.zeros(cfg.a_max, dtype=bool)
        for st in list(self._deciding.values()):
            st.choice = cs = self._choice_set(st.plan[-1], st.trip.dest)
            st.candidates, st.cand_dist = cs.candidates, cs.dist
            if len(st.candidates) == 0:  # only on maps that are not strongly connected
                if st.in_sumo:
                    import libsumo

                    libsumo.vehicle.remove(st.vid)
                self._end_agent(st, "failed", f"dead end at edge {self.graph.edge_ids[st.plan[-1]]}", ended)
        for aid, r in ended.items():
            st = self.agents_state[aid]
            obs[aid] = np.zeros(cfg.obs_dim, dtype=np.float32)
            rewards[aid] = r
            terms[aid] = st.status in ("arrived", "failed")
            truncs[aid] = st.status == "truncated"
            infos[aid] = {
                "action_mask": no_mask.copy(),
                "candidates": [],
                "status": st.status,
                "reason": st.reason,
                "xy": self._position(st),
            }
        deciding = list(self._deciding.values())
        if deciding:
            feats, masks = self._observe_batch(deciding)
            ids = self.graph.edge_ids
            for i, st in enumerate(deciding):
                aid = st.trip.vid
                r = 0.0
                if charge:
                    r = -(self.time - st.t_last) / cfg.reward_time_scale_s
                    st.ret += r
                    st.t_last = self.time
                obs[aid] = feats[i]
                rewards[aid] = r
                terms[aid] = False
                truncs[aid] = False
                infos[aid] = {
                    "action_mask": masks[i],
                    "candidates": list(st.choice.names),
                    "edge": ids[st.plan[-1]],
                    "xy": self._position(st),
                    "status": "deciding",
                }
        return obs, rewards, terms, truncs, infos

    def _position(self, st: AgentState) -> tuple[float, float]:
        """The vehicle's (x, y); before insertion or after it ended, the start of its current edge."""
        if st.inserted and st.status in ("driving", "deciding"):
            import libsumo

            x, y = libsumo.vehicle.getPosition(st.trip.vid)
            return (float(x), float(y))
        e = st.plan[min(st.pos, len(st.plan) - 1)]
        return (float(self.graph.start_xy[e, 0]), float(self.graph.start_xy[e, 1]))

    def live_stats(self, e: int) -> tuple[float, float]:
        """(occupancy, mean speed) of edge `e` in the last step; one libsumo query per edge per step."""
        hit = self._edge_stats.get(e)
        if hit is None:  # an empty edge reports its speed limit as mean speed
            import libsumo

            eid = self.graph.edge_ids[e]
            hit = (libsumo.edge.getLastStepOccupancy(eid), libsumo.edge.getLastStepMeanSpeed(eid))
            self._edge_stats[e] = hit
        return hit

    def _observe_batch(self, sts: list[AgentState]) -> tuple[np.ndarray, np.ndarray]:
        """Observations and masks of the deciding agents. Plain Python over scalars: batches are a
        few agents with <= a_max candidates each, where numpy's per-call cost would dominate; the
        static part of each candidate's row comes from the agent's cached ChoiceSet."""
        cfg = self.config
        scale, horizon, a_max = self.graph.scale, cfg.horizon_s, cfg.a_max
        stats, live_stats = self._edge_stats, self.live_stats
        pad = [0.0] * len(CAND_FEATURES)
        flat: list[float] = []  # all rows: one conversion to an array
        masks = np.zeros((len(sts), a_max), dtype=bool)
        now = self.time
        for i, st in enumerate(sts):
            cs = st.choice
            k = len(cs.rows)
            masks[i, :k] = True
            dist_goal = cs.dist_goal
            flat += (
                1.0 - dist_goal / max(st.start_cost, 1.0),
                (now - st.trip.depart) / horizon,
                dist_goal / scale,
                k / a_max,
            )
            for c, length_km, speed_n, speed, dist_n, detour, heading, is_goal in cs.rows:
                occ, spd = stats.get(c) or live_stats(c)
                flat += (length_km, speed_n, occ, spd / speed, dist_n, detour, heading, is_goal)
            flat += pad * (a_max - k)
        return np.array(flat, dtype=np.float32).reshape(len(sts), cfg.obs_dim), masks

    GLOBAL_FEATURES = (
        "time",
        "pending",
        "on_road",
        "arrived",
        "ended_otherwise",
        "vehicles_per_capacity",
        "deciding",
        "background",
    )

    def global_state(self) -> np.ndarray:
        """Pooled global state (fixed size for any n, O(1) to compute): shares of agents in each
        state, network load, time. MAPPO's critic and QMIX's mixer read it."""
        import libsumo

        n = max(len(self.agents_state), 1)
        pending = len(self._pending) - self._pending_i
        vehicles = libsumo.vehicle.getIDCount()
        on_road = self._n_live - pending
        cap = max(capacity(self.graph), 1)
        return np.array(
            [
                self.time / self.config.horizon_s,
                pending / n,
                on_road / n,
                self._n_arrived / n,
                (n - self._n_live - self._n_arrived) / n,
                vehicles / cap,
                len(self._deciding) / n,
                max(vehicles - on_road, 0) / cap,
            ],
            dtype=np.float32,
        )

    # ---- helpers for reference policies -------------------------------------------------------------
    def shortest_choice(self, aid: str) -> int:
        return int(self.agents_state[aid].cand_dist.argmin())

    def fastest_choice(self, aid: str) -> int:
        """Candidate with the least live travel time to the goal (edge times refreshed periodically)."""
        import libsumo

        st = self.agents_state[aid]
        t_refresh, cache = self._fastest
        if t_refresh < 0 or self.time - t_refresh >= self.config.fastest_refresh_s:
            tt = np.array([libsumo.edge.getTraveltime(e) for e in self.graph.edge_ids], dtype=np.float64)
            tt = np.where(np.isfinite(tt) & (tt > 0), tt, self.graph.length / np.maximum(self.graph.speed, 0.1))
            self._fastest = (self.time, {-1: tt})
            t_refresh, cache = self._fastest
        dest = st.trip.dest
        if dest not in cache:
            cache[dest] = self.graph.cost_to(dest, cache[-1])
        cands = st.candidates
        return int(np.argmin(cache[dest][cands] + cache[-1][cands]))

    # ---- metrics -------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        sts = list(self.agents_state.values())
        arrived = [s for s in sts if s.status == "arrived"]
        travel = [s.end_time - s.trip.depart for s in arrived if s.end_time is not None]
        n = max(len(sts), 1)
        return {
            "agents": len(sts),
            "arrived": len(arrived),
            "failed": sum(s.status == "failed" for s in sts),
            "truncated": sum(s.status == "truncated" for s in sts),
            "active": sum(s.status in ("pending", "deciding", "driving") for s in sts),
            "arrival_rate": len(arrived) / n,
            "mean_travel_time": float(np.mean(travel)) if travel else float("nan"),
            # every agent counted, unfinished ones until the episode's end: comparable across policies
            # whose arrival rates differ (mean_travel_time alone favours policies that finish only short trips)
            "mean_time_censored": float(
                np.mean([(s.end_time if s.end_time is not None else self.time) - s.trip.depart for s in sts])
            )
            if sts
            else float("nan"),
            "mean_return": float(np.mean([s.ret for s in sts])) if sts else float("nan"),
            "agent_teleports": self.agent_teleports,
            "decisions": self.decisions,
            "invalid_actions": self.invalid_actions,
            "late_decisions": self.late_decisions,
            "sim_time": self.time,
            "sim_steps": self.sim_steps,
            "bg_vehicles": len(self.bg_trips),
            "bg_arrived": len(self._bg_travel),
            "bg_mean_travel_time": float(np.mean(self._bg_travel)) if self._bg_travel else float("nan"),
            "bg_teleports": self.bg_teleports,
        }

    @property
    def agents(self) -> list[str]:
        """Agents whose episode has not ended."""
        return [a for a, st in self.agents_state.items() if st.status not in ENDED]

    @property
    def deciding_agents(self) -> list[str]:
        return list(self._deciding)

    @property
    def done(self) -> bool:
        return self._n_live == 0

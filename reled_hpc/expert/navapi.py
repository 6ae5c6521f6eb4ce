"""The navigation API that LLM-written `plan(api)` programs call (SED), over a read-only snapshot.

Pure standard library on purpose: the sandbox child (`sandbox_child.py`) loads this file by path
under `python -I -S` and must start fast, so nothing heavy (numpy, scipy) and nothing from
`reled_hpc` may be imported here. The parent builds the snapshot (`sandbox.snapshot_from`).

Snapshot (plain JSON):
    {"edges": [{"id", "length", "speed_limit", "lanes", "start_xy", "end_xy", "name"}, ...],
     "successors": [[int, ...], ...],        # indices into "edges", per edge
     "occupancy": [float, ...],              # live congestion per edge, in [0, 1]
     "live_speed": [float, ...],             # live mean speed per edge, m/s
     "agents": [{"id", "edge", "dest", "xy"}, ...]}   # edge/dest are edge ids

Routing costs follow `RoadGraph.cost_to`: the cost of a route is the sum of the weights of the
edges it enters (the start edge excluded, the target included), weights clamped to MIN_WEIGHT.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from typing import Any

MIN_WEIGHT = 1e-3  # as roadgraph.MIN_WEIGHT: SUMO has 0.1 m edges, and Dijkstra needs positive weights
MIN_LIVE_SPEED = 1.0  # m/s: a jammed edge costs length / 1 m/s, not infinity
ROUTE_LEN_FACTOR = 4  # a route may hold at most ROUTE_LEN_FACTOR * number of edges entries
TREE_CACHE = 128  # Dijkstra trees kept (LRU); each holds up to one float per edge

# What the program may call on `api` (and, bound to the api, as plain functions). The sandbox's
# attribute allow-list is built from this tuple: keep it free of anything that exposes state.
PUBLIC_API = (
    "agents",
    "destination",
    "position",
    "xy",
    "route",
    "edges",
    "successors",
    "predecessors",
    "length",
    "speed_limit",
    "speed",
    "congestion",
    "travel_time",
    "lanes",
    "name",
    "edge_xy",
    "edges_near",
    "distance",
    "shortest_path",
    "fastest_path",
    "path_length",
    "path_time",
    "move_to_by_shortest_path",
    "move_to_by_fastest_path",
    "move_via",
    "avoid",
)


class NavError(Exception):
    """A navigation call failed (unknown agent or edge, unreachable target). Programs may catch it."""


class _Tree:
    """Resumable Dijkstra on the reversed graph towards one target: settles edges only until the
    queried source is settled, keeps its heap, and resumes for the next source (agents sharing a
    destination pay for one search between them)."""

    __slots__ = ("avoid", "dist", "done", "heap", "nxt", "pred", "weight")

    def __init__(self, target: int, weight: list[float], pred: list[list[int]], avoid: frozenset[int]) -> None:
        self.weight, self.pred, self.avoid = weight, pred, avoid
        self.dist: dict[int, float] = {target: 0.0}
        self.nxt: dict[int, int] = {}  # edge -> the edge to enter after it
        self.done: set[int] = set()
        self.heap: list[tuple[float, int]] = [(0.0, target)]

    def path(self, src: int) -> list[int] | None:
        dist, done, heap, nxt, w, pred, avoid = (
            self.dist,
            self.done,
            self.heap,
            self.nxt,
            self.weight,
            self.pred,
            self.avoid,
        )
        while src not in done and heap:
            d, u = heapq.heappop(heap)
            if u in done:
                continue
            done.add(u)
            if u in avoid:
                continue  # u may not be entered, so nothing reaches the target through it (starting on it is fine)
            nd = d + w[u]
            for p in pred[u]:
                if nd < dist.get(p, math.inf):
                    dist[p] = nd
                    nxt[p] = u
                    heapq.heappush(heap, (nd, p))
        if src not in done:
            return None
        out = [src]
        while out[-1] in nxt:  # every edge on the way has a smaller, hence settled, distance
            out.append(nxt[out[-1]])
        return out


class NavAPI:
    """The API a `plan(api)` program sees. Each agent's route starts at its current edge
    (`position(a)`); every `move_*` call appends to it from where it currently ends."""

    def __init__(self, snapshot: dict[str, Any]) -> None:
        edges = snapshot["edges"]
        self._ids: list[str] = [str(e["id"]) for e in edges]
        self._index = {e: i for i, e in enumerate(self._ids)}
        self._len = [float(e["length"]) for e in edges]
        self._limit = [float(e["speed_limit"]) for e in edges]
        self._lanes = [int(e.get("lanes", 1)) for e in edges]
        self._names = [str(e.get("name", "")) for e in edges]
        self._start = [(float(e["start_xy"][0]), float(e["start_xy"][1])) for e in edges]
        self._end = [(float(e["end_xy"][0]), float(e["end_xy"][1])) for e in edges]
        n = len(edges)
        self._succ: list[list[int]] = [[int(j) for j in s] for s in snapshot["successors"]]
        self._pred: list[list[int]] = [[] for _ in range(n)]
        for i, s in enumerate(self._succ):
            for j in s:
                self._pred[j].append(i)
        self._occ = [min(max(float(x), 0.0), 1.0) for x in snapshot.get("occupancy") or [0.0] * n]
        self._live = [float(x) for x in snapshot.get("live_speed") or self._limit]
        self._w = {
            "length": [max(x, MIN_WEIGHT) for x in self._len],
            "time": [max(ln / max(v, MIN_LIVE_SPEED), MIN_WEIGHT) for ln, v in zip(self._len, self._live, strict=True)],
        }
        self._agents: dict[str, dict[str, Any]] = {}
        for a in snapshot["agents"]:
            aid = str(a["id"])
            self._agents[aid] = {
                "edge": self._edge(a["edge"]),
                "dest": self._edge(a["dest"]),
                "xy": (float(a["xy"][0]), float(a["xy"][1])),
            }
        self._routes: dict[str, list[int]] = {a: [s["edge"]] for a, s in self._agents.items()}
        self._avoid: dict[str, frozenset[int]] = {a: frozenset() for a in self._agents}
        self._trees: OrderedDict[tuple[int, str, frozenset[int]], _Tree] = OrderedDict()
        self.max_route_len = ROUTE_LEN_FACTOR * max(n, 1)

    # ---- lookups -------------------------------------------------------------------------
    def _edge(self, e: Any) -> int:
        i = self._index.get(e) if isinstance(e, str) else None
        if i is None:
            raise NavError(f"unknown edge {e!r}")
        return i

    def _agent(self, a: Any) -> str:
        if not isinstance(a, str) or a not in self._agents:
            raise NavError(f"unknown agent {a!r}")
        return a

    # ---- agents --------------------------------------------------------------------------
    def agents(self) -> list[str]:
        """Ids of the agents this program routes."""
        return list(self._agents)

    def destination(self, a: str) -> str:
        """The agent's destination edge: every route must end there."""
        return self._ids[self._agents[self._agent(a)]["dest"]]

    def position(self, a: str) -> str:
        """The agent's current edge: every route starts there."""
        return self._ids[self._agents[self._agent(a)]["edge"]]

    def xy(self, a: str) -> tuple[float, float]:
        """The agent's (x, y) in network coordinates (metres)."""
        return self._agents[self._agent(a)]["xy"]

    def route(self, a: str) -> list[str]:
        """The agent's route so far (a copy), its current edge first."""
        return [self._ids[i] for i in self._routes[self._agent(a)]]

    # ---- edges ---------------------------------------------------------------------------
    def edges(self) -> list[str]:
        return list(self._ids)

    def successors(self, edge: str) -> list[str]:
        """Edges that can be entered from the end of `edge`."""
        return [self._ids[j] for j in self._succ[self._edge(edge)]]

    def predecessors(self, edge: str) -> list[str]:
        return [self._ids[j] for j in self._pred[self._edge(edge)]]

    def length(self, edge: str) -> float:
        return self._len[self._edge(edge)]

    def speed_limit(self, edge: str) -> float:
        return self._limit[self._edge(edge)]

    def speed(self, edge: str) -> float:
        """Live mean speed (m/s); the speed limit on an empty edge."""
        return self._live[self._edge(edge)]

    def congestion(self, edge: str) -> float:
        """Live occupancy in [0, 1] (share of the edge covered by vehicles)."""
        return self._occ[self._edge(edge)]

    def travel_time(self, edge: str) -> float:
        """length / max(live speed, 1 m/s), seconds: the fastest-path weight."""
        return self._w["time"][self._edge(edge)]

    def lanes(self, edge: str) -> int:
        return self._lanes[self._edge(edge)]

    def name(self, edge: str) -> str:
        """Street name ('' when OSM has none)."""
        return self._names[self._edge(edge)]

    def edge_xy(self, edge: str) -> tuple[tuple[float, float], tuple[float, float]]:
        """((x, y) of the start, (x, y) of the end) of `edge`."""
        i = self._edge(edge)
        return self._start[i], self._end[i]

    def edges_near(self, xy: Any, radius: float) -> list[str]:
        """Edges whose straight start-end segment passes within `radius` metres of `xy`, nearest first."""
        x, y, r = float(xy[0]), float(xy[1]), float(radius)
        hits = []
        for i, ((x0, y0), (x1, y1)) in enumerate(zip(self._start, self._end, strict=True)):
            dx, dy = x1 - x0, y1 - y0
            seg = dx * dx + dy * dy
            t = 0.0 if seg <= 0 else min(max(((x - x0) * dx + (y - y0) * dy) / seg, 0.0), 1.0)
            d = math.hypot(x - (x0 + t * dx), y - (y0 + t * dy))
            if d <= r:
                hits.append((d, i))
        hits.sort()
        return [self._ids[i] for _, i in hits]

    def distance(self, xy1: Any, xy2: Any) -> float:
        """Straight-line distance (m) between two (x, y) points."""
        return math.hypot(float(xy1[0]) - float(xy2[0]), float(xy1[1]) - float(xy2[1]))

    # ---- paths (no side effects) -----------------------------------------------------------
    def _path(self, src: int, dst: int, kind: str, avoid: frozenset[int]) -> list[int]:
        if dst in avoid:
            raise NavError(f"target edge {self._ids[dst]!r} is in the avoided set")
        if src == dst:
            return [src]
        key = (dst, kind, avoid)
        tree = self._trees.get(key)
        if tree is None:
            tree = self._trees[key] = _Tree(dst, self._w[kind], self._pred, avoid)
            if len(self._trees) > TREE_CACHE:
                self._trees.popitem(last=False)
        else:
            self._trees.move_to_end(key)
        path = tree.path(src)
        if path is None:
            why = " without the avoided edges" if avoid else ""
            raise NavError(f"edge {self._ids[dst]!r} is unreachable from {self._ids[src]!r}{why}")
        return path

    def shortest_path(self, from_edge: str, to_edge: str) -> list[str]:
        """Shortest edge sequence (by length) from `from_edge` to `to_edge`, both included."""
        return [self._ids[i] for i in self._path(self._edge(from_edge), self._edge(to_edge), "length", frozenset())]

    def fastest_path(self, from_edge: str, to_edge: str) -> list[str]:
        """Fastest edge sequence (by live travel time) from `from_edge` to `to_edge`, both included."""
        return [self._ids[i] for i in self._path(self._edge(from_edge), self._edge(to_edge), "time", frozenset())]

    def fastest_path_avoiding(self, from_edge: str, to_edge: str, avoid: Any) -> list[str]:
        """fastest_path without entering `avoid` (edge ids). For the parent's revision menus (revision.py),
        not in PUBLIC_API: programs have `avoid` and the move_* calls for this."""
        banned = frozenset(self._edge(e) for e in avoid)
        return [self._ids[i] for i in self._path(self._edge(from_edge), self._edge(to_edge), "time", banned)]

    def path_length(self, path: Any) -> float:
        """Metres driven along `path` (the edges entered: the first edge excluded)."""
        return sum(self._w["length"][self._edge(e)] for e in list(path)[1:])

    def path_time(self, path: Any) -> float:
        """Live travel time (s) along `path` (the first edge excluded)."""
        return sum(self._w["time"][self._edge(e)] for e in list(path)[1:])

    # ---- moves (append to an agent's route) -------------------------------------------------
    def _append(self, a: str, path: list[int]) -> list[str]:
        route = self._routes[a]
        if len(route) + len(path) - 1 > self.max_route_len:
            raise NavError(f"route of agent {a!r} would exceed {self.max_route_len} edges")
        route.extend(path[1:])
        return [self._ids[i] for i in route]

    def _move(self, a: Any, target: Any, kind: str) -> list[str]:
        a = self._agent(a)
        return self._append(a, self._path(self._routes[a][-1], self._edge(target), kind, self._avoid[a]))

    def move_to_by_shortest_path(self, a: str, target_edge: str) -> list[str]:
        """Extend the agent's route by the shortest path to `target_edge`; returns the whole route."""
        return self._move(a, target_edge, "length")

    def move_to_by_fastest_path(self, a: str, target_edge: str) -> list[str]:
        """Extend the agent's route by the fastest path (live travel times) to `target_edge`."""
        return self._move(a, target_edge, "time")

    def move_via(self, a: str, waypoints: Any) -> list[str]:
        """Extend the agent's route by shortest paths through `waypoints` (edge ids), in order."""
        a = self._agent(a)
        if isinstance(waypoints, str):
            waypoints = [waypoints]
        targets = [self._edge(w) for w in waypoints]
        route_len = len(self._routes[a])
        try:
            for t in targets:
                self._append(a, self._path(self._routes[a][-1], t, "length", self._avoid[a]))
        except NavError:
            del self._routes[a][route_len:]  # all or nothing: a failed waypoint leaves the route as it was
            raise
        return [self._ids[i] for i in self._routes[a]]

    def avoid(self, a: str, edges: Any) -> None:
        """Later routing calls for agent `a` will not enter `edges` (added to its avoided set).
        Raises NavError if the agent's destination becomes unreachable from its route's end."""
        a = self._agent(a)
        if isinstance(edges, str):
            edges = [edges]
        new = self._avoid[a] | {self._edge(e) for e in edges}
        dest = self._agents[a]["dest"]
        if dest in new:
            raise NavError(f"cannot avoid the destination {self._ids[dest]!r} of agent {a!r}")
        self._path(self._routes[a][-1], dest, "length", new)  # raises if this disconnects the agent
        self._avoid[a] = new

    # ---- for the sandbox runner ---------------------------------------------------------------
    def bindings(self) -> dict[str, Any]:
        """The public API as plain functions bound to this instance (for `move_to_by_shortest_path(a, t)` style)."""
        return {name: getattr(self, name) for name in PUBLIC_API}

    def accumulated_routes(self) -> dict[str, list[str]]:
        return {a: [self._ids[i] for i in r] for a, r in self._routes.items()}

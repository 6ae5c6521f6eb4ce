"""The routing graph of a SUMO network: SUMO edges as nodes, allowed passenger connections as arcs.

Routes in SUMO are sequences of SUMO edges, so shortest paths, candidate sets and distances to a
goal are computed on this edge graph (not on osmnx's OSM graph, whose ways netconvert splits and
joins). Costs to a destination come from one Dijkstra on the reversed graph (scipy), cached per
destination and metric ("length" in metres, "time": free-flow seconds at the speed limit), so a
query is O(1) after the first.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import dijkstra

MIN_WEIGHT = 1e-3  # scipy treats explicit zeros as missing arcs; SUMO has 0.1 m edges
MIN_SPEED = 0.1  # m/s: a speed limit of 0 would make an edge's free-flow time infinite
Metric = Literal["length", "time"]
METRICS: tuple[Metric, ...] = ("length", "time")


@dataclass
class RoadGraph:
    edge_ids: list[str]
    length: np.ndarray  # metres
    speed: np.ndarray  # speed limit, m/s
    lanes: np.ndarray
    start_xy: np.ndarray  # (E, 2) first shape point, network coordinates (m)
    end_xy: np.ndarray  # (E, 2) last shape point
    names: list[str]
    succ_ptr: np.ndarray  # CSR over successors: succ_idx[succ_ptr[e]:succ_ptr[e+1]]
    succ_idx: np.ndarray

    def __post_init__(self) -> None:
        self.index = {e: i for i, e in enumerate(self.edge_ids)}
        n = len(self.edge_ids)
        src = np.repeat(np.arange(n), np.diff(self.succ_ptr))
        # reversed graph: arc f -> e weighted by the cost of entering f
        order = np.lexsort((src, self.succ_idx))
        self._rev_rows = self.succ_idx[order]
        self._rev_cols = src[order]
        self._rev_ptr = np.zeros(n + 1, dtype=np.int64)
        np.add.at(self._rev_ptr, self._rev_rows + 1, 1)
        self._rev_ptr = np.cumsum(self._rev_ptr)
        # free-flow travel time (s): what all-or-nothing assignment and duarouter's empty-network routes minimise
        self.free_flow_time = self.length / np.maximum(self.speed, MIN_SPEED)
        self._caches: dict[str, OrderedDict[int, np.ndarray]] = {m: OrderedDict() for m in METRICS}
        self._dist_cache = self._caches["length"]
        self.out_degree = np.diff(self.succ_ptr)
        pts = np.vstack([self.start_xy, self.end_xy]) if n else np.zeros((1, 2))
        self.bbox = (float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max()))
        x0, y0, x1, y1 = self.bbox
        # the map's length scale (bbox diagonal, m), used to normalise distances
        self.scale = float(max(np.hypot(x1 - x0, y1 - y0), 1.0))

    # ---- basic queries -------------------------------------------------------------------
    @property
    def n_edges(self) -> int:
        return len(self.edge_ids)

    def successors(self, e: int) -> np.ndarray:
        return self.succ_idx[self.succ_ptr[e] : self.succ_ptr[e + 1]]

    # ---- distances -------------------------------------------------------------------------
    def metric_weights(self, metric: Metric) -> np.ndarray:
        """Edge weights of a named metric: "length" (m) or "time" (free-flow seconds, length / speed limit)."""
        if metric == "length":
            return self.length
        if metric == "time":
            return self.free_flow_time
        raise ValueError(f"unknown metric {metric!r} (one of {', '.join(METRICS)})")

    def cost_to(self, dest: int, weights: np.ndarray | None = None, metric: Metric = "length") -> np.ndarray:
        """Cost from the END of every edge to the end of `dest` (sum of the weights of the edges
        entered on the way, `dest` included). Without `weights` the edges weigh `metric`
        (see metric_weights), cached per destination."""
        w = self.metric_weights(metric) if weights is None else weights
        cache = self._caches[metric] if weights is None else None
        if cache is not None:
            hit = cache.get(dest)
            if hit is not None:
                cache.move_to_end(dest)
                return hit
        data = np.maximum(w[self._rev_rows], MIN_WEIGHT)
        n = self.n_edges
        mat = csr_matrix((data, self._rev_cols, self._rev_ptr), shape=(n, n))
        dist = dijkstra(mat, directed=True, indices=dest)
        if cache is not None:
            cache[dest] = dist
            if len(cache) > 4096:  # bounded: large maps have many destinations
                cache.popitem(last=False)
        return dist

    def route(self, origin: int, dest: int, weights: np.ndarray | None = None, metric: Metric = "length") -> list[int]:
        """Cheapest edge sequence from `origin` to `dest` (both included), by `weights` or else `metric`."""
        w = self.metric_weights(metric) if weights is None else weights
        dist = self.cost_to(dest, weights, metric)
        if not np.isfinite(dist[origin]):
            raise ValueError(f"edge {self.edge_ids[dest]} is unreachable from {self.edge_ids[origin]}")
        path = [origin]
        cur = origin
        while cur != dest:
            succ = self.successors(cur)
            cur = int(succ[np.argmin(np.maximum(w[succ], MIN_WEIGHT) + dist[succ])])
            path.append(cur)
        return path

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_json(self, path: Path) -> None:
        data = {
            "edge_ids": self.edge_ids,
            "length": self.length.round(3).tolist(),
            "speed": self.speed.round(3).tolist(),
            "lanes": self.lanes.tolist(),
            "start_xy": self.start_xy.round(2).tolist(),
            "end_xy": self.end_xy.round(2).tolist(),
            "names": self.names,
            "succ_ptr": self.succ_ptr.tolist(),
            "succ_idx": self.succ_idx.tolist(),
        }
        path.write_text(json.dumps(data))

    @classmethod
    def from_json(cls, path: Path) -> RoadGraph:
        d = json.loads(Path(path).read_text())
        return cls(
            edge_ids=d["edge_ids"],
            length=np.asarray(d["length"], dtype=np.float64),
            speed=np.asarray(d["speed"], dtype=np.float64),
            lanes=np.asarray(d["lanes"], dtype=np.int64),
            start_xy=np.asarray(d["start_xy"], dtype=np.float64).reshape(-1, 2),
            end_xy=np.asarray(d["end_xy"], dtype=np.float64).reshape(-1, 2),
            names=d["names"],
            succ_ptr=np.asarray(d["succ_ptr"], dtype=np.int64),
            succ_idx=np.asarray(d["succ_idx"], dtype=np.int64),
        )

    @classmethod
    def from_sumo_net(cls, net_file: Path, keep: set[str] | None = None) -> RoadGraph:
        """Build from a .net.xml (sumolib), restricted to passenger edges (and `keep` if given)."""
        import sumolib

        net = sumolib.net.readNet(str(net_file), withInternal=False)
        edges = [
            e
            for e in net.getEdges()
            if e.getFunction() != "internal" and e.allows("passenger") and (keep is None or e.getID() in keep)
        ]
        edges.sort(key=lambda e: e.getID())
        index = {e.getID(): i for i, e in enumerate(edges)}
        ptr = [0]
        idx: list[int] = []
        for e in edges:
            succ = sorted(
                {
                    index[f.getID()]
                    for f, conns in e.getOutgoing().items()
                    if f.getID() in index
                    and any(c.getFromLane().allows("passenger") and c.getToLane().allows("passenger") for c in conns)
                }
            )
            idx.extend(succ)
            ptr.append(len(idx))
        return cls(
            edge_ids=[e.getID() for e in edges],
            length=np.array([e.getLength() for e in edges], dtype=np.float64),
            speed=np.array([e.getSpeed() for e in edges], dtype=np.float64),
            lanes=np.array([e.getLaneNumber() for e in edges], dtype=np.int64),
            start_xy=np.array([e.getShape()[0] for e in edges], dtype=np.float64).reshape(-1, 2),
            end_xy=np.array([e.getShape()[-1] for e in edges], dtype=np.float64).reshape(-1, 2),
            names=[e.getName() or "" for e in edges],
            succ_ptr=np.asarray(ptr, dtype=np.int64),
            succ_idx=np.asarray(idx, dtype=np.int64),
        )

    def largest_scc(self) -> set[str]:
        """Edge ids of the largest strongly connected component (every edge reaches every other)."""
        from scipy.sparse.csgraph import connected_components

        n = self.n_edges
        mat = csr_matrix((np.ones(len(self.succ_idx)), self.succ_idx, self.succ_ptr), shape=(n, n))
        _, labels = connected_components(mat, directed=True, connection="strong")
        if n == 0:
            return set()
        big = np.bincount(labels).argmax()
        return {self.edge_ids[i] for i in np.flatnonzero(labels == big)}

"""Demand from a file, as trips over a RoadGraph's edges.

Two formats:
  SUMO XML  `<trip from= to= depart=>`; `<vehicle>` with a `<route edges=>` child, a `route=`
            reference to a top-level `<route id=>`, or from/to attributes; `<flow>` (any of these
            three ways) expanded with begin/end and number, period or vehsPerHour. Read with expat
            (streamed, plain or gzipped), so every error names its line.
  URB CSV   URB/RouteRL's `agents.csv` (columns id, start_time, origin, destination[, kind]) whose
            origin/destination are indices into the "origins"/"destinations" edge-id lists of the
            `od_<network>.txt` next to it (a Python literal, read with ast.literal_eval).

Every edge must be in the graph (a map build may have cut it from the net) and every trip must have
a path from origin to destination; any defect is a ConfigError naming the file and the line or id.
"""

from __future__ import annotations

import ast
import csv
import gzip
import math
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import IO, Any
from xml.parsers import expat

import numpy as np

from ..errors import ConfigError
from .roadgraph import RoadGraph

XML_SUFFIXES = (".rou.xml", ".trips.xml", ".rou.xml.gz", ".trips.xml.gz")
URB_COLUMNS = ("id", "start_time", "origin", "destination")
AGENT_KINDS = frozenset({"av", "cav", "machine", "agent", "rl"})  # RouteRL names learning agents "AV"
HUMAN_KINDS = frozenset({"human", "hv"})
FLOW_END_S = 86400.0  # SUMO's default duration of a flow without `end`
MAX_TRIPS = 2_000_000  # bounds memory when a flow's period is tiny


@dataclass(frozen=True)
class FileTrip:
    vid: str
    depart: float
    origin: int
    dest: int
    route: tuple[int, ...] | None
    agent: bool | None


def read_demand(path: str | Path, graph: RoadGraph) -> list[FileTrip]:
    """The trips of a demand file (SUMO XML, or URB's agents.csv with its od file), sorted by departure.
    `path` may be the file or a folder holding one: a folder's agents.csv (else its one .csv), else
    its one *.rou.xml / *.trips.xml (plain or .gz)."""
    file = _demand_file(Path(path))
    reach = _Reach(graph)
    if file.name.lower().endswith(".csv"):
        trips = _read_urb(file, graph, reach)
    else:
        trips = _XmlDemand(file, graph, reach).read()
    if not trips:
        raise ConfigError(f"demand file {file} holds no trips")
    return sorted(trips, key=lambda t: t.depart)  # stable: ties keep the file's order


def _demand_file(path: Path) -> Path:
    if not path.exists():
        raise ConfigError(f"demand file {path} does not exist")
    if not path.is_dir():
        return path
    if (path / "agents.csv").is_file():
        return path / "agents.csv"
    csvs = sorted(p for p in path.iterdir() if p.name.lower().endswith(".csv"))
    xmls = sorted(p for p in path.iterdir() if p.name.lower().endswith(XML_SUFFIXES))
    for found in (csvs, xmls):
        if len(found) > 1:
            raise ConfigError(f"demand folder {path} holds several demand files ({', '.join(p.name for p in found)})")
        if found:
            return found[0]
    raise ConfigError(f"demand folder {path} holds no demand file (agents.csv, *.rou.xml or *.trips.xml)")


class _Reach:
    """Whether a trip's destination is reachable from its origin. Quick when both lie in one strongly
    connected component, or the origin reaches the largest one and the destination is reached from
    it (a SUMO scenario's entries and exits); otherwise one cached Dijkstra per destination."""

    def __init__(self, graph: RoadGraph) -> None:
        from scipy.sparse import csr_matrix
        from scipy.sparse.csgraph import breadth_first_order, connected_components

        self.graph = graph
        n = graph.n_edges
        mat = csr_matrix((np.ones(len(graph.succ_idx)), graph.succ_idx, graph.succ_ptr), shape=(n, n))
        self.n_comp, self.labels = connected_components(mat, directed=True, connection="strong")
        self.to_core = np.zeros(n, dtype=bool)
        self.from_core = np.zeros(n, dtype=bool)
        if n and self.n_comp > 1:
            seed = int(np.flatnonzero(self.labels == np.bincount(self.labels).argmax())[0])
            self.from_core[breadth_first_order(mat, seed, directed=True, return_predecessors=False)] = True
            self.to_core[breadth_first_order(mat.T.tocsr(), seed, directed=True, return_predecessors=False)] = True

    def ok(self, o: int, d: int) -> bool:
        if self.n_comp <= 1 or self.labels[o] == self.labels[d] or (self.to_core[o] and self.from_core[d]):
            return True
        return bool(np.isfinite(self.graph.cost_to(d)[o]))


def _edge(graph: RoadGraph, eid: str, where: str) -> int:
    i = graph.index.get(eid)
    if i is None:
        raise ConfigError(
            f"{where}: edge {eid!r} is not in the map (not in the SUMO net, or cut from it by the map build; "
            f"the map has {graph.n_edges} edges)"
        )
    return i


def _check_trip(graph: RoadGraph, reach: _Reach, o: int, d: int, where: str) -> None:
    if not reach.ok(o, d):
        raise ConfigError(f"{where}: no path in the map from edge {graph.edge_ids[o]!r} to edge {graph.edge_ids[d]!r}")


# ---- URB / RouteRL ----------------------------------------------------------------------------------
def _od_lists(csv_file: Path) -> tuple[Path, list[str], list[str]]:
    ods = sorted(csv_file.parent.glob("od_*.txt"))
    if not ods:
        raise ConfigError(f"{csv_file}: no od_<network>.txt next to it (the origin/destination edge lists)")
    if len(ods) > 1:
        raise ConfigError(f"{csv_file}: several od files next to it ({', '.join(p.name for p in ods)}); keep one")
    od = ods[0]
    try:
        data = ast.literal_eval(od.read_text())
    except (SyntaxError, ValueError, MemoryError, RecursionError) as exc:
        raise ConfigError(f"{od} does not parse as a Python literal: {exc}") from exc
    lists = []
    for key in ("origins", "destinations"):
        value = data.get(key) if isinstance(data, dict) else None
        if not isinstance(value, list | tuple) or not all(isinstance(e, str | int) for e in value):
            raise ConfigError(f"{od}: expected a dict with a list of edge ids under {key!r}")
        lists.append([str(e) for e in value])
    return od, lists[0], lists[1]


def _agent_kind(kind: str, where: str) -> bool | None:
    k = kind.strip().lower()
    if not k:
        return None
    if k in AGENT_KINDS:
        return True
    if k in HUMAN_KINDS:
        return False
    raise ConfigError(f"{where}: unknown kind {kind!r} (learning agents: AV; others: Human)")


def _read_urb(file: Path, graph: RoadGraph, reach: _Reach) -> list[FileTrip]:
    trips: list[FileTrip] = []
    seen: set[str] = set()
    with open(file, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        if not all(c in columns for c in URB_COLUMNS):
            raise ConfigError(
                f"{file} is not a URB agents CSV: its columns are {columns}, "
                f"need {', '.join(URB_COLUMNS)} (and optionally kind)"
            )
        reader.fieldnames = columns
        od, origins, dests = _od_lists(file)
        for row in reader:
            vid = (row.get("id") or "").strip()
            where = f"{file} line {reader.line_num} (id {vid})"
            if not vid:
                raise ConfigError(f"{where}: empty id")
            if vid in seen:
                raise ConfigError(f"{where}: duplicate id")
            seen.add(vid)
            depart = _seconds(row.get("start_time") or "", f"{where}: start_time")
            ends = []
            for col, ids, what in (("origin", origins, "origins"), ("destination", dests, "destinations")):
                text = (row.get(col) or "").strip()
                try:
                    k = int(text)
                except ValueError:
                    raise ConfigError(f"{where}: {col} {text!r} is not an index into {od.name}") from None
                if not 0 <= k < len(ids):
                    raise ConfigError(f"{where}: {col} index {k} is out of range: {od.name} has {len(ids)} {what}")
                ends.append(_edge(graph, ids[k], f"{where}: {col} {k} of {od.name}"))
            _check_trip(graph, reach, ends[0], ends[1], where)
            agent = _agent_kind(row.get("kind") or "", where) if "kind" in columns else None
            trips.append(FileTrip(vid, depart, ends[0], ends[1], None, agent))
    return trips


# ---- SUMO XML -------------------------------------------------------------------------------------
def _number(text: str, where: str) -> float:
    """A finite, non-negative number."""
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"{where}: {text!r} is not finite")
    if value < 0:
        raise ConfigError(f"{where}: negative value {text!r}")
    return value


def _seconds(text: str, where: str) -> float:
    """A SUMO time: seconds, or [[d:]h:]m:s; finite and >= 0."""
    parts = text.strip().split(":")
    if len(parts) > 4:
        raise ConfigError(f"{where}: {text!r} is not a time")
    factors = (86400.0, 3600.0, 60.0, 1.0)[-len(parts) :]
    return sum(f * _number(p, where) for f, p in zip(factors, parts, strict=True))


def _open(path: Path) -> IO[bytes]:
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


class _XmlDemand:
    """Streaming reader of a SUMO routes/trips file (expat: bounded memory, line numbers)."""

    VEHICLES = ("vehicle", "trip", "flow")

    def __init__(self, path: Path, graph: RoadGraph, reach: _Reach) -> None:
        self.path, self.graph, self.reach = path, graph, reach
        self.parser = expat.ParserCreate()
        self.parser.StartElementHandler = self._start
        self.parser.EndElementHandler = self._end
        self.depth = 0
        self.routes: dict[str, tuple[str, int]] = {}  # top-level named routes: edges text, line
        self.current: dict[str, Any] | None = None  # the vehicle/trip/flow being read
        self.trips: list[FileTrip] = []
        self.ids: set[str] = set()

    def read(self) -> list[FileTrip]:
        try:
            with _open(self.path) as f:
                self.parser.ParseFile(f)
        except expat.ExpatError as exc:
            raise ConfigError(
                f"{self.path} is not SUMO demand XML (nor a URB agents CSV): line {exc.lineno}: "
                f"{expat.ErrorString(exc.code)}"
            ) from None
        except (OSError, EOFError) as exc:
            raise ConfigError(f"{self.path} cannot be read: {exc}") from exc
        return self.trips

    def _where(self, line: int, tag: str = "", vid: str = "") -> str:
        return f"{self.path}:{line}" + (f" ({tag} {vid!r})" if tag else "")

    def _start(self, tag: str, attrs: dict[str, str]) -> None:
        line = self.parser.CurrentLineNumber
        self.depth += 1
        if self.depth == 1:
            if tag == "net":
                raise ConfigError(f"{self.path} is a SUMO network, not demand (root <net>)")
            if tag not in ("routes", "trips"):
                raise ConfigError(f"{self.path} is not SUMO demand XML: root element <{tag}>, expected <routes>")
        elif self.depth == 2:
            if tag == "route":
                rid = attrs.get("id")
                if not rid or "edges" not in attrs:
                    raise ConfigError(f"{self._where(line)}: a top-level <route> needs id and edges")
                self.routes[rid] = (attrs["edges"], line)
            elif tag in self.VEHICLES:
                self.current = {"tag": tag, "attrs": attrs, "line": line, "route": None}
        elif self.depth == 3 and self.current is not None:
            if tag == "route":
                if "edges" not in attrs:
                    raise ConfigError(f"{self._where(line)}: <route> without edges")
                self.current["route"] = (attrs["edges"], line)
            elif tag == "routeDistribution":
                raise ConfigError(f"{self._where(line)}: route distributions are not supported")

    def _end(self, tag: str) -> None:
        self.depth -= 1
        if self.depth == 1 and self.current is not None and tag == self.current["tag"]:
            self._vehicle(**self.current)
            self.current = None

    def _route(self, edges_text: str, where: str) -> tuple[int, ...]:
        route = tuple(_edge(self.graph, e, where) for e in edges_text.split())
        if not route:
            raise ConfigError(f"{where}: empty route")
        for a, b in pairwise(route):
            if b not in self.graph.successors(a):
                raise ConfigError(
                    f"{where}: the route is broken: edge {self.graph.edge_ids[a]!r} does not lead to "
                    f"{self.graph.edge_ids[b]!r} in the map"
                )
        return route

    def _vehicle(self, tag: str, attrs: dict[str, str], line: int, route: tuple[str, int] | None) -> None:
        vid = attrs.get("id", "")
        where = self._where(line, tag, vid)
        if not vid:
            raise ConfigError(f"{self._where(line)}: <{tag}> without id")
        if "via" in attrs:
            raise ConfigError(f"{where}: via is not supported (give the route's edges instead)")
        edges: tuple[int, ...] | None = None
        if route is not None:
            edges = self._route(route[0], where)
        elif "route" in attrs:
            named = self.routes.get(attrs["route"])
            if named is None:
                raise ConfigError(
                    f"{where}: route {attrs['route']!r} is not defined before it "
                    "(route distributions are not supported)"
                )
            edges = self._route(named[0], f"{where}, route {attrs['route']!r} of line {named[1]}")
        if edges is not None:
            o, d = edges[0], edges[-1]
        elif "from" in attrs and "to" in attrs:
            o, d = _edge(self.graph, attrs["from"], where), _edge(self.graph, attrs["to"], where)
            _check_trip(self.graph, self.reach, o, d, where)
        else:
            raise ConfigError(f"{where}: needs from and to edges or a route (TAZ and junction trips are not supported)")
        if tag == "flow":
            departs = _flow_departs(attrs, where)
            vids = [f"{vid}.{i}" for i in range(len(departs))]
        else:
            if "depart" not in attrs:
                raise ConfigError(f"{where}: no depart")
            departs, vids = [_seconds(attrs["depart"], f"{where}: depart")], [vid]
        if vid in self.ids:
            raise ConfigError(f"{where}: duplicate id")
        self.ids.add(vid)
        if len(self.trips) + len(departs) > MAX_TRIPS:
            raise ConfigError(f"{where}: the file expands to more than {MAX_TRIPS} trips")
        self.trips.extend(FileTrip(v, t, o, d, edges, None) for v, t in zip(vids, departs, strict=True))


def _flow_departs(attrs: dict[str, str], where: str) -> list[float]:
    """Departure times of a flow, as SUMO spaces them: every `period` (or 3600 / vehsPerHour) from
    begin while before end, at most `number`; or `number` evenly over [begin, end)."""
    if "probability" in attrs or attrs.get("period", "").startswith("exp("):
        raise ConfigError(f"{where}: random flows (probability, period=exp(...)) are not supported")
    begin = _seconds(attrs.get("begin", "0"), f"{where}: begin")
    end = _seconds(attrs["end"], f"{where}: end") if "end" in attrs else begin + FLOW_END_S
    if end < begin:
        raise ConfigError(f"{where}: end {end} is before begin {begin}")
    number = None
    if "number" in attrs:
        try:
            number = int(attrs["number"])
        except ValueError:
            raise ConfigError(f"{where}: number {attrs['number']!r} is not an integer") from None
        if number < 0:
            raise ConfigError(f"{where}: negative number {number}")
    if "vehsPerHour" in attrs:
        rate = _number(attrs["vehsPerHour"], f"{where}: vehsPerHour")
        if rate <= 0:
            raise ConfigError(f"{where}: vehsPerHour must be > 0")
        period: float | None = 3600.0 / rate
    elif "period" in attrs:
        period = _seconds(attrs["period"], f"{where}: period")
        if period <= 0:
            raise ConfigError(f"{where}: period must be > 0")
    else:
        period = None
    if period is None:
        if number is None:
            raise ConfigError(f"{where}: a flow needs number, period or vehsPerHour")
        period = (end - begin) / number if number else 0.0
        count = number
    else:
        if number is not None and "end" in attrs:
            raise ConfigError(f"{where}: with period or vehsPerHour, give end or number, not both (as SUMO)")
        count = number if number is not None else math.ceil((end - begin) / period) if end > begin else 0
    if count > MAX_TRIPS:
        raise ConfigError(f"{where}: the flow expands to {count} trips, more than {MAX_TRIPS}")
    return [begin + i * period for i in range(count)]

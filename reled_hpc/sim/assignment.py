"""Dynamic user equilibrium (DUE) routes of a scenario, from SUMO's own `duaIterate.py`.

duaIterate alternates duarouter (each vehicle picks among its route alternatives by Gawron's
stochastic choice, on the edge travel times the previous simulation measured) and a SUMO run (which
measures them again), `iterations` times. Step 0 routes on an empty network: free-flow
all-or-nothing, though duarouter also counts junction (internal lane) times and turn penalties,
which the `free_flow` policy's edge graph does not. The routes of the last simulated step are the
assignment.

Each call runs in a temporary folder and keeps its result on disk under
`maps.cache_dir()/assignments/`, keyed by the net file's hash, the trips and every option, so the
same scenario is assigned once (a repeated call reads one small JSON file).

Convergence is reported three ways (docs/references.md): duaIterate's own criterion (relative
standard deviation of the mean trip duration over the last steps), the share of vehicles whose route
changed in the last step, and the relative gap of the last step: the excess of the routes' cost over
each vehicle's cheapest route, both on the last step's measured edge times of its departure interval.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from xml.sax.saxutils import quoteattr

import numpy as np

from ..errors import ReledError
from .demand import Trip
from .maps import MapBundle, cache_dir
from .roadgraph import RoadGraph
from .sumo_tools import sumo_home

ASSIGNMENT_VERSION = 1  # bump when the output changes: invalidates cached assignments
DEFAULT_ITERATIONS = 20
ITERATIONS_ENV = "RELED_HPC_DUE_ITERATIONS"  # overrides DEFAULT_ITERATIONS for the `due` reference policy
BACKGROUND_ENV = "RELED_HPC_DUE_BACKGROUND"  # "equilibrium" (default) or "fixed", for the `due` reference policy
CONVERGENCE_WINDOW = 10  # duaIterate's --convergence-iterations default
GAP_TOLERANCE = 0.02  # relative gap under which `converged` is True
Background = Literal["equilibrium", "fixed"]


class AssignmentError(ReledError):
    """duaIterate failed on a scenario, or its output is unusable."""


@dataclass
class Assignment:
    routes: dict[str, list[int]]
    """Each agent's equilibrium route (edge indices of the map's graph, origin first), by vehicle id."""
    iterations: int
    """duarouter + SUMO steps run (fewer than asked when `tolerance` stopped duaIterate early)."""
    converged: bool
    """relative_gap <= GAP_TOLERANCE, or duaIterate's own criterion met when a tolerance was given."""
    relative_gap: float
    """Sum over routing vehicles of (route cost - cheapest cost) / sum of route costs, last step."""
    rel_std_dev: float
    """duaIterate's measure: std / mean of the steps' mean trip duration over the last CONVERGENCE_WINDOW steps."""
    route_changes: float
    """Share of routing vehicles whose route changed in the last step (NaN after one step)."""
    gaps: list[float]
    """relative_gap of every step (the last is relative_gap)."""
    changes: list[float]
    """route_changes of every step (NaN at step 0)."""
    travel_time: list[float]
    """Agents' mean trip duration (s, arrived agents) in each step's simulation."""
    all_travel_time: list[float]
    """Every vehicle's mean trip duration (s) in each step's simulation."""
    background_on_shortest: float
    """Share of background vehicles whose equilibrium route is their shortest path, i.e. the route the
    env drives them on (1 when the background is fixed on those routes; NaN without background)."""
    wall_s: float
    """Seconds duaIterate took when the assignment was computed."""
    key: str
    options: dict[str, Any] = field(default_factory=dict)
    cached: bool = False
    """Read from the on-disk cache (no duaIterate run in this call)."""


def default_iterations() -> int:
    """$RELED_HPC_DUE_ITERATIONS, else DEFAULT_ITERATIONS."""
    raw = os.environ.get(ITERATIONS_ENV, "").strip()
    if not raw:
        return DEFAULT_ITERATIONS
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise AssignmentError(f"${ITERATIONS_ENV} must be an integer >= 1, got {raw!r}")
    return n


def default_background() -> Background:
    """$RELED_HPC_DUE_BACKGROUND, else "equilibrium"."""
    raw = os.environ.get(BACKGROUND_ENV, "").strip() or "equilibrium"
    if raw not in ("equilibrium", "fixed"):
        raise AssignmentError(f"${BACKGROUND_ENV} must be 'equilibrium' or 'fixed', got {raw!r}")
    return raw  # type: ignore[return-value]


@lru_cache(maxsize=16)
def _file_hash(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _net_hash(net: Path) -> str:
    st = net.stat()
    return _file_hash(str(net), st.st_size, st.st_mtime_ns)


def _sumo_version() -> str:
    try:
        from importlib.metadata import version

        return version("eclipse-sumo")
    except Exception:  # part of the cache key only
        return "unknown"


def _trip_xml(graph: RoadGraph, t: Trip, vtype: str) -> str:
    ids = graph.edge_ids
    return (
        f'  <trip id={quoteattr(t.vid)} type="{vtype}" depart="{t.depart:.1f}" departLane="best" '
        f'departSpeed="max" from={quoteattr(ids[t.origin])} to={quoteattr(ids[t.dest])}/>'
    )


def _fixed_route(graph: RoadGraph, t: Trip) -> list[int]:
    """The route the env drives a background vehicle on (demand.write_routes)."""
    given = getattr(t, "route", None)
    return list(given) if given is not None else graph.route(t.origin, t.dest)


def _write_inputs(folder: Path, graph: RoadGraph, agents: Sequence[Trip], bg: Sequence[Trip], mode: Background) -> None:
    # the env's vehicle types (demand.write_routes): agents drive exactly at the limit (speedDev 0)
    routed = [(t, "agent") for t in agents] + ([(t, "bg") for t in bg] if mode == "equilibrium" else [])
    routed.sort(key=lambda r: r[0].depart)  # duarouter reads trips in departure order
    lines = ["<routes>", '  <vType id="agent" vClass="passenger" speedDev="0"/>']
    if mode == "equilibrium" and bg:
        lines.append('  <vType id="bg" vClass="passenger"/>')
    lines += [_trip_xml(graph, t, vt) for t, vt in routed]
    (folder / "trips.xml").write_text("\n".join([*lines, "</routes>"]) + "\n")
    if mode == "fixed":  # SUMO alone loads these (an additional file): duarouter never re-routes them
        add = ["<additional>", '  <vType id="bg" vClass="passenger"/>']
        for t in sorted(bg, key=lambda t: t.depart):
            edges = " ".join(graph.edge_ids[e] for e in _fixed_route(graph, t))
            add.append(
                f'  <vehicle id={quoteattr(t.vid)} type="bg" depart="{t.depart:.1f}" departLane="best" '
                f'departSpeed="max"><route edges={quoteattr(edges)}/></vehicle>'
            )
        (folder / "bg.add.xml").write_text("\n".join([*add, "</additional>"]) + "\n")


def _log_tail(folder: Path, proc: subprocess.CompletedProcess[str], lines: int = 15) -> str:
    log = folder / "dua.log"  # the tools' own output; duaIterate's progress is its stdout
    text = log.read_text(errors="replace") if log.exists() else ""
    text += (proc.stdout or "") + (proc.stderr or "")
    keep = [ln for ln in text.splitlines() if ln.strip() and "proj.db" not in ln]  # PROJ noise of the wheel
    return "\n".join(keep[-lines:])


def _steps(folder: Path) -> list[int]:
    """Steps whose simulation finished (their tripinfo file exists)."""
    out = []
    for d in folder.iterdir():
        if d.is_dir() and d.name.isdigit() and (d / f"tripinfo_{d.name}.xml").exists():
            out.append(int(d.name))
    return sorted(out)


def _step_routes(graph: RoadGraph, folder: Path, step: int) -> dict[str, list[int]] | None:
    """The routes SUMO drove in `step` (edge indices, by vehicle id), None if the file is missing."""
    path = folder / f"{step:03d}" / f"trips_{step:03d}.rou.xml"
    if not path.exists():
        return None
    out: dict[str, list[int]] = {}
    for _, el in ET.iterparse(path):
        if el.tag == "vehicle":
            r = el.find("route")
            if r is not None:
                try:
                    out[el.get("id", "")] = [graph.index[e] for e in r.get("edges", "").split()]
                except KeyError as exc:
                    raise AssignmentError(f"duaIterate's route uses edge {exc} that the map's graph lacks") from exc
            el.clear()
    return out


def _durations(path: Path) -> tuple[float, float]:
    """(agents', every vehicle's) mean trip duration of a tripinfo file (NaN: nobody arrived)."""
    agent, every = [], []
    for _, el in ET.iterparse(path):
        if el.tag == "tripinfo":
            d = float(el.get("duration", "nan"))
            every.append(d)
            if el.get("vType") == "agent":
                agent.append(d)
            el.clear()
    return (float(np.mean(agent)) if agent else float("nan"), float(np.mean(every)) if every else float("nan"))


def _interval_weights(graph: RoadGraph, dump: Path) -> list[tuple[float, np.ndarray]]:
    """(interval begin, edge travel times) of an edgeData dump; unsampled edges at free flow."""
    out = []
    for _, el in ET.iterparse(dump):
        if el.tag == "interval":
            w = graph.free_flow_time.copy()
            for e in el.iter("edge"):
                i, tt = graph.index.get(e.get("id", "")), e.get("traveltime")
                if i is not None and tt is not None:
                    w[i] = float(tt)
            out.append((float(el.get("begin", "0")), w))
            el.clear()
    return sorted(out, key=lambda x: x[0]) or [(0.0, graph.free_flow_time)]


def _relative_gap(graph: RoadGraph, trips: Sequence[Trip], routes: dict[str, list[int]], dump: Path | None) -> float:
    if dump is None:
        return float("nan")
    intervals = _interval_weights(graph, dump)
    begins = np.array([b for b, _ in intervals])
    best_to: dict[tuple[int, int], np.ndarray] = {}
    used = cheapest = 0.0
    for t in trips:
        r = routes.get(t.vid)
        if r is None:
            continue
        k = max(int(np.searchsorted(begins, t.depart, side="right")) - 1, 0)
        w = intervals[k][1]
        used += float(w[r[1:]].sum())
        dist = best_to.get((k, t.dest))
        if dist is None:
            dist = best_to[(k, t.dest)] = graph.cost_to(t.dest, w)
        cheapest += float(dist[t.origin])
    return (used - cheapest) / used if used > 0 else float("nan")


def _rel_std_dev(values: list[float], window: int) -> float:
    v = np.array([x for x in values if np.isfinite(x)][-window:])
    if len(v) < 2 or v.mean() <= 0:
        return float("nan")
    return float(v.std() / v.mean())  # sumolib Statistics.relStdDev: population std over the mean


def equilibrium_routes(
    map_bundle: MapBundle,
    agent_trips: Sequence[Trip],
    background_trips: Sequence[Trip],
    *,
    iterations: int | None = None,
    horizon_s: float,
    time_to_teleport_s: float = 300.0,
    aggregation_s: float = 900.0,
    seed: int = 0,
    background: Background | None = None,
    tolerance: float | None = None,
    extra_args: Sequence[str] = (),
    use_cache: bool = True,
) -> Assignment:
    """The DUE routes of the agents of one scenario (see the module doc).

    `iterations`: duaIterate's steps (its -l; default `default_iterations()`); `horizon_s`: the
    simulation's end (the env's horizon); `aggregation_s`: the period over which SUMO averages edge
    travel times for the next routing; `seed`: SUMO's and duarouter's; `background`: "equilibrium"
    (background vehicles choose routes too) or "fixed" (they drive the routes the env gives them,
    and only the agents choose; default `default_background()`); `tolerance`: stop early once
    duaIterate's relative deviation of the mean trip duration over the last CONVERGENCE_WINDOW
    steps is below it; `extra_args`: further duaIterate arguments (its own options first, then any
    `sumo--opt` / `duarouter--opt`); `use_cache`: False recomputes (and rewrites the entry).
    """
    graph = map_bundle.graph
    iterations = default_iterations() if iterations is None else int(iterations)
    background = default_background() if background is None else background
    if iterations < 1:
        raise AssignmentError(f"iterations must be >= 1, got {iterations}")
    if horizon_s <= 0:
        raise AssignmentError(f"horizon_s must be > 0, got {horizon_s}")
    if background not in ("equilibrium", "fixed"):
        raise AssignmentError(f"background must be 'equilibrium' or 'fixed', got {background!r}")
    ids = graph.edge_ids
    options: dict[str, Any] = {
        "iterations": iterations,
        "horizon_s": float(horizon_s),
        "time_to_teleport_s": float(time_to_teleport_s),
        "aggregation_s": float(aggregation_s),
        "seed": int(seed),
        "background": background,
        "tolerance": tolerance,
        "extra_args": list(extra_args),
    }
    net = Path(map_bundle.net_file)

    def rows(trips: Sequence[Trip]) -> list[list[Any]]:
        return [[t.vid, round(t.depart, 1), ids[t.origin], ids[t.dest]] for t in trips]

    bg_rows = rows(background_trips)
    if background == "fixed":  # their routes are part of the scenario then
        for r, t in zip(bg_rows, background_trips, strict=True):
            r.append([ids[e] for e in _fixed_route(graph, t)])
    text = json.dumps(
        [ASSIGNMENT_VERSION, _net_hash(net), _sumo_version(), rows(agent_trips), bg_rows, options], sort_keys=True
    )
    key = hashlib.sha256(text.encode()).hexdigest()[:24]
    path = cache_dir() / "assignments" / f"{key}.json"
    if use_cache and path.exists():
        try:
            rec = json.loads(path.read_text())
            return _from_record(graph, rec, cached=True)
        except (json.JSONDecodeError, KeyError, TypeError, AssignmentError):
            pass  # a damaged entry is recomputed and overwritten

    home = sumo_home()
    script = home / "tools" / "assign" / "duaIterate.py"
    with tempfile.TemporaryDirectory(prefix="reled_dua_") as tmp:
        folder = Path(tmp)
        _write_inputs(folder, graph, agent_trips, background_trips, background)
        cmd = [sys.executable, str(script), "-n", str(net), "-t", "trips.xml", "-l", str(iterations)]
        cmd += ["-e", str(horizon_s), "-a", str(aggregation_s), "--time-to-teleport", str(time_to_teleport_s)]
        cmd += ["--no-gzip", "-E", "-w"]  # plain XML to parse; no summaries; no warnings in the logs
        if background == "fixed":
            cmd += ["-+", "bg.add.xml"]
        if tolerance is not None:
            cmd += ["--max-convergence-deviation", str(tolerance), "--convergence-iterations", str(CONVERGENCE_WINDOW)]
        cmd += [*map(str, extra_args), "sumo--seed", str(seed), "duarouter--seed", str(seed)]
        cmd += ["sumo--collision.action", "teleport"]  # as the env: a collision must not end a run
        env = dict(os.environ, SUMO_HOME=str(home))
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        steps = _steps(folder)
        if proc.returncode != 0 or not steps:
            raise AssignmentError(
                f"duaIterate failed on map {map_bundle.name!r} ({len(agent_trips)} agents, "
                f"{len(background_trips)} background vehicles; exit {proc.returncode}):\n{_log_tail(folder, proc)}"
            )
        per_step = [_step_routes(graph, folder, s) for s in steps]
        if per_step[-1] is None:
            raise AssignmentError(f"duaIterate wrote no routes in its last step:\n{_log_tail(folder, proc)}")
        final = per_step[-1]
        missing = [t.vid for t in agent_trips if t.vid not in final]
        if missing:
            raise AssignmentError(f"duaIterate routed no route for agents {missing[:5]}:\n{_log_tail(folder, proc)}")
        routing = list(agent_trips) + (list(background_trips) if background == "equilibrium" else [])
        gaps, changes, agent_tt, every_tt = [], [], [], []
        for i, s in enumerate(steps):
            step_dir = folder / f"{s:03d}"
            a_tt, e_tt = _durations(step_dir / f"tripinfo_{s:03d}.xml")
            agent_tt.append(a_tt)
            every_tt.append(e_tt)
            routes_s = per_step[i]
            dumps = sorted(step_dir.glob("dump_*.xml"))
            gaps.append(_relative_gap(graph, routing, routes_s, dumps[0]) if routes_s and dumps else float("nan"))
            before = per_step[i - 1] if i > 0 else None
            changed = float("nan")
            if routes_s is not None and before is not None:
                changed = float(np.mean([routes_s.get(t.vid) != before.get(t.vid) for t in routing]))
            changes.append(changed)
        on_shortest = float("nan")
        if background == "fixed" and background_trips:
            on_shortest = 1.0
        elif background_trips:
            on_shortest = float(np.mean([final.get(t.vid) == _fixed_route(graph, t) for t in background_trips]))
        rsd = _rel_std_dev(every_tt, CONVERGENCE_WINDOW)
        stopped_early = tolerance is not None and len(steps) < iterations
        rec = {
            "routes": {t.vid: [ids[e] for e in final[t.vid]] for t in agent_trips},
            "iterations": len(steps),
            "converged": bool(stopped_early or (np.isfinite(gaps[-1]) and gaps[-1] <= GAP_TOLERANCE)),
            "relative_gap": gaps[-1],
            "rel_std_dev": rsd,
            "route_changes": changes[-1],
            "gaps": gaps,
            "changes": changes,
            "travel_time": agent_tt,
            "all_travel_time": every_tt,
            "background_on_shortest": on_shortest,
            "wall_s": round(wall, 3),
            "key": key,
            "options": options,
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp_path.write_text(json.dumps(rec))
    os.replace(tmp_path, path)  # atomic: a concurrent reader sees the old entry or the whole new one
    return _from_record(graph, rec, cached=False)


def _from_record(graph: RoadGraph, rec: dict[str, Any], cached: bool) -> Assignment:
    try:
        routes = {v: [graph.index[e] for e in r] for v, r in rec["routes"].items()}
    except KeyError as exc:
        raise AssignmentError(f"cached assignment {rec.get('key')} names edge {exc} that the map lacks") from exc
    fields = {k: v for k, v in rec.items() if k != "routes"}
    return Assignment(routes=routes, cached=cached, **fields)


def summary(a: Assignment) -> dict[str, Any]:
    """The assignment's figures without its routes (for logs and reports)."""
    d = asdict(a)
    d.pop("routes")
    d["agents"] = len(a.routes)
    return d

"""SED prompts: a fixed-size summary of one agent subset, the plan and feedback messages, and reply parsing.

A prompt must not grow with the subset (a 500-agent subset must fit a 4k context, docs/sed.md). So
the prompt never lists the subset's agents (except in json mode, which is for small subsets): it
summarises them into a bounded number of lines (the area's bounding box, the most
congested edges, the edges the subset itself would crowd, a few landmarks, origin/destination
clusters on a 3x3 grid, the main flows, a few sample agents), and the program is generic: `plan(api)`
loops over `api.agents()`. Feedback rounds replace the previous feedback instead of appending to it.

Templates are package data under `prompt_templates/<version>/` (read with importlib.resources),
filled with `string.Template` (`$name`), so braces in code examples need no escaping. v1: subset first;
v2: what a cycle's subsets share first (MAP block with the live congestion), subset last; v3: v2 with
the live congestion moved from MAP into a TRAFFIC NOW block after it, so that the prefix through MAP
is byte-identical across cycles too (the server's prompt cache then keeps it from cycle to cycle); v4: v3
with a shorter subset part (no origin/destination clusters or flows: a generic program cannot act on
them), the only part every request evaluates anew. Token estimate: `estimate_tokens(text) = len(text) / 4`.
"""

from __future__ import annotations

import ast
import json
import re
import textwrap
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from string import Template
from typing import Any, Literal

import numpy as np

from ..errors import ReledError
from ..text import safe_text
from .sandbox import SandboxResult

__all__ = [
    "CODE_STOP",
    "DEST_TOKEN",
    "JSON_MAX_AGENTS",
    "SUMMARY_LIMITS",
    "AgentLine",
    "Cluster",
    "EdgeLine",
    "MapSummary",
    "ReplyFormatError",
    "SubsetSummary",
    "build_choice_messages",
    "build_feedback_messages",
    "build_plan_messages",
    "estimate_tokens",
    "extract_json_plan",
    "extract_program",
    "failed_reply_result",
    "json_plan_to_program",
    "load_plan_schema",
    "load_template",
    "program_from_reply",
    "render_map_summary",
    "render_summary",
    "render_traffic_now",
    "summarise_map",
    "summarise_subset",
]

Mode = Literal["code", "json"]
Messages = list[dict[str, str]]

JSON_MAX_AGENTS = 25  # json mode lists every agent (one call each): beyond this, use code mode
DEST_TOKEN = "@dest"  # in a json plan's args: the agent's destination edge
FEEDBACK_MARKER = "\n\n### FEEDBACK"  # the user message is cut here before a new feedback section
MAX_PROGRAM_CHARS = 2000  # previous program shown in feedback (about 500 tokens)
MAX_ERRORS_SHOWN = 6
MAX_ERROR_CHARS = 300
MAX_DRIVERS_SHOWN = 5
MAX_NOTES_SHOWN = 8
GRID = 3  # clusters: a 3x3 grid over the subset's area, named by compass cells
CELL_NAMES = ("SW", "S", "SE", "W", "C", "E", "NW", "N", "NE")  # row-major from the south (y grows north)
CONGESTED_MIN = 0.05  # occupancy below this is free flow, not worth a line
ROUTE_SAMPLE = 200  # agents whose shortest path is traced for the crowding list (bounded work)
# Stop sequence of code-mode answers: a closing fence followed by a newline (prose would follow). The
# opening fence is "```python\n" (no newline before "```" at the start, and "```p" after one), so it
# never matches; the server drops the stop text, and extract_program accepts the unclosed fence.
CODE_STOP = "\n```\n"
# summarise_subset's caps per template version: v2's subset part is all a cycle's prompts do not share
# (the map block carries the main roads), so it is kept short; v3 keeps v2's subset part (only the
# layout differs), and so does v4 (its template leaves the clusters and flows out); v1 uses the defaults
_SHARED_FIRST_LIMITS = {"max_agents_shown": 3, "max_edges_shown": 5, "max_clusters": 4, "max_landmarks": 0}
SUMMARY_LIMITS: dict[str, dict[str, int]] = {
    "v2": dict(_SHARED_FIRST_LIMITS),
    "v3": dict(_SHARED_FIRST_LIMITS),
    "v4": dict(_SHARED_FIRST_LIMITS),
}


class ReplyFormatError(ReledError):
    """The model's reply holds no usable program / JSON plan. Counts as a generated, not executed, program."""


def estimate_tokens(text: str) -> float:
    """Rough token count: 4 characters per token."""
    return len(text) / 4


# ---------------------------------------------------------------------------------------------
# templates (package data)
# ---------------------------------------------------------------------------------------------


@cache
def load_template(name: str, template_version: str = "v1") -> str:
    """Text of prompt_templates/<version>/<name>; a clear error for an unknown version or file."""
    if not re.fullmatch(r"v\d+", template_version) or not re.fullmatch(r"[a-z_]+\.(txt|json)", name):
        raise ValueError(f"bad template reference {template_version!r}/{name!r}")
    root = resources.files(__package__).joinpath("prompt_templates")
    path = root.joinpath(template_version, name)
    if not path.is_file():
        versions = sorted(p.name for p in root.iterdir() if p.is_dir() and re.fullmatch(r"v\d+", p.name))
        raise ValueError(f"no prompt template {template_version}/{name} (versions: {', '.join(versions)})")
    return path.read_text(encoding="utf-8")


def load_plan_schema(template_version: str = "v1") -> dict[str, Any]:
    """The JSON schema of a json-mode answer (`plan_schema.json`)."""
    return json.loads(load_template("plan_schema.json", template_version))


def _hints(template_version: str) -> dict[str, Any]:
    return json.loads(load_template("hints.json", template_version))


# ---------------------------------------------------------------------------------------------
# the subset summary
# ---------------------------------------------------------------------------------------------


@dataclass
class EdgeLine:
    id: str
    name: str
    length_m: float
    lanes: int
    occupancy: float
    xy: tuple[float, float]  # midpoint
    share: float = 0.0  # share of the subset's sampled shortest paths entering it (crowding list)


@dataclass
class Cluster:
    cell: str  # compass cell of the 3x3 grid: SW S SE W C E NW N NE
    count: int
    edge: str  # the most frequent edge of the cell (origin or destination)
    name: str


@dataclass
class AgentLine:
    id: str
    edge: str
    dest: str
    trip_m: float  # straight line, current position -> destination


@dataclass
class SubsetSummary:
    """Everything a plan prompt says about one subset; its size is bounded by the max_* arguments of
    `summarise_subset`, never by the number of agents (json_agents aside: json mode only)."""

    map_name: str
    subset: str
    n_subsets: int
    n_agents: int
    n_total: int
    n_edges_map: int
    bbox: tuple[float, float, float, float]  # the subset's area (x0, y0, x1, y1), margin included
    margin_m: float
    n_edges_area: int
    mean_occupancy: float
    n_jammed: int
    n_destinations: int
    trip_median_m: float
    trip_max_m: float
    congested: list[EdgeLine] = field(default_factory=list)
    hotspots: list[EdgeLine] = field(default_factory=list)
    landmarks: list[EdgeLine] = field(default_factory=list)
    origin_clusters: list[Cluster] = field(default_factory=list)
    dest_clusters: list[Cluster] = field(default_factory=list)
    n_other_origin: int = 0  # agents in cells not shown
    n_other_dest: int = 0
    flows: list[tuple[str, str, int]] = field(default_factory=list)
    samples: list[AgentLine] = field(default_factory=list)
    json_agents: list[AgentLine] | None = None  # every agent, kept only when n_agents <= JSON_MAX_AGENTS


@dataclass
class MapSummary:
    """The map-level part of a v2/v3 plan prompt: the same for every subset of a cycle (so the prompts of
    a cycle share a byte-identical prefix the server's prompt cache reuses); bounded like SubsetSummary.
    mean_occupancy, n_jammed and congested change with the scenario (v3 shows them in TRAFFIC NOW, after
    the MAP block); the rest is fixed for a run."""

    map_name: str
    n_edges_map: int
    n_total: int
    n_subsets: int
    bbox: tuple[float, float, float, float]
    mean_occupancy: float
    n_jammed: int
    congested: list[EdgeLine] = field(default_factory=list)
    landmarks: list[EdgeLine] = field(default_factory=list)


def _edge_index(graph: Any, e: Any) -> int:
    if isinstance(e, str):
        if e not in graph.index:
            raise ValueError(f"unknown edge {e!r}")
        return graph.index[e]
    i = int(e)
    if not 0 <= i < graph.n_edges:
        raise ValueError(f"edge index {i} out of range (0..{graph.n_edges - 1})")
    return i


def _occupancy(graph: Any, congestion: Any) -> np.ndarray:
    """Per-edge occupancy [E] from an array [E] or a mapping edge -> occupancy | (occupancy, speed)
    (the `congestion` argument of sandbox.snapshot_from)."""
    occ = np.zeros(graph.n_edges)
    if congestion is None:
        return occ
    if isinstance(congestion, Mapping):
        for e, v in congestion.items():
            occ[_edge_index(graph, e)] = float(v[0] if isinstance(v, Sequence | np.ndarray) else v)
    else:
        arr = np.asarray(congestion, dtype=np.float64).reshape(-1)
        if arr.shape[0] != graph.n_edges:
            raise ValueError(f"congestion has {arr.shape[0]} entries for {graph.n_edges} edges")
        occ = arr.copy()
    return np.clip(np.nan_to_num(occ), 0.0, 1.0)


def _cells(xy: np.ndarray, bbox: tuple[float, float, float, float]) -> np.ndarray:
    x0, y0, x1, y1 = bbox
    cx = np.clip(((xy[:, 0] - x0) / max(x1 - x0, 1e-9) * GRID).astype(int), 0, GRID - 1)
    cy = np.clip(((xy[:, 1] - y0) / max(y1 - y0, 1e-9) * GRID).astype(int), 0, GRID - 1)
    return cy * GRID + cx


def _clusters(cells: np.ndarray, edges: np.ndarray, graph: Any, k: int) -> tuple[list[Cluster], int]:
    counts = np.bincount(cells, minlength=GRID * GRID)
    order = sorted(np.flatnonzero(counts), key=lambda c: (-counts[c], c))
    out = []
    for c in order[:k]:
        e = Counter(edges[cells == c].tolist()).most_common(1)[0][0]
        out.append(Cluster(CELL_NAMES[c], int(counts[c]), graph.edge_ids[e], graph.names[e]))
    return out, int(sum(counts[c] for c in order[k:]))


def _edge_line(graph: Any, i: int, occ: np.ndarray, mid: np.ndarray, share: float = 0.0) -> EdgeLine:
    return EdgeLine(
        graph.edge_ids[i],
        graph.names[i],
        float(graph.length[i]),
        int(graph.lanes[i]),
        float(occ[i]),
        (float(mid[i, 0]), float(mid[i, 1])),
        share,
    )


def summarise_subset(
    graph: Any,
    agents: Sequence[Mapping[str, Any]],
    congestion: Mapping[Any, Any] | Sequence[float] | np.ndarray | None = None,
    *,
    map_name: str = "",
    subset: int | str = 1,
    n_subsets: int = 1,
    n_total: int | None = None,
    max_agents_shown: int = 5,
    max_edges_shown: int = 8,
    max_clusters: int = 6,
    max_landmarks: int = 4,
    margin_m: float = 150.0,
) -> SubsetSummary:
    """Summarise one subset for its prompt. Work is O(n_agents + n_edges) plus at most ROUTE_SAMPLE
    shortest paths; the result has a bounded number of lines whatever n_agents is.

    graph: the RoadGraph; agents: mappings {"id", "edge", "dest", optional "xy"} as for
    `sandbox.snapshot_from` (edge = where the route starts, edge/dest as ids or indices, xy defaults
    to the edge's start); congestion: per-edge occupancy as an array [E] or a mapping edge ->
    occupancy | (occupancy, live speed) (snapshot_from's argument); missing edges are free flow."""
    if not agents:
        raise ValueError("a subset needs at least one agent")
    n = len(agents)
    ids = [str(a["id"]) for a in agents]
    src = np.array([_edge_index(graph, a["edge"]) for a in agents], dtype=np.int64)
    dst = np.array([_edge_index(graph, a["dest"]) for a in agents], dtype=np.int64)
    start_xy = np.asarray(graph.start_xy, dtype=np.float64)
    end_xy = np.asarray(graph.end_xy, dtype=np.float64)
    mid = (start_xy + end_xy) / 2
    oxy = np.array(
        [a["xy"] if a.get("xy") is not None else start_xy[e] for a, e in zip(agents, src, strict=True)],
        dtype=np.float64,
    ).reshape(n, 2)
    dxy = mid[dst]
    occ = _occupancy(graph, congestion)

    # the area: origins and destinations plus a margin, within the map
    pts = np.vstack([oxy, dxy])
    mx0, my0, mx1, my1 = graph.bbox
    bbox = (
        max(float(pts[:, 0].min()) - margin_m, mx0),
        max(float(pts[:, 1].min()) - margin_m, my0),
        min(float(pts[:, 0].max()) + margin_m, mx1),
        min(float(pts[:, 1].max()) + margin_m, my1),
    )
    inside = (mid[:, 0] >= bbox[0]) & (mid[:, 0] <= bbox[2]) & (mid[:, 1] >= bbox[1]) & (mid[:, 1] <= bbox[3])
    area = np.flatnonzero(inside)

    # congested edges: highest occupancy first, longer first on ties
    cand = area[occ[area] >= CONGESTED_MIN]
    cand = cand[np.lexsort((-graph.length[cand], -occ[cand]))][:max_edges_shown]
    congested = [_edge_line(graph, int(i), occ, mid) for i in cand]

    # where the subset itself would pile up: edges entered by the most (sampled) shortest paths
    sample = np.unique(np.linspace(0, n - 1, min(n, ROUTE_SAMPLE)).round().astype(int))
    use: Counter[int] = Counter()
    traced = 0
    for j in sample:
        try:
            path = graph.route(int(src[j]), int(dst[j]))
        except ValueError:  # unreachable: the sandbox will report it; nothing to count
            continue
        traced += 1
        use.update(set(path[1:]))
    hot = sorted(use.items(), key=lambda kv: (-kv[1], kv[0]))[:max_edges_shown]
    hotspots = [_edge_line(graph, i, occ, mid, c / max(traced, 1)) for i, c in hot]

    # landmarks: the most prominent edge (lanes x length, named first) of each quadrant, distinct names
    landmarks: list[EdgeLine] = []
    seen: set[str] = set()
    if area.size:
        cx, cy = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
        quad = (mid[area, 0] > cx).astype(int) + 2 * (mid[area, 1] > cy).astype(int)
        named = np.array([bool(graph.names[i]) for i in area])
        score = named * 1e9 + graph.lanes[area] * graph.length[area]
        for q in (3, 2, 1, 0):  # NE, NW, SE, SW
            for k in np.argsort(-score[quad == q], kind="stable"):
                i = int(area[quad == q][k])
                key = graph.names[i] or graph.edge_ids[i]
                if key not in seen:
                    seen.add(key)
                    landmarks.append(_edge_line(graph, i, occ, mid))
                    break
            if len(landmarks) >= max_landmarks:
                break

    ocells, dcells = _cells(oxy, bbox), _cells(dxy, bbox)
    origin_clusters, n_other_o = _clusters(ocells, src, graph, max_clusters)
    dest_clusters, n_other_d = _clusters(dcells, dst, graph, max_clusters)
    flow_counts = Counter(zip(ocells.tolist(), dcells.tolist(), strict=True))
    top_flows = sorted(flow_counts.items(), key=lambda kv: (-kv[1], kv[0]))[:4]
    flows = [(CELL_NAMES[o], CELL_NAMES[d], c) for (o, d), c in top_flows]

    trip = np.hypot(*(dxy - oxy).T)

    def line(j: int) -> AgentLine:
        return AgentLine(ids[j], graph.edge_ids[src[j]], graph.edge_ids[dst[j]], float(trip[j]))

    # samples: the first agent of each main flow, then the longest trips (the hard cases)
    chosen: list[int] = []
    for (o, d), _ in top_flows:
        j = int(np.flatnonzero((ocells == o) & (dcells == d))[0])
        chosen.append(j)
    for j in np.argsort(-trip, kind="stable"):
        if len(chosen) >= max_agents_shown:
            break
        if int(j) not in chosen:
            chosen.append(int(j))
    samples = [line(j) for j in chosen[:max_agents_shown]]

    return SubsetSummary(
        map_name=map_name,
        subset=str(subset),
        n_subsets=int(n_subsets),
        n_agents=n,
        n_total=int(n_total if n_total is not None else n),
        n_edges_map=int(graph.n_edges),
        bbox=bbox,
        margin_m=float(margin_m),
        n_edges_area=int(area.size),
        mean_occupancy=float(occ[area].mean()) if area.size else 0.0,
        n_jammed=int((occ[area] > 0.5).sum()),
        n_destinations=len(set(dst.tolist())),
        trip_median_m=float(np.median(trip)),
        trip_max_m=float(trip.max()),
        congested=congested,
        hotspots=hotspots,
        landmarks=landmarks,
        origin_clusters=origin_clusters,
        dest_clusters=dest_clusters,
        n_other_origin=n_other_o,
        n_other_dest=n_other_d,
        flows=flows,
        samples=samples,
        json_agents=[line(j) for j in range(n)] if n <= JSON_MAX_AGENTS else None,
    )


def summarise_map(
    graph: Any,
    congestion: Mapping[Any, Any] | Sequence[float] | np.ndarray | None = None,
    *,
    map_name: str = "",
    n_subsets: int = 1,
    n_total: int = 0,
    max_edges_shown: int = 8,
    max_landmarks: int = 6,
) -> MapSummary:
    """The map-level summary of a cycle (v2/v3 prompts): depends on the graph, the congestion and the
    cycle's counts only, never on a subset. Landmarks: the most prominent named roads (lanes x length,
    one edge per street name), chosen and shown without the congestion, so v3's MAP block is the same
    in every cycle."""
    occ = _occupancy(graph, congestion)
    mid = (np.asarray(graph.start_xy, np.float64) + np.asarray(graph.end_xy, np.float64)) / 2
    allx = np.arange(graph.n_edges)
    cand = allx[occ >= CONGESTED_MIN]
    cand = cand[np.lexsort((-graph.length[cand], -occ[cand]))][:max_edges_shown]
    score = np.array([bool(n) for n in graph.names]) * 1e9 + graph.lanes * graph.length
    landmarks: list[EdgeLine] = []
    seen: set[str] = set()
    for i in np.argsort(-score, kind="stable"):
        key = graph.names[i] or graph.edge_ids[i]
        if key in seen:
            continue
        seen.add(key)
        landmarks.append(_edge_line(graph, int(i), occ, mid))
        if len(landmarks) >= max_landmarks:
            break
    return MapSummary(
        map_name=map_name,
        n_edges_map=int(graph.n_edges),
        n_total=int(n_total),
        n_subsets=int(n_subsets),
        bbox=tuple(float(v) for v in graph.bbox),  # type: ignore[arg-type]
        mean_occupancy=float(occ.mean()) if graph.n_edges else 0.0,
        n_jammed=int((occ > 0.5).sum()),
        congested=[_edge_line(graph, int(i), occ, mid) for i in cand],
        landmarks=landmarks,
    )


# ---------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    """Numbers as the prompts show them: 4 significant digits (12.35, 0.8123, 1.235e+04)."""
    return f"{float(x):.4g}"


def _name(name: str) -> str:
    return f' "{name}"' if name else ""


def _lanes(n: int) -> str:
    return f"{n} lane" if n == 1 else f"{n} lanes"


def _lines(items: list[str], empty: str) -> str:
    return "\n".join(f"- {s}" for s in items) if items else f"- {empty}"


def _cluster_lines(clusters: list[Cluster], other: int, what: str) -> str:
    out = [f"{c.cell}: {c.count} agents, most at {what} edge {c.edge}{_name(c.name)}" for c in clusters]
    if other:
        out.append(f"{other} agents in other cells")
    return _lines(out, "none")


def render_summary(s: SubsetSummary, *, all_agents: bool = False, template_version: str = "v1") -> str:
    """The SUBSET SUMMARY block. `all_agents` lists every agent (json mode) instead of the samples."""
    if all_agents:
        if s.json_agents is None:
            raise ValueError(f"json mode lists every agent: at most {JSON_MAX_AGENTS}, this subset has {s.n_agents}")
        agents, title = s.json_agents, f"AGENTS (all {s.n_agents}):"
    else:
        agents, title = s.samples, f"SAMPLE AGENTS ({len(s.samples)} of {s.n_agents}; plan(api) must route all):"
    return Template(load_template("summary.txt", template_version)).substitute(
        map_name=s.map_name or "map",
        n_edges_map=s.n_edges_map,
        subset=s.subset,
        n_subsets=s.n_subsets,
        n_agents=s.n_agents,
        n_total=s.n_total,
        margin=f"{s.margin_m:.0f}",
        **_bbox_fields(s.bbox),
        n_edges_area=s.n_edges_area,
        mean_occ=f"{s.mean_occupancy:.2f}",
        n_jammed=s.n_jammed,
        n_dests=s.n_destinations,
        trip_median=f"{s.trip_median_m:.0f}",
        trip_max=f"{s.trip_max_m:.0f}",
        congested=_congested_lines(s.congested, "every edge in the area"),
        hotspots=_lines(
            [f"{e.id}{_name(e.name)}: {e.share:.0%} of agents, occupancy {e.occupancy:.2f}" for e in s.hotspots],
            "none",
        ),
        landmarks=_landmark_lines(s.landmarks),
        origins=_cluster_lines(s.origin_clusters, s.n_other_origin, "origin"),
        destinations=_cluster_lines(s.dest_clusters, s.n_other_dest, "destination"),
        flows=_lines([f"{o} -> {d}: {c} agents" for o, d, c in s.flows], "none"),
        agents_title=title,
        agents=_lines([f"{a.id}: at {a.edge} -> destination {a.dest} ({a.trip_m:.0f} m)" for a in agents], "none"),
    )


def _bbox_fields(bbox: tuple[float, float, float, float]) -> dict[str, str]:
    """A summary's box as its template fields: corners and size, whole metres."""
    x0, y0, x1, y1 = bbox
    return {"x0": f"{x0:.0f}", "x1": f"{x1:.0f}", "y0": f"{y0:.0f}", "y1": f"{y1:.0f}",
            "width": f"{x1 - x0:.0f}", "height": f"{y1 - y0:.0f}"}  # fmt: skip


def _congested_lines(edges: Sequence[Any], scope: str) -> str:
    """The congested-edges list of a summary (the subset's area or the whole map: `scope`)."""
    rows = [f"{e.id}{_name(e.name)}: occupancy {e.occupancy:.2f}, {e.length_m:.0f} m, {_lanes(e.lanes)}" for e in edges]
    return _lines(rows, f"none: {scope} has occupancy below {CONGESTED_MIN}")


def _landmark_lines(edges: Sequence[Any]) -> str:
    rows = [f"{e.id}{_name(e.name)} at ({e.xy[0]:.0f}, {e.xy[1]:.0f}), {_lanes(e.lanes)}" for e in edges]
    return _lines(rows, "none")


def _map_fields(m: MapSummary) -> dict[str, Any]:
    """The template fields of a MapSummary, for both map_summary.txt and traffic_now.txt (each uses its
    own; substitute ignores the rest)."""
    return {
        "map_name": m.map_name or "map",
        "n_edges_map": m.n_edges_map,
        "n_total": m.n_total,
        "n_subsets": m.n_subsets,
        **_bbox_fields(m.bbox),
        "mean_occ": f"{m.mean_occupancy:.2f}",
        "n_jammed": m.n_jammed,
        "congested": _congested_lines(m.congested, "every edge"),
        "landmarks": _landmark_lines(m.landmarks),
    }


def render_map_summary(m: MapSummary, template_version: str = "v2") -> str:
    """The MAP block of a v2/v3 prompt: identical for every subset of a cycle (v2: the congestion
    included) or of a run (v3: the congestion is in TRAFFIC NOW)."""
    return Template(load_template("map_summary.txt", template_version)).substitute(_map_fields(m))


def render_traffic_now(m: MapSummary, template_version: str = "v3") -> str:
    """The TRAFFIC NOW block of a v3 prompt: the network's live congestion, identical for every subset
    of a cycle; kept out of the MAP block so that block stays the same from cycle to cycle."""
    return Template(load_template("traffic_now.txt", template_version)).substitute(_map_fields(m))


def _plan_template(template_version: str, mode: Mode) -> str:
    return load_template("plan_code.txt" if mode == "code" else "plan_json.txt", template_version)


def build_plan_messages(
    summary: SubsetSummary,
    mode: Mode = "code",
    template_version: str = "v1",
    map_summary: MapSummary | None = None,
) -> Messages:
    """The round-1 chat messages (OpenAI format) for one subset: a system message and one user message.

    code mode (the default, any subset size): one generic `def plan(api):`. json mode (at most
    JSON_MAX_AGENTS agents): a list of per-agent calls under `plan_schema.json`.

    v1 puts the subset summary first. v2 puts everything a cycle's subsets share first (system, task,
    API, output format, then the MAP block from `map_summary`, required there), the subset's own part
    last, and feedback after it: all prompts of a cycle then share one byte-identical prefix, which
    the server's prompt cache (llama.cpp) or prefix caching (vLLM) evaluates once. v2's MAP block holds
    the live congestion, so across cycles the prefix ends there; v3 moves it into a TRAFFIC NOW block
    between MAP and SUBSET, so the prefix through MAP is shared across cycles as well."""
    if mode not in ("code", "json"):
        raise ValueError(f"mode must be 'code' or 'json', got {mode!r}")
    system = load_template("system.txt", template_version).strip()
    plan_template = _plan_template(template_version, mode)
    fields: dict[str, Any] = {}
    if "$map_summary" in plan_template or "$traffic_now" in plan_template:
        if map_summary is None:
            raise ValueError(f"template {template_version} needs map_summary (prompts.summarise_map)")
        if "$map_summary" in plan_template:
            fields["map_summary"] = render_map_summary(map_summary, template_version).strip()
        if "$traffic_now" in plan_template:
            fields["traffic_now"] = render_traffic_now(map_summary, template_version).strip()
    if mode == "code":
        user = Template(plan_template).substitute(
            summary=render_summary(summary, template_version=template_version).strip(),
            api_reference=load_template("api_reference.txt", template_version).strip(),
            **fields,
        )
    elif mode == "json":
        user = Template(plan_template).substitute(
            n_agents=summary.n_agents,
            summary=render_summary(summary, all_agents=True, template_version=template_version).strip(),
            schema=json.dumps(load_plan_schema(template_version), separators=(",", ":")),
            **fields,
        )
    return [{"role": "system", "content": system}, {"role": "user", "content": user.strip()}]


# ---------------------------------------------------------------------------------------------
# feedback
# ---------------------------------------------------------------------------------------------

_ALIASES = {"RVI_K": "RVI", "TAU_R": "RVI", "PDI_K": "PDI", "TAU_P": "PDI"}
_TAU = {"RVI": "tau_R", "PDI": "tau_P"}


def _canon(key: str) -> str:
    k = str(key).upper()
    return _ALIASES.get(k, k)


def _top(contrib: Any) -> list[tuple[str, float]]:
    items = contrib.items() if isinstance(contrib, Mapping) else contrib
    pairs = [(str(a), float(v)) for a, v in items]
    return sorted(pairs, key=lambda p: -p[1])[:MAX_DRIVERS_SHOWN]


def _index_lines(
    indices: Mapping[str, float], thresholds: Mapping[str, float], hints: Mapping[str, Any]
) -> tuple[list[str], list[str]]:
    """One line per index (its value, threshold and state) and the indices above their threshold."""
    vals = {_canon(k): float(v) for k, v in indices.items()}
    taus = {_canon(k): float(v) for k, v in thresholds.items()}
    lines, above = [], []
    for k, v in vals.items():
        desc = hints["describe"].get(k)
        if k in taus:
            tau = taus[k]
            state = f"ABOVE by {_fmt(v - tau)}" if v > tau else "ok"
            if v > tau:
                above.append(k)
            line = f"{k}_k = {_fmt(v)} (threshold {_TAU.get(k, k)} = {_fmt(tau)}): {state}"
        else:
            line = f"{k} = {_fmt(v)} (no threshold)"
        lines.append(line + (f". {desc}" if desc else ""))
    return lines, above


def _assistant_turn(answer_text: str) -> str:
    """The previous answer as a revision's assistant turn: safe, capped, its code fence closed."""
    answer = safe_text(answer_text)
    if len(answer) > 2 * MAX_PROGRAM_CHARS:  # a rambling answer: its cached state is not worth keeping whole
        answer = answer[: 2 * MAX_PROGRAM_CHARS]
    if answer.count("```") % 2:  # cut by the stop sequence at its closing fence: close it again
        answer += "\n```"
    return answer or "(no answer)"


def build_choice_messages(
    previous_messages: Messages,
    answer_text: str,
    indices: Mapping[str, float],
    thresholds: Mapping[str, float],
    menus: Sequence[str],
    example: str,
    *,
    round_no: int,
    template_version: str = "v3",
) -> Messages:
    """A choice revision's messages (expert/revision.py): the round-1 system and user messages, the
    previous answer as an assistant turn, and a FEEDBACK section (revise_choice.txt) listing each named
    agent's alternative routes (`menus`, one rendered block per agent) and asking for {agent: letter}."""
    if len(previous_messages) < 2 or previous_messages[0].get("role") != "system":
        raise ValueError("previous_messages must be the [system, user, ...] messages of build_plan_messages")
    if not menus:
        raise ValueError("a choice revision needs at least one agent with alternatives")
    base = previous_messages[1]["content"].split(FEEDBACK_MARKER, 1)[0]
    index_lines, above = _index_lines(indices, thresholds, _hints(template_version))
    verdict = (
        f"It ran, but {' and '.join(above)} {'is' if len(above) == 1 else 'are'} above the threshold."
        if above
        else "It ran and every index is within its threshold."
    )
    section = Template(load_template("revise_choice.txt", template_version)).substitute(
        round=round_no,
        verdict=verdict,
        indices=_lines(index_lines, "not computed"),
        agents="\n\n".join(safe_text(m) for m in menus),
        example=example,
    )
    return [
        {"role": "system", "content": previous_messages[0]["content"]},
        {"role": "user", "content": base.rstrip()},
        {"role": "assistant", "content": _assistant_turn(answer_text)},
        {"role": "user", "content": section.strip()},
    ]


def build_feedback_messages(
    previous_messages: Messages,
    program_text: str,
    indices: Mapping[str, float],
    thresholds: Mapping[str, float],
    drivers: Mapping[str, Any],
    errors: Sequence[str],
    *,
    round_no: int | None = None,
    template_version: str = "v1",
    agent_notes: Sequence[str] = (),
    repeated: bool = False,
    answer_text: str | None = None,
) -> Messages:
    """The next round's messages: the round-1 system and user messages (an earlier FEEDBACK section is
    cut off, so rounds do not accumulate) with a FEEDBACK section appended to the user message (v1), or
    (templates whose feedback.txt has no $program, v2 and v3) the round-1 messages unchanged, the previous
    answer as an assistant turn and the FEEDBACK section as a user turn: the server's prompt cache
    stored its state after that answer, so a revision evaluates little more than the feedback.

    indices: e.g. {"RVI": 12.3, "PDI": 0.81} (keys case-insensitive; extra keys are shown without a
    threshold); thresholds: {"RVI": tau_R, "PDI": tau_P}; drivers: index -> {agent: contribution}
    (or (agent, contribution) pairs), top MAX_DRIVERS_SHOWN shown; errors: sandbox error and route
    errors of the previous program (capped); agent_notes: one line per agent saying what went wrong
    with its route (v2 templates show them, at most MAX_NOTES_SHOWN); repeated: the previous answer's
    routes equal those of the answer before it (v2 says so). The previous answer is shown truncated to
    MAX_PROGRAM_CHARS; answer_text: the answer as the model wrote it (default program_text), for the
    assistant turn. v1's one user message keeps the size bounded and no chat template has to accept
    consecutive turns of one role; v2's [system, user, assistant, user] is bounded too (one answer)
    and alternates roles."""
    if len(previous_messages) < 2 or previous_messages[0].get("role") != "system":
        raise ValueError("previous_messages must be the [system, user, ...] messages of build_plan_messages")
    user_msgs = [m for m in previous_messages if m.get("role") == "user"]
    if not user_msgs:
        raise ValueError("previous_messages hold no user message")
    base = user_msgs[0]["content"].split(FEEDBACK_MARKER, 1)[0]
    prior = re.search(r"### FEEDBACK \(round (\d+)\)", user_msgs[-1]["content"])
    rnd = round_no if round_no is not None else (int(prior.group(1)) + 1 if prior else 2)  # round 1: the plan
    hints = _hints(template_version)

    index_lines, above = _index_lines(indices, thresholds, hints)

    driver_lines = []
    for k, contrib in drivers.items():
        top = _top(contrib)
        if top:
            driver_lines.append(f"{_canon(k)}: " + ", ".join(f"{a} ({_fmt(c)})" for a, c in top))

    # safe_text: errors and the answer come from the LLM or its program (NULs, escapes, lone surrogates)
    errs = [safe_text(e, 4 * MAX_ERROR_CHARS).strip().replace("\n", " ")[:MAX_ERROR_CHARS] for e in errors]
    errs = [e for e in errs if e]
    more = len(errs) - MAX_ERRORS_SHOWN
    error_lines = errs[:MAX_ERRORS_SHOWN] + ([f"... and {more} more"] if more > 0 else [])

    hint_lines = ([hints["errors"]] if errs else []) + [hints["above"][k] for k in above if k in hints["above"]]
    if repeated and hints.get("same"):
        hint_lines.insert(0, hints["same"])
    if not hint_lines:
        hint_lines = [hints["ok"]]
    if errs:
        verdict = "It FAILED, so it gave no demonstration."
    elif above:
        verdict = f"It ran, but {' and '.join(above)} {'is' if len(above) == 1 else 'are'} above the threshold."
    else:
        verdict = "It ran and every index is within its threshold."

    notes = [safe_text(n, 4 * MAX_ERROR_CHARS).strip().replace("\n", " ")[:MAX_ERROR_CHARS] for n in agent_notes]
    notes = [n for n in notes if n]
    more_notes = len(notes) - MAX_NOTES_SHOWN
    notes = notes[:MAX_NOTES_SHOWN] + ([f"... and {more_notes} more"] if more_notes > 0 else [])

    text = safe_text(program_text).strip()
    truncated = len(text) > MAX_PROGRAM_CHARS
    is_json = text.startswith("{")
    section = Template(load_template("feedback.txt", template_version)).substitute(
        round=rnd,
        verdict=verdict,
        indices=_lines(index_lines, "not computed (the answer did not run)"),
        drivers=_lines(driver_lines, "none reported"),
        errors=_lines(error_lines, "none"),
        truncated=f" (first {MAX_PROGRAM_CHARS} of {len(text)} characters)" if truncated else "",
        fence="json" if is_json else "python",
        program=text[:MAX_PROGRAM_CHARS].replace("```", "` ` `"),  # keep our fence intact
        hints="\n".join(f"- {h}" for h in hint_lines),
        what="JSON object" if is_json else "program",
        agent_notes=_lines(notes, "none"),
    )
    feedback = "### FEEDBACK" + section.split("### FEEDBACK", 1)[1].rstrip()
    system = {"role": "system", "content": previous_messages[0]["content"]}
    if "$program" in load_template("feedback.txt", template_version):
        return [system, {"role": "user", "content": base.rstrip() + "\n\n" + feedback}]
    return [
        system,
        {"role": "user", "content": base.rstrip()},
        {"role": "assistant", "content": _assistant_turn(answer_text if answer_text is not None else program_text)},
        {"role": "user", "content": feedback},
    ]


# ---------------------------------------------------------------------------------------------
# reply parsing
# ---------------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PLAN_DEF = re.compile(r"^[ \t]*def[ \t]+plan[ \t]*\(", re.MULTILINE)


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def _trim_to_code(block: str) -> str:
    """The longest prefix of `block` (dropping trailing lines) that parses; `block` if none does."""
    lines = block.rstrip().splitlines()
    for end in range(len(lines), 0, -1):
        cand = "\n".join(lines[:end]).rstrip()
        if cand and _PLAN_DEF.search(cand) and _parses(cand):
            return cand
    return block.rstrip()


def _bare_program(text: str) -> str | None:
    """Code from a reply without fences: from the top-level constants just above `def plan(` through the
    function body, stopping where prose starts (the longest part that parses)."""
    m = _PLAN_DEF.search(text)
    if m is None:
        return None
    lines = text[: m.start()].splitlines()
    start = len(lines)
    # include constant assignments / comments / blank lines directly above the def
    while start > 0 and re.match(r"^\s*($|#|[A-Za-z][A-Za-z0-9_]*\s*=)", lines[start - 1]):
        start -= 1
    head = "\n".join(lines[start:])
    body = text[m.start() :].splitlines()
    indent = len(body[0]) - len(body[0].lstrip())
    keep = [body[0]]
    for ln in body[1:]:
        stripped_indent = len(ln) - len(ln.lstrip())
        if ln.strip() and stripped_indent <= indent and not re.match(r"^\s*(#|[A-Za-z][A-Za-z0-9_]*\s*=|def\s)", ln):
            break  # back at or above the def's level and not code-looking: prose
        keep.append(ln)
    code = textwrap.dedent((head + "\n" if head.strip() else "") + "\n".join(keep))
    return _trim_to_code(code)


def extract_program(text: str) -> str:
    """The Python program in a model's reply: the LAST fenced block that defines `plan` (a revision that
    quotes the old program comes after it), else the bare `def plan(` code with its constants. An
    unclosed fence (the reply hit max_tokens) runs to the end. Returned as written (dedented, trailing
    prose cut): imports and other rule breaks are left for the sandbox to reject, so every reply
    counts the same towards the execution rate. Raises ReplyFormatError when there is no `def plan(`."""
    if not isinstance(text, str) or not text.strip():
        raise ReplyFormatError("empty reply: expected a ```python block with `def plan(api):`")
    blocks = [b for lang, b in _FENCE.findall(text) if lang.lower() in ("", "python", "py", "python3")]
    with_plan = [b for b in blocks if _PLAN_DEF.search(b)]
    if with_plan:
        return _trim_to_code(textwrap.dedent(with_plan[-1]))
    bare = _bare_program(text.replace("```", ""))
    if bare:
        return bare
    snippet = " ".join(text.split())[:120]
    raise ReplyFormatError(f"no `def plan(api):` in the reply ({len(text)} chars, starts {snippet!r})")


def extract_json_plan(text: str, schema: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The json-mode answer, parsed (code fences and prose tolerated) and checked against `schema`
    (default: v1's plan_schema.json) and the per-op argument counts. Raises ReplyFormatError."""
    from ..llm.structured import parse_structured

    sch = dict(schema) if schema is not None else load_plan_schema()
    res = parse_structured(text if isinstance(text, str) else "", sch)
    if not res.valid:
        raise ReplyFormatError("invalid JSON plan: " + "; ".join(res.errors[:5]))
    _check_calls(res.value)
    return res.value


_OPS = ("move_to_by_shortest_path", "move_to_by_fastest_path", "move_via", "avoid")


def _check_calls(plan_json: Any) -> list[list[Any]]:
    if not isinstance(plan_json, Mapping) or not isinstance(plan_json.get("calls"), list):
        raise ReplyFormatError('a JSON plan is an object {"calls": [...]}')
    calls = []
    for i, c in enumerate(plan_json["calls"]):
        if not isinstance(c, Mapping):
            raise ReplyFormatError(f"calls[{i}] is not an object")
        agent, op, args = c.get("agent"), c.get("op"), c.get("args")
        if not isinstance(agent, str) or op not in _OPS:
            raise ReplyFormatError(f"calls[{i}]: needs a string 'agent' and an 'op' in {list(_OPS)}")
        if not isinstance(args, list) or not args or not all(isinstance(x, str) for x in args):
            raise ReplyFormatError(f"calls[{i}]: 'args' must be a non-empty list of edge ids")
        if op.startswith("move_to_") and len(args) != 1:
            raise ReplyFormatError(f"calls[{i}]: {op} takes exactly one target edge, got {len(args)}")
        calls.append([agent, op, list(args)])
    return calls


_JSON_PROGRAM = '''"""Generated from a json-mode plan (prompts.json_plan_to_program)."""
CALLS = {calls}


def plan(api):
    for call in CALLS:
        a, op, args = call[0], call[1], call[2]
        args = [api.destination(a) if x == {dest!r} else x for x in args]
        if op == "move_to_by_shortest_path":
            api.move_to_by_shortest_path(a, args[0])
        elif op == "move_to_by_fastest_path":
            api.move_to_by_fastest_path(a, args[0])
        elif op == "move_via":
            api.move_via(a, args)
        else:
            api.avoid(a, args)
'''


def json_plan_to_program(plan_json: Mapping[str, Any]) -> str:
    """A `plan(api)` program that makes the json plan's calls in order, so json mode runs through the
    same sandbox (and the same execution rate) as code mode. The calls are one constant list."""
    calls = _check_calls(plan_json)
    body = "[\n" + "".join(f"    {c!r},\n" for c in calls) + "]"
    return _JSON_PROGRAM.format(calls=body, dest=DEST_TOKEN)


def program_from_reply(text: str, mode: Mode = "code", schema: Mapping[str, Any] | None = None) -> str:
    """The program to run for a reply in either mode; raises ReplyFormatError."""
    if mode == "code":
        return extract_program(text)
    if mode == "json":
        return json_plan_to_program(extract_json_plan(text, schema))
    raise ValueError(f"mode must be 'code' or 'json', got {mode!r}")


def failed_reply_result(error: ReplyFormatError | str) -> SandboxResult:
    """The SandboxResult of a reply with no usable program (reason 'syntax': it does not parse as a
    plan), so it counts in `sandbox.execution_rate` as generated and not executed."""
    return SandboxResult(None, str(error), "syntax", 0.0)

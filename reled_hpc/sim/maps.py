"""Map folders: build a SUMO network + routing graph from OSM, a SUMO network, SUMO plain XML or a
generated grid, cached by content.

A map folder holds:
  net.net.xml       the SUMO network (passenger roads of the largest strongly connected component;
                    SUMO inputs keep the edges leading into and out of it too, see cut_to_core)
  roadgraph.json    the routing graph over SUMO edges (see roadgraph.py)
  osm_graph.graphml the drivable osmnx graph (OSM maps only; for prompts and analysis)
  manifest.json     source, source SHA-256, build key, counts, bbox, tool versions; for SUMO
                    inputs also what netconvert dropped from them (`dropped`)

The folder name carries a hash of the source bytes and the build settings, so building the same
source twice returns the existing folder without work. Builds happen in a temporary sibling folder
renamed into place at the end, so a failed build leaves nothing behind.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import IO, Any

import numpy as np

from .. import __version__
from ..errors import MapError
from .roadgraph import RoadGraph
from .sumo_tools import binary, run_tool, sumo_home

BUILD_VERSION = 1  # bump when the pipeline's output changes: invalidates cached builds

NETCONVERT_OSM_ARGS = [
    "--keep-edges.by-vclass",
    "passenger",
    "--remove-edges.isolated",
    "--geometry.remove",
    "--ramps.guess",
    "--junctions.join",
    "--tls.guess-signals",
    "--tls.discard-simple",
    "--tls.join",
    "--edges.join",
    "--no-turnarounds",
    "--output.street-names",
]

BUILTIN_MAPS = ("helsinki", "grid", "ingolstadt")
MIN_EDGES = 4

NET_SUFFIXES = (".net.xml", ".net.xml.gz")
# plain-XML roles: file infix -> netconvert option; the edge file names the set
PLAIN_ROLES = {
    "nod": "--node-files",
    "edg": "--edge-files",
    "con": "--connection-files",
    "tll": "--tllogic-files",
    "typ": "--type-files",
}
# Real plain-XML exports are often slightly inconsistent (connections to edges joined away, types
# missing from the .typ file). Each rung is tried only if the one before fails; the report says
# which one built the net and what it lost.
PLAIN_LADDER: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("strict", (), ()),
    ("skip bad connections and undefined types", ("--ignore-errors.edge-type", "--ignore-errors.connections"), ()),
    ("--ignore-errors", ("--ignore-errors", "--ignore-errors.edge-type", "--ignore-errors.connections"), ()),
    (
        "without the connection and traffic-light files",
        ("--ignore-errors", "--ignore-errors.edge-type"),
        ("con", "tll"),
    ),
)
MAX_REPORTED = 1000  # ids listed per dropped category in the manifest (the count is always exact)


def cache_dir() -> Path:
    """Where built maps live: $RELED_HPC_CACHE, else ~/.cache/reled_hpc."""
    root = os.environ.get("RELED_HPC_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "reled_hpc"


def shipped_dir(name: str) -> Path:
    """The folder of a map's data shipped inside the package (`reled_hpc/data/maps/<name>`)."""
    path = Path(str(resources.files("reled_hpc") / "data" / "maps" / name))
    if not path.is_dir():
        raise MapError(f"shipped map data {path} is missing from the installation")
    return path


def shipped_osm(name: str = "helsinki") -> Path:
    """The OSM extract that ships inside the package."""
    path = shipped_dir(name) / f"{name}.osm.pbf"
    if not path.exists():
        raise MapError(f"shipped map data {path} is missing from the installation")
    return path


def shipped_net(name: str = "ingolstadt") -> Path:
    """The SUMO network that ships inside the package (the one `*.net.xml.gz` of its folder)."""
    nets = sorted(shipped_dir(name).glob("*.net.xml.gz"))
    if len(nets) != 1:
        raise MapError(
            f"shipped map data of {name!r}: expected one .net.xml.gz in {shipped_dir(name)}, found {len(nets)}"
        )
    return nets[0]


@dataclass
class MapBundle:
    folder: Path
    manifest: dict[str, Any]
    cached: bool = False
    _graph: RoadGraph | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def net_file(self) -> Path:
        return self.folder / "net.net.xml"

    @property
    def graph(self) -> RoadGraph:
        if self._graph is None:
            self._graph = RoadGraph.from_json(self.folder / "roadgraph.json")
        return self._graph

    @classmethod
    def load(cls, folder: Path, cached: bool = False) -> MapBundle:
        folder = Path(folder)
        manifest_path = folder / "manifest.json"
        if not manifest_path.exists():
            raise MapError(f"{folder} is not a map folder: no manifest.json (build one with 'reled-hpc map build')")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise MapError(f"{manifest_path} is not valid JSON: {exc}") from exc
        for fname in ("net.net.xml", "roadgraph.json"):
            if not (folder / fname).exists():
                raise MapError(f"map folder {folder} is incomplete: {fname} is missing")
        return cls(folder=folder, manifest=manifest, cached=cached)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _build_key(*parts: object) -> str:
    text = json.dumps([BUILD_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _sumo_version() -> str:
    try:
        from importlib.metadata import version

        return version("eclipse-sumo")
    except Exception:  # the version is informative only
        return "unknown"


def core_and_fringe(graph: RoadGraph) -> tuple[set[str], set[str]]:
    """(core, fringe) edge ids: the core is the largest strongly connected component; the fringe holds
    the other edges that reach the core or are reached from it (a scenario's one-way entries and exits,
    dead-end stubs). Edges in neither are unusable: no trip through the core can start or end there."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import breadth_first_order

    core = graph.largest_scc()
    if not core:
        return core, set()
    n = graph.n_edges
    mat = csr_matrix((np.ones(len(graph.succ_idx)), graph.succ_idx, graph.succ_ptr), shape=(n, n))
    seed = graph.index[next(iter(core))]
    reached = breadth_first_order(mat, seed, directed=True, return_predecessors=False)
    reaching = breadth_first_order(mat.T.tocsr(), seed, directed=True, return_predecessors=False)
    both = {graph.edge_ids[i] for i in np.concatenate([reached, reaching])}
    return core, both - core


def cut_to_core(net_raw: Path, net_out: Path, what: str, fringe: bool = False) -> tuple[RoadGraph, RoadGraph, int]:
    """Write to `net_out` the passenger part of `net_raw` restricted to its largest strongly connected
    component, plus its fringe when `fringe` (see core_and_fringe), with netconvert
    `--keep-edges.input-file`. Returns the routing graphs before and after, and the core's size.
    Every map build ends here; without the fringe every edge reaches every other."""
    try:
        raw_graph = RoadGraph.from_sumo_net(net_raw)
    except Exception as exc:  # sumolib raises SAX, Key, Value errors... on a damaged net
        raise MapError(f"{what}: cannot read the SUMO network {net_raw.name}: {type(exc).__name__}: {exc}") from exc
    core, rim = core_and_fringe(raw_graph)
    if len(core) < MIN_EDGES:
        raise MapError(
            f"{what}: the drivable network is too small "
            f"(largest strongly connected part has {len(core)} edges, need >= {MIN_EDGES})"
        )
    keep = net_out.with_name("keep_edges.txt")
    keep.write_text("\n".join(sorted(core | rim if fringe else core)) + "\n")
    run_tool("netconvert", ["-s", str(net_raw), "--keep-edges.input-file", str(keep), "-o", str(net_out)], what=what)
    keep.unlink()
    graph = RoadGraph.from_sumo_net(net_out)
    core, rim = core_and_fringe(graph)
    kept = core | rim if fringe else core
    if len(kept) != graph.n_edges:  # netconvert may drop connections at cut junctions
        graph = RoadGraph.from_sumo_net(net_out, keep=kept)
    return raw_graph, graph, len(core)


def _finish(tmp: Path, folder: Path, net_raw: Path, manifest: dict[str, Any], fringe: bool = False) -> MapBundle:
    """Restrict the raw net to its core (and fringe), write the routing graph and manifest, publish."""
    raw_graph, graph, n_core = cut_to_core(net_raw, tmp / "net.net.xml", str(manifest["source"]), fringe)
    graph.to_json(tmp / "roadgraph.json")
    if net_raw.parent == tmp:  # an intermediate of ours, not the user's input
        net_raw.unlink()
    manifest.update(
        sumo_edges_raw=raw_graph.n_edges,
        sumo_edges=graph.n_edges,
        core_edges=n_core,
        strongly_connected=n_core == graph.n_edges,
        connections=len(graph.succ_idx),
        lane_km=round(float((graph.length * graph.lanes).sum()) / 1000, 3),
        bbox_xy=[round(v, 2) for v in graph.bbox],
        scale_m=round(graph.scale, 2),
        built=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        package_version=__version__,
        sumo_version=_sumo_version(),
        build_version=BUILD_VERSION,
    )
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if folder.exists():  # a concurrent build won; ours is identical by construction
        shutil.rmtree(tmp)
    else:
        tmp.rename(folder)
    return MapBundle.load(folder)


def _tmp_for(folder: Path) -> Path:
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _built(name: str, key: str, out: Path | None) -> tuple[Path, MapBundle | None]:
    """The output folder of a build, and its map if that build is there already (the cache hit)."""
    folder = Path(out) if out else cache_dir() / "maps" / f"{name}-{key}"
    if not (folder / "manifest.json").exists():
        return folder, None
    bundle = MapBundle.load(folder, cached=True)
    if bundle.manifest.get("build_key") != key:
        raise MapError(f"output folder {folder} holds a different map (build key {bundle.manifest.get('build_key')})")
    return folder, bundle


def build_from_osm(src: Path | str, out: Path | None = None, name: str | None = None) -> MapBundle:
    """Build (or fetch from cache) the map folder of an OSM extract."""
    from .osm import check_source, clean_extract, osmnx_graph

    src = Path(src)
    check_source(src)
    digest = _sha256(src)
    key = _build_key("osm", digest, NETCONVERT_OSM_ARGS)
    name = name or src.name.split(".")[0]
    folder, bundle = _built(name, key, out)
    if bundle is not None:
        return bundle

    t0 = time.perf_counter()
    tmp = _tmp_for(folder)
    try:
        xml = tmp / "clean.osm"
        stats = clean_extract(src, xml)
        import osmnx as ox

        graph = osmnx_graph(xml)
        ox.save_graphml(graph, filepath=str(tmp / "osm_graph.graphml"))
        lats = [d["y"] for _, d in graph.nodes(data=True)]
        lons = [d["x"] for _, d in graph.nodes(data=True)]
        typemap = sumo_home() / "data" / "typemap" / "osmNetconvert.typ.xml"
        net_raw = tmp / "raw.net.xml"
        run_tool(
            "netconvert",
            ["--osm-files", str(xml), "--type-files", str(typemap), *NETCONVERT_OSM_ARGS, "-o", str(net_raw)],
            what=str(src),
        )
        xml.unlink()
        manifest: dict[str, Any] = {
            "name": name,
            "kind": "osm",
            "source": str(src),
            "source_sha256": digest,
            "build_key": key,
            "osm_nodes_used": stats.nodes,
            "osm_ways": stats.ways_read,
            "osm_drivable_ways": stats.drivable_ways,
            "osm_refs_dropped": stats.refs_dropped,
            "osmnx_nodes": graph.number_of_nodes(),
            "osmnx_edges": graph.number_of_edges(),
            "bbox_lonlat": [min(lons), min(lats), max(lons), max(lats)],
            "attribution": "© OpenStreetMap contributors (ODbL)",
        }
        bundle = _finish(tmp, folder, net_raw, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    bundle.manifest["build_seconds"] = round(time.perf_counter() - t0, 2)
    return bundle


# ---- SUMO inputs -------------------------------------------------------------------------------
@dataclass(frozen=True)
class SumoSource:
    """A SUMO network to build from: one `.net.xml` (kind "net") or a plain-XML set (kind "plain",
    files by role: nod, edg and optionally con, tll, typ)."""

    kind: str
    files: dict[str, Path]
    stem: str

    @property
    def main(self) -> Path:
        return self.files["net" if self.kind == "net" else "edg"]


def _plain_role(name: str) -> tuple[str, str] | None:
    """('stem', role) of a plain-XML file name such as `x.edg.xml` or `x.con.xml.gz`."""
    for role in PLAIN_ROLES:
        for suffix in (f".{role}.xml", f".{role}.xml.gz"):
            if name.endswith(suffix) and len(name) > len(suffix):
                return name[: -len(suffix)], role
    return None


def is_sumo_source(path: Path | str) -> bool:
    """Whether `path` names SUMO input (a .net.xml, a plain-XML file, or a folder that is not a map folder)."""
    path = Path(path)
    if path.is_dir():
        return not (path / "manifest.json").exists()
    return path.name.endswith(NET_SUFFIXES) or _plain_role(path.name) is not None


def _open_xml(path: Path) -> IO[bytes]:
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _xml_root(path: Path) -> str:
    try:
        with _open_xml(path) as f:
            for _, el in ET.iterparse(f, events=("start",)):
                return el.tag
    except (ET.ParseError, OSError, EOFError) as exc:
        raise MapError(f"{path} is not readable XML: {exc}") from exc
    raise MapError(f"{path} is empty")


def _xml_items(path: Path, tag: str, keys: tuple[str, ...], notes: list[str]) -> Iterator[tuple[str, ...]]:
    """Attributes `keys` of every `tag` element of an XML file, streamed (bounded memory). A file that
    breaks off yields what comes before the break, and `notes` says where it broke."""
    try:
        with _open_xml(path) as f:
            for _, el in ET.iterparse(f):
                if el.tag == tag:
                    yield tuple(el.get(k, "") for k in keys)
                el.clear()
    except (ET.ParseError, OSError, EOFError) as exc:
        notes.append(f"{path.name} is not well-formed XML ({exc}): only what precedes that was compared")


def sumo_source(path: Path | str) -> SumoSource:
    """Find the SUMO network that `path` names: a `.net.xml[.gz]`, any file of a plain-XML set
    (`<stem>.edg.xml` plus its `.nod/.con/.tll/.typ.xml` siblings of the same stem), or a folder
    holding either. A folder holding both is built from its .net.xml: that is the network the
    scenario's author compiled and ran (their netconvert options, edited connections and signal
    plans), which a rebuild from plain XML with default options need not reproduce."""
    path = Path(path)
    if not path.exists():
        raise MapError(f"map source {path} does not exist")
    if path.is_dir():
        nets = sorted(p for p in path.iterdir() if p.name.endswith(NET_SUFFIXES))
        edges = sorted(p for p in path.iterdir() if (r := _plain_role(p.name)) is not None and r[1] == "edg")
        if len(nets) > 1:
            raise MapError(
                f"map source {path} holds several SUMO networks ({', '.join(p.name for p in nets)}): name one"
            )
        if nets:
            path = nets[0]
        elif len(edges) > 1:
            raise MapError(
                f"map source {path} holds several plain-XML edge files ({', '.join(p.name for p in edges)}): name one"
            )
        elif edges:
            path = edges[0]
        else:
            raise MapError(f"map source {path} holds no SUMO network (*.net.xml) nor plain-XML edges (*.edg.xml)")
    if path.name.endswith(NET_SUFFIXES):
        root = _xml_root(path)
        if root != "net":
            raise MapError(f"{path} is not a SUMO network: its root element is <{root}>, not <net>")
        stem = path.name[: -len(".net.xml.gz" if path.name.endswith(".gz") else ".net.xml")]
        return SumoSource("net", {"net": path}, stem)
    found = _plain_role(path.name)
    if found is None:
        raise MapError(
            f"map source {path}: not a SUMO network (.net.xml) nor a plain-XML file (.edg.xml, .nod.xml, ...)"
        )
    stem = found[0]
    files: dict[str, Path] = {}
    for role in PLAIN_ROLES:
        for suffix in (f".{role}.xml", f".{role}.xml.gz"):
            if (cand := path.with_name(stem + suffix)).is_file():
                files[role] = cand
                break
    for role, root_tag in (("edg", "edges"), ("nod", "nodes")):
        if role not in files:
            raise MapError(f"plain-XML network {path.parent / stem}: {stem}.{role}.xml is missing")
        if (root := _xml_root(files[role])) != root_tag:
            raise MapError(f"{files[role]} is not a SUMO {role} file: root element <{root}>, not <{root_tag}>")
    return SumoSource("plain", files, stem)


def _netconvert(args: list[str]) -> tuple[bool, list[str]]:
    """Run netconvert; (success, its Error/Warning lines). The full message list, unlike run_tool's tail."""
    proc = subprocess.run([str(binary("netconvert")), *args], capture_output=True, text=True, check=False)
    lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines()]
    return proc.returncode == 0, [ln for ln in lines if ln.startswith(("Error:", "Warning:"))]


def _dropped_items(src: SumoSource, net: Path, notes: list[str]) -> dict[str, list[str]]:
    """What the plain input declares and the built net lacks: edges, connections (edge pairs), signals."""
    net_edges: set[str] = set()
    net_conns: set[tuple[str, str]] = set()
    net_tls: set[str] = set()
    with _open_xml(net) as f:
        for _, el in ET.iterparse(f):
            if el.tag == "edge" and el.get("function") != "internal":
                net_edges.add(el.get("id", ""))
            elif el.tag == "connection" and not el.get("from", ":").startswith(":"):
                net_conns.add((el.get("from", ""), el.get("to", "")))
            elif el.tag == "tlLogic":
                net_tls.add(el.get("id", ""))
            el.clear()
    dropped: dict[str, list[str]] = {"edges": [], "connections": [], "traffic_lights": []}
    dropped["edges"] = [e for (e,) in _xml_items(src.files["edg"], "edge", ("id",), notes) if e not in net_edges]
    if "con" in src.files:
        seen: set[tuple[str, str]] = set()
        for a, b in _xml_items(src.files["con"], "connection", ("from", "to"), notes):
            # a connection without `to` declares that its edge has none: nothing to build
            if b and (a, b) not in net_conns and (a, b) not in seen:
                seen.add((a, b))
                dropped["connections"].append(f"{a} -> {b}")
    if "tll" in src.files:
        dropped["traffic_lights"] = sorted(
            {t for (t,) in _xml_items(src.files["tll"], "tlLogic", ("id",), notes)} - net_tls
        )
    return dropped


def _convert_plain(src: SumoSource, net_raw: Path) -> dict[str, Any]:
    """Build `net_raw` from a plain-XML set with the first rung of PLAIN_LADDER that works; return the
    report of what was dropped (manifest `dropped`)."""
    strict_errors: list[str] | None = None
    used: tuple[str, tuple[str, ...], tuple[str, ...]] | None = None
    for rung, options, left_out in PLAIN_LADDER:
        args = [a for r, f in src.files.items() if r not in left_out for a in (PLAIN_ROLES[r], str(f))]
        net_raw.unlink(missing_ok=True)
        ok, messages = _netconvert([*args, *options, "-o", str(net_raw)])
        errors = [m for m in messages if m.startswith("Error:")]
        if strict_errors is None:
            strict_errors = errors
        if ok and net_raw.exists():
            used = (rung, options, left_out)
            break
    if used is None:
        tail = "\n".join((strict_errors or [])[-8:])
        raise MapError(f"netconvert cannot build the plain-XML network {src.main}, even ignoring errors:\n{tail}")
    rung, options, left_out = used
    notes: list[str] = []
    dropped = _dropped_items(src, net_raw, notes)
    # netconvert's own word on what it skipped: the warnings naming a dropped id
    lost = {x for ids in dropped.values() for item in ids for x in item.split(" -> ")}
    said = [m for m in messages if m.startswith("Warning:") and lost & set(re.findall(r"'([^']*)'", m))]
    report: dict[str, Any] = {
        "netconvert": rung,
        "options": list(options),
        "files": [src.files[r].name for r in left_out if r in src.files],
        # why the strict build failed, what the rung that worked tolerated, and why items were dropped
        "messages": list(dict.fromkeys((strict_errors or []) + errors + said + notes))[:MAX_REPORTED],
    }
    for kind, ids in dropped.items():
        report[kind] = {"count": len(ids), "ids": ids[:MAX_REPORTED]}
    return report


def _source_digest(src: SumoSource) -> tuple[str, dict[str, dict[str, str]]]:
    files = {role: {"file": p.name, "sha256": _sha256(p)} for role, p in sorted(src.files.items())}
    if src.kind == "net":
        return files["net"]["sha256"], files
    text = "\n".join(f"{role} {f['sha256']}" for role, f in files.items())
    return hashlib.sha256(text.encode()).hexdigest(), files


def build_from_sumo(
    src: Path | str, out: Path | None = None, name: str | None = None, scc_only: bool = False
) -> MapBundle:
    """Build (or fetch from cache) the map folder of a SUMO network: a `.net.xml[.gz]` used as is, or a
    plain-XML set built with netconvert (see `sumo_source`). The manifest's `dropped` says what the
    conversion left out (nothing, for a .net.xml).

    Then, as for OSM, the net is cut to its largest strongly connected component, but by default its
    fringe is kept too (`core_and_fringe`): a scenario's demand starts on one-way entry edges and ends
    on exit edges, which are in no strongly connected component (URB's Ingolstadt: 15 of its 1,035
    trips have both ends in the core). Such a graph is not strongly connected (manifest
    `strongly_connected`, `core_edges`): an edge of the fringe may not reach a given destination.
    `scc_only` keeps the core alone, like OSM maps."""
    source = sumo_source(src)
    digest, files = _source_digest(source)
    plain = PLAIN_LADDER if source.kind == "plain" else None
    key = _build_key("sumo", source.kind, digest, plain, "core" if scc_only else "core+fringe")
    name = name or source.stem
    folder, bundle = _built(name, key, out)
    if bundle is not None:
        return bundle

    t0 = time.perf_counter()
    tmp = _tmp_for(folder)
    try:
        if source.kind == "net":
            net_raw = source.main
            dropped: dict[str, Any] = {"netconvert": "none (used as is)", "files": [], "messages": []}
            dropped.update({k: {"count": 0, "ids": []} for k in ("edges", "connections", "traffic_lights")})
        else:
            net_raw = tmp / "raw.net.xml"
            dropped = _convert_plain(source, net_raw)
        manifest: dict[str, Any] = {
            "name": name,
            "kind": f"sumo-{source.kind}",
            "source": str(source.main),
            "source_sha256": digest,
            "source_files": files,
            "build_key": key,
            "keep": "core" if scc_only else "core+fringe",
            "dropped": dropped,
        }
        bundle = _finish(tmp, folder, net_raw, manifest, fringe=not scc_only)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    bundle.manifest["build_seconds"] = round(time.perf_counter() - t0, 2)
    return bundle


def build_map(src: Path | str, out: Path | None = None, name: str | None = None, scc_only: bool = False) -> MapBundle:
    """Build a map from a source path: SUMO input (see `sumo_source`) or an OSM extract (always cut to
    its core: `scc_only` applies to SUMO input)."""
    if is_sumo_source(src):
        return build_from_sumo(src, out=out, name=name, scc_only=scc_only)
    return build_from_osm(src, out=out, name=name)


def build_grid(
    number: int = 5, length: float = 200.0, lanes: int = 1, speed: float = 13.89, out: Path | None = None
) -> MapBundle:
    """A SUMO `netgenerate` grid of number x number junctions."""
    if number < 2 or length <= 0 or lanes < 1 or speed <= 0:
        raise MapError(f"grid map: invalid size (number={number}, length={length}, lanes={lanes}, speed={speed})")
    key = _build_key("grid", number, length, lanes, speed)
    folder = Path(out) if out else cache_dir() / "maps" / f"grid{number}x{number}-{key}"
    if (folder / "manifest.json").exists():
        return MapBundle.load(folder, cached=True)
    tmp = _tmp_for(folder)
    try:
        net_raw = tmp / "raw.net.xml"
        run_tool(
            "netgenerate",
            [
                "--grid",
                "--grid.number",
                str(number),
                "--grid.length",
                str(length),
                "--default.lanenumber",
                str(lanes),
                "--default.speed",
                str(speed),
                "--no-turnarounds",
                "-o",
                str(net_raw),
            ],
            what="grid",
        )
        manifest = {
            "name": f"grid{number}x{number}",
            "kind": "grid",
            "source": "netgenerate",
            "build_key": key,
            "grid": {"number": number, "length": length, "lanes": lanes, "speed": speed},
        }
        return _finish(tmp, folder, net_raw, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_map(spec: str | Path) -> MapBundle:
    """A map by name ('helsinki', 'grid', 'ingolstadt'), by map folder, or by source (an OSM file, a
    SUMO .net.xml or plain-XML set, or a folder holding one; built on first use)."""
    text = str(spec)
    if text == "helsinki":
        return build_from_osm(shipped_osm("helsinki"), name="helsinki")
    if text == "grid":
        return build_grid()
    if text == "ingolstadt":
        return build_from_sumo(shipped_net("ingolstadt"), name="ingolstadt")
    path = Path(text)
    if path.is_dir() and (path / "manifest.json").exists():
        return MapBundle.load(path)
    if path.is_dir() and not any(p.name.endswith(NET_SUFFIXES) or _plain_role(p.name) for p in path.iterdir()):
        return MapBundle.load(path)  # neither a map folder nor SUMO input: MapBundle says what a map folder needs
    if path.exists():
        return build_map(path)
    raise MapError(
        f"unknown map {text!r}: not a built-in ({', '.join(BUILTIN_MAPS)}), a map folder, an OSM file or SUMO input"
    )

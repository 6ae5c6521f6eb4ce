"""Map folders: build a SUMO network + routing graph from OSM or a generated grid, cached by content.

A map folder holds:
  net.net.xml       the SUMO network (passenger roads, largest strongly connected component)
  roadgraph.json    the routing graph over SUMO edges (see roadgraph.py)
  osm_graph.graphml the drivable osmnx graph (OSM maps only; for prompts and analysis)
  manifest.json     source, source SHA-256, build key, counts, bbox, tool versions

The folder name carries a hash of the source bytes and the build settings, so building the same
source twice returns the existing folder without work.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import MapError
from .roadgraph import RoadGraph
from .sumo_tools import run_tool, sumo_home

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

BUILTIN_MAPS = ("helsinki", "grid")
MIN_EDGES = 4


def cache_dir() -> Path:
    """Where built maps live: $RELED_HPC_CACHE, else ~/.cache/reled_hpc."""
    root = os.environ.get("RELED_HPC_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "reled_hpc"


def shipped_osm(name: str = "helsinki") -> Path:
    """The OSM extract that ships inside the package."""
    path = Path(str(resources.files("reled_hpc") / "data" / "maps" / name / f"{name}.osm.pbf"))
    if not path.exists():
        raise MapError(f"shipped map data {path} is missing from the installation")
    return path


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


def _finish(tmp: Path, folder: Path, net_raw: Path, manifest: dict[str, Any]) -> MapBundle:
    """Restrict the raw net to its largest SCC, write the routing graph and manifest, publish."""
    raw_graph = RoadGraph.from_sumo_net(net_raw)
    scc = raw_graph.largest_scc()
    if len(scc) < MIN_EDGES:
        raise MapError(
            f"{manifest['source']}: the drivable network is too small "
            f"(largest strongly connected part has {len(scc)} edges, need >= {MIN_EDGES})"
        )
    keep = tmp / "keep_edges.txt"
    keep.write_text("\n".join(sorted(scc)) + "\n")
    run_tool(
        "netconvert",
        ["-s", str(net_raw), "--keep-edges.input-file", str(keep), "-o", str(tmp / "net.net.xml")],
        what=str(manifest["source"]),
    )
    graph = RoadGraph.from_sumo_net(tmp / "net.net.xml")
    if len(graph.largest_scc()) != graph.n_edges:  # netconvert may drop connections at cut junctions
        graph = RoadGraph.from_sumo_net(tmp / "net.net.xml", keep=graph.largest_scc())
    graph.to_json(tmp / "roadgraph.json")
    net_raw.unlink()
    keep.unlink()
    manifest.update(
        sumo_edges_raw=raw_graph.n_edges,
        sumo_edges=graph.n_edges,
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


def build_from_osm(src: Path | str, out: Path | None = None, name: str | None = None) -> MapBundle:
    """Build (or fetch from cache) the map folder of an OSM extract."""
    from .osm import check_source, clean_extract, osmnx_graph

    src = Path(src)
    check_source(src)
    digest = _sha256(src)
    key = _build_key("osm", digest, NETCONVERT_OSM_ARGS)
    name = name or src.name.split(".")[0]
    folder = Path(out) if out else cache_dir() / "maps" / f"{name}-{key}"
    if (folder / "manifest.json").exists():
        bundle = MapBundle.load(folder, cached=True)
        if bundle.manifest.get("build_key") == key:
            return bundle
        raise MapError(f"output folder {folder} holds a different map (build key {bundle.manifest.get('build_key')})")

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
    """A map by name ('helsinki', 'grid'), by map folder, or by OSM file (built on first use)."""
    text = str(spec)
    if text == "helsinki":
        return build_from_osm(shipped_osm("helsinki"), name="helsinki")
    if text == "grid":
        return build_grid()
    path = Path(text)
    if path.is_dir():
        return MapBundle.load(path)
    if path.exists():
        return build_from_osm(path)
    raise MapError(f"unknown map {text!r}: not a built-in ({', '.join(BUILTIN_MAPS)}), a map folder or an OSM file")

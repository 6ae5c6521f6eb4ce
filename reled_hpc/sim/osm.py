"""OpenStreetMap input: turn an extract (.osm XML or .osm.pbf) into a clean, drivable-only OSM XML.

Extracts are clipped: ways reference nodes outside the file, which osmnx's `graph_from_xml`
rejects ("Some edges missing nodes"). We keep only drivable highway ways (osmnx's `drive`
filter), drop references to absent nodes, and keep turn-restriction relations for netconvert.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import MapError

OSM_SUFFIXES = (".osm", ".osm.xml", ".xml", ".osm.pbf", ".pbf", ".osm.gz", ".osm.bz2")

# osmnx's "drive" network type, as tag rules.
DRIVABLE_HIGHWAYS = frozenset(
    {
        *("motorway", "motorway_link", "trunk", "trunk_link", "primary", "primary_link"),
        *("secondary", "secondary_link", "tertiary", "tertiary_link", "unclassified"),
        *("residential", "living_street", "road", "service"),
    }
)
EXCLUDED_SERVICE = frozenset({"parking", "parking_aisle", "private", "emergency_access", "driveway"})
NO_ACCESS = frozenset({"no", "private"})


@dataclass
class CleanStats:
    nodes: int
    ways_read: int
    drivable_ways: int
    refs_dropped: int
    relations: int


def is_drivable(tags: dict[str, str]) -> bool:
    if tags.get("highway") not in DRIVABLE_HIGHWAYS:
        return False
    if tags.get("area") == "yes" or tags.get("service") in EXCLUDED_SERVICE:
        return False
    return not any(tags.get(k) in NO_ACCESS for k in ("access", "motor_vehicle", "motorcar"))


def check_source(src: Path) -> None:
    if not src.exists():
        raise MapError(f"map source {src} does not exist")
    if not src.is_file():
        raise MapError(f"map source {src} is not a file")
    if not any(src.name.lower().endswith(s) for s in OSM_SUFFIXES):
        raise MapError(f"map source {src}: unsupported file type (expected one of {', '.join(OSM_SUFFIXES)})")


def clean_extract(src: Path, dst: Path) -> CleanStats:
    """Write the drivable part of `src` to `dst` (OSM XML). Raises MapError naming `src`."""
    import osmium

    check_source(src)
    node_ids: set[int] = set()
    try:
        for obj in osmium.FileProcessor(str(src), osmium.osm.NODE):
            node_ids.add(obj.id)
    except RuntimeError as exc:
        raise MapError(f"map source {src} is not a readable OSM file: {exc}") from exc
    if not node_ids:
        raise MapError(f"map source {src} holds no OSM nodes: not an OSM extract, or empty")

    used: set[int] = set()
    ways = []
    ways_read = refs_dropped = 0
    relations = []
    for obj in osmium.FileProcessor(str(src), osmium.osm.WAY | osmium.osm.RELATION):
        if obj.is_way():
            ways_read += 1
            tags = dict(obj.tags)
            if not is_drivable(tags):
                continue
            refs = [n.ref for n in obj.nodes if n.ref in node_ids]
            refs_dropped += len(obj.nodes) - len(refs)
            if len(refs) < 2:
                continue
            used.update(refs)
            # copy out: osmium objects die with the iteration step that produced them
            ways.append(osmium.osm.mutable.Way(id=obj.id, version=obj.version, nodes=refs, tags=tags))
        elif obj.tags.get("type") == "restriction":
            members = [(m.type, m.ref, m.role) for m in obj.members]
            relations.append(
                osmium.osm.mutable.Relation(id=obj.id, version=obj.version, members=members, tags=dict(obj.tags))
            )
    if not ways:
        raise MapError(f"map source {src} has no drivable roads ({ways_read} ways, none a drivable highway)")

    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    writer = osmium.SimpleWriter(str(dst))
    try:
        for obj in osmium.FileProcessor(str(src), osmium.osm.NODE):
            if obj.id in used:
                writer.add_node(obj)
        for way in ways:
            writer.add_way(way)
        for rel in relations:
            writer.add_relation(rel)
    finally:
        writer.close()
    return CleanStats(len(used), ways_read, len(ways), refs_dropped, len(relations))


def osmnx_graph(xml: Path):
    """The drivable OSM graph (osmnx MultiDiGraph) of a cleaned extract."""
    import osmnx as ox

    try:
        return ox.graph_from_xml(str(xml), simplify=True, retain_all=False)
    except Exception as exc:  # osmnx raises assorted types on unusable data
        raise MapError(f"osmnx could not build a graph from {xml}: {exc}") from exc


def download_place(place: str, dst: Path, timeout_s: float = 60.0) -> Path:
    """Download the drivable network of `place` with osmnx and save it as OSM XML (needs internet)."""
    import osmnx as ox

    ox.settings.requests_timeout = timeout_s
    ox.settings.all_oneway = True  # required by save_graph_xml for a faithful OSM XML
    try:
        graph = ox.graph_from_place(place, network_type="drive", simplify=False)
    except Exception as exc:
        raise MapError(
            f"could not download the road network of place {place!r} with osmnx: {exc}. "
            "This needs internet access to Nominatim and Overpass; offline, pass an OSM file instead."
        ) from exc
    dst.parent.mkdir(parents=True, exist_ok=True)
    ox.io.save_graph_xml(graph, filepath=str(dst))
    return dst

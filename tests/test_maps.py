"""Map building with the real toolchain (osmium, osmnx, netconvert, netgenerate)."""

import json
import os

import numpy as np
import pytest

from reled_hpc.errors import ConfigError, MapError
from reled_hpc.sim.maps import (
    MapBundle,
    build_from_osm,
    build_from_sumo,
    build_grid,
    core_and_fringe,
    resolve_map,
    shipped_net,
    shipped_osm,
)

FOOTWAY_ONLY = """<?xml version='1.0' encoding='UTF-8'?>
<osm version="0.6">
  <node id="1" lat="60.1700" lon="24.9400"/>
  <node id="2" lat="60.1710" lon="24.9410"/>
  <node id="3" lat="60.1720" lon="24.9400"/>
  <way id="10"><nd ref="1"/><nd ref="2"/><nd ref="3"/><tag k="highway" v="footway"/></way>
</osm>
"""


def test_shipped_helsinki_builds(helsinki):
    m = helsinki.manifest
    assert m["name"] == "helsinki" and m["kind"] == "osm"
    assert m["source_sha256"] == "b73e9c2c82054d654209b0127f1c3287d5900d6780a6083bf3a45ead8ba3e5ee"
    assert "OpenStreetMap contributors" in m["attribution"]
    # the largest strongly connected component is kept, and it is smaller than the raw net
    assert 100 < m["sumo_edges"] < m["sumo_edges_raw"]
    assert m["osmnx_edges"] > 0 and len(m["bbox_lonlat"]) == 4
    lon0, lat0, lon1, lat1 = m["bbox_lonlat"]
    assert 24.9 < lon0 < lon1 < 25.0 and 60.1 < lat0 < lat1 < 60.2  # central Helsinki
    for f in ("net.net.xml", "roadgraph.json", "osm_graph.graphml", "manifest.json"):
        assert (helsinki.folder / f).stat().st_size > 0


def test_built_network_is_strongly_connected(helsinki):
    g = helsinki.graph
    assert len(g.largest_scc()) == g.n_edges
    # the SUMO net holds exactly the routing graph's edges
    import sumolib

    net = sumolib.net.readNet(str(helsinki.net_file))
    sumo_edges = {e.getID() for e in net.getEdges() if e.getFunction() != "internal" and e.allows("passenger")}
    assert sumo_edges == set(g.edge_ids)


def test_second_build_is_a_cache_hit(helsinki):
    stamp = (helsinki.folder / "net.net.xml").stat().st_mtime_ns
    again = build_from_osm(shipped_osm("helsinki"), name="helsinki")
    assert again.cached and again.folder == helsinki.folder
    assert (helsinki.folder / "net.net.xml").stat().st_mtime_ns == stamp


def test_cli_map_build_twice(cli, tmp_path):
    out = tmp_path / "hel"
    first = cli("map", "build", str(shipped_osm("helsinki")), "--out", str(out))
    assert first.returncode == 0, first.stderr
    assert "built in" in first.stdout
    second = cli("map", "build", str(shipped_osm("helsinki")), "--out", str(out))
    assert second.returncode == 0 and "cached (no work done)" in second.stdout
    info = cli("map", "info", str(out))
    assert json.loads(info.stdout)["sumo_edges"] > 100


def test_grid_map(grid):
    g = grid.graph
    assert grid.manifest["kind"] == "grid" and g.n_edges == 80  # 5x5 junctions, both directions
    assert len(g.largest_scc()) == g.n_edges


def test_missing_file(tmp_path):
    with pytest.raises(MapError, match="does not exist"):
        build_from_osm(tmp_path / "nowhere.osm")


def test_not_osm(tmp_path):
    bad = tmp_path / "notes.osm"
    bad.write_text("this is not XML at all\n")
    with pytest.raises(MapError, match=r"notes\.osm is not a readable OSM file"):
        build_from_osm(bad)


def test_wrong_extension(tmp_path):
    bad = tmp_path / "map.csv"
    bad.write_text("a,b\n")
    with pytest.raises(MapError, match="unsupported file type"):
        build_from_osm(bad)


def test_no_drivable_roads(tmp_path):
    src = tmp_path / "park.osm"
    src.write_text(FOOTWAY_ONLY)
    with pytest.raises(MapError, match=r"park\.osm has no drivable roads"):
        build_from_osm(src)
    # a failed build leaves no half-built folder behind
    from reled_hpc.sim.maps import cache_dir

    assert not [p for p in (cache_dir() / "maps").iterdir() if "park" in p.name]


def test_unknown_map_name():
    with pytest.raises(MapError, match="unknown map 'atlantis'"):
        resolve_map("atlantis")


def test_incomplete_map_folder(tmp_path, helsinki):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps(helsinki.manifest))
    with pytest.raises(MapError, match=r"net.net.xml is missing"):
        MapBundle.load(folder)
    with pytest.raises(MapError, match=r"no manifest.json"):
        MapBundle.load(tmp_path)


def test_graph_too_small_for_agents(grid):
    from reled_hpc.sim.env import EnvConfig, NavigationEnv

    with pytest.raises(ConfigError, match=r"too small for 5000 agents"):
        NavigationEnv(EnvConfig(map="grid", n_agents=5000), grid)


def test_min_trip_longer_than_map(grid):
    from reled_hpc.sim.demand import sample_od

    with pytest.raises(ConfigError, match="too small for min_trip_m"):
        sample_od(grid.graph, np.random.default_rng(0), min_trip_m=50_000)


def test_invalid_grid():
    with pytest.raises(MapError, match="invalid size"):
        build_grid(number=1)


def test_place_download_fails_clearly_offline(tmp_path):
    from reled_hpc.sim.osm import download_place

    if os.environ.get("RELED_HPC_ONLINE"):
        pytest.skip("online: the download would succeed")  # this sandbox and CI have no internet
    with pytest.raises(MapError, match="could not download the road network of place 'Atlantis'"):
        download_place("Atlantis", tmp_path / "a.osm", timeout_s=5)


# ---- SUMO input (URB's Ingolstadt, shipped) ---------------------------------------------------------
INGOLSTADT_SHA256 = "596c95a4bd323c7afd1ed9909c86f4bbc4b7aabeae0038d5da3d2a1f51335aa2"  # the shipped .net.xml.gz


def _plain_ingolstadt(folder):
    """Plain XML (.nod/.edg/.con/.tll/.typ.xml) of the shipped net, as a scenario export would give."""
    from reled_hpc.sim.sumo_tools import run_tool

    folder.mkdir()
    run_tool("netconvert", ["-s", str(shipped_net()), "--plain-output-prefix", str(folder / "ingolstadt")], what="test")
    (folder / "ingolstadt.netccfg").unlink()
    return folder / "ingolstadt.edg.xml"


def _sumo_edge_ids(net_file):
    import sumolib

    net = sumolib.net.readNet(str(net_file))
    return {e.getID() for e in net.getEdges() if e.getFunction() != "internal" and e.allows("passenger")}


def test_shipped_ingolstadt_builds(ingolstadt):
    m = ingolstadt.manifest
    assert m["name"] == "ingolstadt" and m["kind"] == "sumo-net" and m["keep"] == "core+fringe"
    assert m["source_sha256"] == INGOLSTADT_SHA256
    # 853 passenger edges; 724 form the largest strongly connected core, 124 more lead into or out of
    # it (the scenario's entries and exits), 5 do neither and are cut
    assert (m["sumo_edges_raw"], m["sumo_edges"], m["core_edges"]) == (853, 848, 724)
    assert m["strongly_connected"] is False
    d = m["dropped"]
    assert d["files"] == [] and all(d[k]["count"] == 0 for k in ("edges", "connections", "traffic_lights"))
    g = ingolstadt.graph
    core, fringe = core_and_fringe(g)
    assert len(core) == 724 and len(core) + len(fringe) == g.n_edges
    assert _sumo_edge_ids(ingolstadt.net_file) == set(g.edge_ids)


def test_ingolstadt_second_build_is_a_cache_hit(ingolstadt):
    again = resolve_map("ingolstadt")
    assert again.cached and again.folder == ingolstadt.folder


def test_sumo_net_scc_only(tmp_path, ingolstadt):
    bundle = build_from_sumo(shipped_net(), out=tmp_path / "core", scc_only=True)
    m = bundle.manifest
    assert (m["sumo_edges"], m["core_edges"], m["strongly_connected"]) == (724, 724, True)
    assert len(bundle.graph.largest_scc()) == bundle.graph.n_edges
    assert set(bundle.graph.edge_ids) == core_and_fringe(ingolstadt.graph)[0]


def test_plain_xml_build_drops_and_reports_a_bad_connection(tmp_path, cli, ingolstadt):
    edg = _plain_ingolstadt(tmp_path / "plain")
    con = edg.with_name("ingolstadt.con.xml")
    text = con.read_text()
    at = text.index('<connection from="') + len('<connection from="')
    to = text[text.index('to="', at) + 4 :].split('"', 1)[0]
    con.write_text(text[:at] + "joined_away" + text[text.index('"', at) :])  # an edge that no longer exists

    res = cli("map", "build", str(edg), "--out", str(tmp_path / "map"))
    assert res.returncode == 0, res.stderr
    assert f"connections: 1 (joined_away -> {to})" in res.stdout
    m = MapBundle.load(tmp_path / "map").manifest
    d = m["dropped"]
    assert m["kind"] == "sumo-plain" and set(m["source_files"]) == {"nod", "edg", "con", "tll", "typ"}
    assert d["netconvert"] != "strict" and "--ignore-errors.connections" in d["options"]
    assert d["connections"] == {"count": 1, "ids": [f"joined_away -> {to}"]}
    assert d["edges"]["count"] == 0 and d["files"] == []
    assert "Warning: The connection-source edge 'joined_away' is not known." in d["messages"]
    # the rest of the network is the shipped one
    assert m["sumo_edges"] == ingolstadt.manifest["sumo_edges"]
    assert set(MapBundle.load(tmp_path / "map").graph.edge_ids) == set(ingolstadt.graph.edge_ids)


def test_plain_xml_with_a_broken_connection_file(tmp_path):
    edg = _plain_ingolstadt(tmp_path / "plain")
    con = edg.with_name("ingolstadt.con.xml")
    con.write_bytes(con.read_bytes()[:50_000])  # cut off mid-element
    m = build_from_sumo(edg, out=tmp_path / "map").manifest
    d = m["dropped"]
    assert d["netconvert"] in ("--ignore-errors", "without the connection and traffic-light files")
    assert any("ingolstadt.con.xml is not well-formed XML" in e for e in d["messages"])
    assert m["sumo_edges"] > 800


def test_folder_with_net_and_plain_xml_uses_the_net(tmp_path, ingolstadt):
    _plain_ingolstadt(tmp_path / "both")
    (tmp_path / "both" / "ingolstadt.net.xml.gz").write_bytes(shipped_net().read_bytes())
    bundle = resolve_map(tmp_path / "both")
    assert bundle.manifest["kind"] == "sumo-net" and bundle.manifest["source_sha256"] == INGOLSTADT_SHA256
    assert bundle.folder == ingolstadt.folder.with_name(f"ingolstadt-{bundle.manifest['build_key']}")


def test_plain_xml_folder(tmp_path):
    _plain_ingolstadt(tmp_path / "plain")
    bundle = build_from_sumo(tmp_path / "plain", out=tmp_path / "map")
    assert bundle.manifest["kind"] == "sumo-plain" and bundle.manifest["name"] == "ingolstadt"


def test_sumo_input_errors(tmp_path):
    from reled_hpc.sim.maps import cache_dir

    routes = tmp_path / "demand.net.xml"
    routes.write_text("<routes/>\n")
    with pytest.raises(MapError, match=r"demand\.net\.xml is not a SUMO network: its root element is <routes>"):
        build_from_sumo(routes)
    broken = tmp_path / "broken.net.xml"
    broken.write_text("<net><edge id=")
    with pytest.raises(MapError, match=r"broken\.net\.xml: cannot read the SUMO network broken\.net\.xml"):
        build_from_sumo(broken)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MapError, match=r"holds no SUMO network \(\*\.net\.xml\) nor plain-XML edges"):
        build_from_sumo(empty)
    lonely = tmp_path / "lonely.edg.xml"
    lonely.write_text("<edges/>\n")
    with pytest.raises(MapError, match=r"lonely\.nod\.xml is missing"):
        build_from_sumo(lonely)
    # nodes without roads: netconvert refuses even with --ignore-errors
    (tmp_path / "lonely.nod.xml").write_text('<nodes><node id="a" x="0" y="0"/><node id="b" x="100" y="0"/></nodes>\n')
    with pytest.raises(MapError, match=r"cannot build the plain-XML network \S*lonely\.edg\.xml.*\n.*No edges"):
        build_from_sumo(lonely)
    # one one-way road: built, but too small to route on; nothing is left behind
    lonely.write_text('<edges><edge id="ab" from="a" to="b" numLanes="1" speed="13.9"/></edges>\n')
    with pytest.raises(MapError, match=r"lonely\.edg\.xml: the drivable network is too small"):
        build_from_sumo(lonely)
    assert not [p for p in (cache_dir() / "maps").iterdir() if p.name.startswith(("lonely", ".lonely"))]
    two = tmp_path / "two"
    two.mkdir()
    for n in ("a", "b"):
        (two / f"{n}.net.xml").write_text("<net/>\n")
    with pytest.raises(MapError, match=r"several SUMO networks \(a\.net\.xml, b\.net\.xml\)"):
        build_from_sumo(two)

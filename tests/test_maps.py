"""Map building with the real toolchain (osmium, osmnx, netconvert, netgenerate)."""

import json
import os

import numpy as np
import pytest

from reled_hpc.errors import ConfigError, MapError
from reled_hpc.sim.maps import MapBundle, build_from_osm, build_grid, resolve_map, shipped_osm

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

"""Demand files: SUMO trips/routes XML and URB's agents.csv + od file, on the grid and Ingolstadt maps."""

import ast
import gzip

import numpy as np
import pytest

from reled_hpc.errors import ConfigError
from reled_hpc.sim.maps import shipped_dir
from reled_hpc.sim.tripfile import FileTrip, read_demand

OD = "{\n\"origins\" : ['A0A1', 'B0B1'],\n\"destinations\" : ['A3A4', 'E4E3']\n}\n"


def _routes(tmp_path, body: str, name: str = "d.rou.xml"):
    path = tmp_path / name
    path.write_text(f'<?xml version="1.0" encoding="UTF-8"?>\n<routes>\n{body}</routes>\n')
    return path


def _urb(tmp_path, rows: str, od: str = OD, header: str = "id,start_time,origin,destination,kind"):
    (tmp_path / "od_grid.txt").write_text(od)
    path = tmp_path / "agents.csv"
    path.write_text(f"{header}\n{rows}")
    return path


def test_shipped_ingolstadt_demand(ingolstadt):
    folder = shipped_dir("ingolstadt")
    trips = read_demand(folder / "agents.csv", ingolstadt.graph)
    assert len(trips) == 1035
    assert read_demand(folder, ingolstadt.graph) == trips  # the folder finds agents.csv
    departs = [t.depart for t in trips]
    assert departs == sorted(departs) and departs[0] == 5.0 and departs[-1] == 1798.0
    assert all(t.agent is False and t.route is None for t in trips)  # URB's file: all "Human"
    od = ast.literal_eval((folder / "od_ingolstadt_custom.txt").read_text())
    g = ingolstadt.graph
    first = trips[0]  # id 0: origin 0, destination 0
    assert first.vid == "0"
    assert (g.edge_ids[first.origin], g.edge_ids[first.dest]) == (od["origins"][0], od["destinations"][0])
    for t in trips:  # every trip is routable on the map (entries and exits around the core are kept)
        assert np.isfinite(g.cost_to(t.dest)[t.origin])


def test_sumo_xml_forms(tmp_path, grid):
    g = grid.graph
    path = _routes(
        tmp_path,
        '  <vType id="car"/>\n'
        '  <route id="r1" edges="A0A1 A1A2 A2A3"/>\n'
        '  <trip id="t" depart="30" from="A0A1" to="E4E3"/>\n'
        '  <vehicle id="v" depart="0:00:10"><route edges="B0B1 B1B2"/></vehicle>\n'
        '  <vehicle id="w" depart="20" route="r1"/>\n'
        '  <vehicle id="x" depart="40" from="B0B1" to="A3A4" type="car"/>\n'
        '  <flow id="f" begin="0" end="100" number="4" from="A0A1" to="A3A4"/>\n'
        '  <flow id="p" begin="50" end="80" period="10" route="r1"/>\n'
        '  <flow id="h" begin="0" end="3600" vehsPerHour="2"><route edges="A0A1 A1A2"/></flow>\n',
    )
    trips = read_demand(path, g)
    got = {t.vid: t for t in trips}
    assert [t.depart for t in trips] == sorted(t.depart for t in trips)
    assert got["t"] == FileTrip("t", 30.0, g.index["A0A1"], g.index["E4E3"], None, None)
    assert got["v"].depart == 10.0 and got["v"].route == (g.index["B0B1"], g.index["B1B2"])
    assert got["w"].route == tuple(g.index[e] for e in ("A0A1", "A1A2", "A2A3")) and got["w"].dest == g.index["A2A3"]
    assert got["x"].route is None and got["x"].origin == g.index["B0B1"]
    assert [got[f"f.{i}"].depart for i in range(4)] == [0.0, 25.0, 50.0, 75.0] and "f.4" not in got
    assert [got[f"p.{i}"].depart for i in range(3)] == [50.0, 60.0, 70.0] and "p.3" not in got
    assert [got[f"h.{i}"].depart for i in range(2)] == [0.0, 1800.0] and got["h.0"].route is not None
    assert all(t.agent is None for t in trips)


def test_gzipped_xml_and_folder(tmp_path, grid):
    with gzip.open(tmp_path / "d.trips.xml.gz", "wt") as f:
        f.write('<routes><trip id="a" depart="1" from="A0A1" to="A3A4"/></routes>\n')
    assert [t.vid for t in read_demand(tmp_path, grid.graph)] == ["a"]


def test_urb_csv_agent_kinds(tmp_path, grid):
    path = _urb(tmp_path, "0,5,0,0,Human\n1,3,1,1,AV\n2,4,0,1,\n")
    trips = read_demand(path, grid.graph)
    assert [(t.vid, t.depart, t.agent) for t in trips] == [("1", 3.0, True), ("2", 4.0, None), ("0", 5.0, False)]
    g = grid.graph
    assert (trips[0].origin, trips[0].dest) == (g.index["B0B1"], g.index["E4E3"])
    # without a kind column nothing is marked
    path = _urb(tmp_path, "0,5,0,0\n", header="id,start_time,origin,destination")
    assert read_demand(path, g)[0].agent is None


# ---- errors: each names the file and the line or id ---------------------------------------------------
@pytest.mark.parametrize(
    ("body", "match"),
    [
        ('<trip id="a" depart="1" from="nowhere" to="A3A4"/>', r"d\.rou\.xml:3 \(trip 'a'\): edge 'nowhere' is not in"),
        ('<vehicle id="v" depart="1"><route edges="A0A1 C2C3"/></vehicle>', r":3 \(vehicle 'v'\): the route is broken"),
        ('<vehicle id="v" depart="1" route="r9"/>', r":3 \(vehicle 'v'\): route 'r9' is not defined"),
        ('<trip id="a" depart="-1" from="A0A1" to="A3A4"/>', r":3 \(trip 'a'\): depart: negative value '-1'"),
        ('<trip id="a" depart="soon" from="A0A1" to="A3A4"/>', r":3 \(trip 'a'\): depart: 'soon' is not a number"),
        ('<trip id="a" from="A0A1" to="A3A4"/>', r":3 \(trip 'a'\): no depart"),
        ('<trip id="a" depart="1" fromTaz="z1" toTaz="z2"/>', r":3 \(trip 'a'\): needs from and to edges or a route"),
        ('<trip id="a" depart="1" from="A0A1" to="A3A4" via="B1B2"/>', r":3 \(trip 'a'\): via is not supported"),
        ('<flow id="f" begin="0" end="9" probability="0.1" from="A0A1" to="A3A4"/>', r":3 \(flow 'f'\): random flows"),
        ('<flow id="f" begin="0" end="9" from="A0A1" to="A3A4"/>', r"a flow needs number, period or vehsPerHour"),
        ('<flow id="f" end="20" period="10" number="5" from="A0A1" to="A3A4"/>', r"give end or number, not both"),
        (
            '<trip id="a" depart="1" from="A0A1" to="A3A4"/>\n<trip id="a" depart="2" from="A0A1" to="A3A4"/>',
            r":4 \(trip 'a'\): duplicate id",
        ),
        ('<vType id="car"/>', r"d\.rou\.xml holds no trips"),
    ],
)
def test_xml_errors(tmp_path, grid, body, match):
    path = _routes(tmp_path, f"  {body}\n")
    with pytest.raises(ConfigError, match=match):
        read_demand(path, grid.graph)


def test_not_demand(tmp_path, grid):
    net = tmp_path / "x.rou.xml"
    net.write_text("<net/>\n")
    with pytest.raises(ConfigError, match=r"x\.rou\.xml is a SUMO network, not demand"):
        read_demand(net, grid.graph)
    other = tmp_path / "y.xml"
    other.write_text("<additional/>\n")
    with pytest.raises(ConfigError, match=r"y\.xml is not SUMO demand XML: root element <additional>"):
        read_demand(other, grid.graph)
    text = tmp_path / "z.txt"
    text.write_text("just some words\n")
    with pytest.raises(ConfigError, match=r"z\.txt is not SUMO demand XML \(nor a URB agents CSV\): line 1"):
        read_demand(text, grid.graph)
    with pytest.raises(ConfigError, match=r"nowhere\.xml does not exist"):
        read_demand(tmp_path / "nowhere.xml", grid.graph)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"demand folder \S*empty holds no demand file"):
        read_demand(empty, grid.graph)


def test_no_path(tmp_path, ingolstadt):
    # an exit edge (no successor) to an entry edge (no predecessor): both on the map, no path between
    g = ingolstadt.graph
    into = np.zeros(g.n_edges, dtype=int)
    np.add.at(into, g.succ_idx, 1)
    exit_, entry = g.edge_ids[int(np.flatnonzero(g.out_degree == 0)[0])], g.edge_ids[int(np.flatnonzero(into == 0)[0])]
    path = _routes(tmp_path, f'  <trip id="a" depart="1" from="{exit_}" to="{entry}"/>\n')
    with pytest.raises(
        ConfigError, match=rf":3 \(trip 'a'\): no path in the map from edge '{exit_}' to edge '{entry}'"
    ):
        read_demand(path, g)


@pytest.mark.parametrize(
    ("rows", "od", "match"),
    [
        ("0,5,7,0,Human\n", OD, r"agents\.csv line 2 \(id 0\): origin index 7 is out of range: od_grid\.txt has 2"),
        ("0,5,0,x,Human\n", OD, r"line 2 \(id 0\): destination 'x' is not an index into od_grid\.txt"),
        ("0,5,0,0,Human\n1,-5,0,0,Human\n", OD, r"line 3 \(id 1\): start_time: negative value '-5'"),
        ("0,5,0,0,Pilot\n", OD, r"line 2 \(id 0\): unknown kind 'Pilot'"),
        ("0,5,0,0,Human\n0,6,0,0,Human\n", OD, r"line 3 \(id 0\): duplicate id"),
        (
            "0,5,0,0,Human\n",
            OD.replace("A0A1", "gone"),
            r"line 2 \(id 0\): origin 0 of od_grid\.txt: edge 'gone' is not",
        ),
        ("0,5,0,0,Human\n", "{'origins': [", r"od_grid\.txt does not parse as a Python literal"),
        ("0,5,0,0,Human\n", "{'origins': ['A0A1']}", r"od_grid\.txt: expected a dict with a list of edge ids under"),
        ("0,5,0,0,Human\n", "__import__('os').system('true')", r"od_grid\.txt does not parse as a Python literal"),
        ("", OD, r"agents\.csv holds no trips"),
    ],
)
def test_urb_errors(tmp_path, grid, rows, od, match):
    path = _urb(tmp_path, rows, od)
    with pytest.raises(ConfigError, match=match):
        read_demand(path, grid.graph)


def test_urb_file_errors(tmp_path, grid):
    path = _urb(tmp_path, "0,5,0,0\n", header="id,when,from,to")
    with pytest.raises(ConfigError, match=r"agents\.csv is not a URB agents CSV: its columns are"):
        read_demand(path, grid.graph)
    path = _urb(tmp_path, "0,5,0,0,Human\n")
    (tmp_path / "od_grid.txt").unlink()
    with pytest.raises(ConfigError, match=r"agents\.csv: no od_<network>\.txt next to it"):
        read_demand(path, grid.graph)
    for name in ("od_a.txt", "od_b.txt"):
        (tmp_path / name).write_text(OD)
    with pytest.raises(ConfigError, match=r"agents\.csv: several od files next to it \(od_a\.txt, od_b\.txt\)"):
        read_demand(path, grid.graph)

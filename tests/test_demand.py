"""Agents' demand (env.demand): uniform, commute zones and trip files, on the shipped map and real SUMO."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest

from reled_hpc.config import from_dict
from reled_hpc.errors import ConfigError
from reled_hpc.sim import demand as dm
from reled_hpc.sim.demand import (
    DemandConfig,
    agent_trips,
    background_trips,
    commute_zones,
    file_demand,
    sample_od,
    scenario_trips,
)
from reled_hpc.sim.env import EnvConfig, NavigationEnv
from reled_hpc.sim.policies import make_policy, run_episode


def _commute(n: int = 100, **kw) -> EnvConfig:
    demand = DemandConfig("commute", **kw)
    return EnvConfig(map="helsinki", n_agents=n, traffic="light", horizon_s=1200.0, demand=demand)


def _mid(graph, e: int) -> np.ndarray:
    return 0.5 * (graph.start_xy[e] + graph.end_xy[e])


# ---- uniform ----------------------------------------------------------------------------------------


def test_uniform_is_todays_demand(helsinki):
    g = helsinki.graph
    cfg = EnvConfig(map="helsinki", n_agents=30, traffic="medium", depart_window_s=45.0)
    assert cfg.demand.kind == "uniform"
    for seed in (0, 7):
        agents, bg = scenario_trips(g, cfg, seed)
        rng = np.random.default_rng(seed)  # the draws of today's demand, in today's order
        assert agents == agent_trips(g, cfg.n_agents, rng, cfg.min_trip_m, cfg.depart_window_s)
        assert bg == background_trips(g, cfg.traffic, cfg.horizon_s, rng)
        assert all(t.route is None for t in agents + bg)


# ---- commute ----------------------------------------------------------------------------------------


def test_commute_trips_inside_zones_and_peak(helsinki):
    g = helsinki.graph
    cfg = _commute()
    d = cfg.demand
    zones = commute_zones(g, d)
    assert len(zones.origins) == d.origin_zones and len(zones.dests) == d.dest_zones
    centres = [np.array(z.center) for z in zones.origins + zones.dests]
    # zones far apart: origin zones do not overlap, and every origin lies far from every destination
    assert np.linalg.norm(centres[0] - centres[1]) > 2 * d.zone_radius_m
    assert min(np.linalg.norm(np.array(o.center) - np.array(z.center)) for o in zones.origins for z in zones.dests) > (
        cfg.min_trip_m
    )
    agents, bg = scenario_trips(g, cfg, 0)
    assert [t.vid for t in agents] == [f"a{i}" for i in range(cfg.n_agents)]
    for t in agents:
        assert 0.0 <= t.depart < d.peak_window_s
        assert min(np.linalg.norm(_mid(g, t.origin) - z.center) for z in zones.origins) <= d.zone_radius_m
        assert min(np.linalg.norm(_mid(g, t.dest) - z.center) for z in zones.dests) <= d.zone_radius_m
        assert g.cost_to(t.dest)[t.origin] >= cfg.min_trip_m
    assert len({t.origin for t in agents}) > 5  # the seed draws edges inside the zones
    # background stays today's stream, drawn after the agents
    assert bg and all(t.vid.startswith("bg") for t in bg)


def test_commute_seeds_draw_trips_zones_stay(helsinki):
    g = helsinki.graph
    cfg = _commute(n=40)
    a0, b0 = scenario_trips(g, cfg, 0)
    again, b_again = scenario_trips(g, cfg, 0)
    a1, _ = scenario_trips(g, cfg, 1)
    assert a0 == again and b0 == b_again
    assert [(t.origin, t.dest, t.depart) for t in a0] != [(t.origin, t.dest, t.depart) for t in a1]
    zone_edges = {int(e) for z in commute_zones(g, cfg.demand).origins for e in z.edges}
    assert {t.origin for t in a0 + a1} <= zone_edges  # both seeds draw from the same zones
    other = commute_zones(g, replace(cfg.demand, zones_seed=cfg.demand.zones_seed + 1))
    assert [z.center for z in other.origins] != [z.center for z in commute_zones(g, cfg.demand).origins]


def test_commute_shares(helsinki):
    g = helsinki.graph
    cfg = _commute(n=40, origin_shares=[0.0, 1.0])
    zone = commute_zones(g, cfg.demand).origins[1]
    agents, _ = scenario_trips(g, cfg, 3)
    assert all(np.linalg.norm(_mid(g, t.origin) - zone.center) <= cfg.demand.zone_radius_m for t in agents)


@pytest.mark.parametrize(
    "demand, message",
    [
        ({"origin_zones": 0}, "env.demand.origin_zones: must be >= 1"),
        ({"dest_zones": 0}, "env.demand.dest_zones: must be >= 1"),
        ({"zone_radius_m": 0}, "env.demand.zone_radius_m: must be > 0"),
        ({"peak_window_s": -1}, "env.demand.peak_window_s: must be >= 0"),
        ({"origin_shares": [1, 2, 3]}, "env.demand.origin_shares: needs one share per zone (2), got 3"),
        ({"dest_shares": [-1]}, "env.demand.dest_shares: shares must be >= 0"),
        ({"kind": "gravity"}, "env.demand.kind"),
        ({"agents": "some"}, "env.demand.agents"),
        ({"zone_radius": 100}, "unknown key 'zone_radius'"),
        ({"kind": "file"}, "env.demand.file: required when kind is 'file'"),
        ({"kind": "file", "file": "/nonexistent/demand.rou.xml"}, "env.demand.file: /nonexistent/demand.rou.xml"),
        ({"kind": "commute", "peak_window_s": 1200}, "env.demand.peak_window_s: must be < env.horizon_s"),
    ],
)
def test_demand_config_errors_name_the_key(demand, message):
    with pytest.raises(ConfigError) as exc:
        from_dict(EnvConfig, {"horizon_s": 1200, "demand": demand}, "env")
    assert message in str(exc.value)


def test_commute_config_from_yaml_keys():
    cfg = from_dict(EnvConfig, {"demand": {"kind": "commute", "origin_zones": 3, "dest_shares": [2]}}, "env")
    assert cfg.demand.origin_zones == 3 and cfg.demand.dest_shares == [2.0]


def test_commute_agents_interact(helsinki):
    """Commute agents share corridors: with shortest paths they take longer than uniform ones
    (docs/demand.md: 406 s vs 337 s over 8 seeds)."""
    times = {}
    for kind in ("uniform", "commute"):
        cfg = replace(_commute(), demand=DemandConfig(kind))
        with NavigationEnv(cfg, helsinki) as env:
            policy = make_policy("shortest_path", env)
            runs = [run_episode(env, policy, seed=s) for s in (0, 1, 2)]
        times[kind] = np.mean([r["mean_travel_time"] for r in runs])
        assert np.mean([r["arrival_rate"] for r in runs]) >= 0.9
    assert times["commute"] > 1.1 * times["uniform"], times


# ---- file -------------------------------------------------------------------------------------------


def _od_pairs(g, n: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(5)
    return [sample_od(g, rng, 500.0) for _ in range(n)]


@pytest.fixture
def trips_xml(helsinki, tmp_path):
    """12 vehicles: even ones with a route, odd ones with from/to only, departures 0, 10, .. 110."""
    g = helsinki.graph
    lines = ["<routes>"]
    for i, (o, d) in enumerate(_od_pairs(g, 12)):
        ids = g.edge_ids
        if i % 2 == 0:
            edges = " ".join(ids[e] for e in g.route(o, d))
            lines.append(f'  <vehicle id="v{i}" depart="{10 * i}"><route edges="{edges}"/></vehicle>')
        else:
            lines.append(f'  <trip id="v{i}" depart="{10 * i}" from="{ids[o]}" to="{ids[d]}"/>')
    path = tmp_path / "demand.rou.xml"
    path.write_text("\n".join([*lines, "</routes>"]) + "\n")
    return path


def _file_cfg(path, n: int = 5, **kw) -> EnvConfig:
    return EnvConfig(map="helsinki", n_agents=n, traffic="light", demand=DemandConfig("file", file=str(path), **kw))


def test_file_sample_agents_and_file_background(helsinki, trips_xml):
    g = helsinki.graph
    parsed = file_demand(trips_xml, g)
    by_id = {t.vid: t for t in parsed}
    cfg = _file_cfg(trips_xml)
    agents, bg = scenario_trips(g, cfg, 0)
    assert [t.vid for t in agents] == [f"a{i}" for i in range(5)] and len(bg) == 7
    file_ods = {(t.depart, t.origin, t.dest) for t in parsed}
    assert {(t.depart, t.origin, t.dest) for t in agents} <= file_ods  # the file's departures and ODs
    assert [t.depart for t in agents] == sorted(t.depart for t in agents)
    for t in bg:
        src = by_id[t.vid.removeprefix("file:")]
        assert (t.depart, t.origin, t.dest, t.route) == (src.depart, src.origin, src.dest, src.route)
    assert {(t.depart, t.origin, t.dest) for t in agents + bg} == file_ods
    assert scenario_trips(g, cfg, 0) == (agents, bg)
    others = [scenario_trips(g, cfg, s)[0] for s in range(1, 4)]
    assert any(a != agents for a in others)  # the scenario seed draws which vehicles learn
    gen_agents, generated = scenario_trips(g, _file_cfg(trips_xml, background="generated"), 0)
    assert gen_agents == agents and generated and all(t.vid.startswith("bg") for t in generated)
    _, both = scenario_trips(g, _file_cfg(trips_xml, background="both"), 0)
    assert len(both) == len(bg) + len(generated) and [t.depart for t in both] == sorted(t.depart for t in both)


def test_file_counts_must_match(helsinki, trips_xml):
    g = helsinki.graph
    with pytest.raises(ConfigError, match=r"has 12 vehicles, fewer than env.n_agents = 20"):
        scenario_trips(g, _file_cfg(trips_xml, n=20), 0)
    with pytest.raises(ConfigError, match=r"env.demand.agents = 'all': .* has 12 vehicles, but env.n_agents = 5"):
        scenario_trips(g, _file_cfg(trips_xml, agents="all"), 0)
    agents, bg = scenario_trips(g, _file_cfg(trips_xml, n=12, agents="all"), 0)
    assert len(agents) == 12 and bg == []
    # an XML file marks no vehicle
    with pytest.raises(ConfigError, match=r"marks 0 agent vehicles, but env.n_agents = 5"):
        scenario_trips(g, _file_cfg(trips_xml, agents="marked"), 0)


def test_file_marked_agents_urb_csv(helsinki, tmp_path):
    g = helsinki.graph
    pairs = _od_pairs(g, 6)
    origins = [g.edge_ids[o] for o, _ in pairs]
    dests = [g.edge_ids[d] for _, d in pairs]
    (tmp_path / "od_helsinki.txt").write_text(repr({"origins": origins, "destinations": dests}))
    rows = [f"h{i},{5 * i},{i},{i},{'AV' if i in (1, 4) else 'Human'}" for i in range(6)]
    (tmp_path / "agents.csv").write_text("id,start_time,origin,destination,kind\n" + "\n".join(rows) + "\n")
    agents, bg = scenario_trips(g, _file_cfg(tmp_path / "agents.csv", n=2, agents="marked"), 0)
    assert [(t.vid, t.depart, t.origin, t.dest) for t in agents] == [
        ("a0", 5.0, *pairs[1]),
        ("a1", 20.0, *pairs[4]),
    ]
    assert [t.vid for t in bg] == ["file:h0", "file:h2", "file:h3", "file:h5"] and all(t.route is None for t in bg)
    with pytest.raises(ConfigError, match=r"marks 2 agent vehicles, but env.n_agents = 3"):
        scenario_trips(g, _file_cfg(tmp_path / "agents.csv", n=3, agents="marked"), 0)
    # the cache follows the od file too, and a folder holding agents.csv reads the same
    first = file_demand(tmp_path / "agents.csv", g)
    stat = (tmp_path / "od_helsinki.txt").stat()
    os.utime(tmp_path / "od_helsinki.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert file_demand(tmp_path / "agents.csv", g) is not first
    assert file_demand(tmp_path, g) == first


def test_file_parsed_once_per_mtime(helsinki, trips_xml):
    g = helsinki.graph
    first = file_demand(trips_xml, g)
    assert file_demand(trips_xml, g) is first
    stat = trips_xml.stat()
    os.utime(trips_xml, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    again = file_demand(trips_xml, g)
    assert again is not first and again == first
    assert len(dm._FILE_CACHE) <= dm._FILE_CACHE_SIZE


def test_file_episode_in_sumo(helsinki, trips_xml):
    import libsumo

    g = helsinki.graph
    cfg = replace(_file_cfg(trips_xml), horizon_s=900.0)
    routes = {}

    def seen(_env):  # the file's background vehicles drive their file route (or shortest path)
        for vid in libsumo.vehicle.getIDList():
            if vid.startswith("file:"):
                routes[vid] = tuple(libsumo.vehicle.getRoute(vid))

    with NavigationEnv(cfg, helsinki) as env:
        m = run_episode(env, make_policy("shortest_path", env), seed=0, progress=seen)
        expected = {t.vid: t.route or tuple(g.route(t.origin, t.dest)) for t in env.bg_trips}
    assert m["agents"] == 5 and m["bg_vehicles"] == 7 and m["arrived"] == 5
    assert len(routes) >= 4 and all(r == tuple(g.edge_ids[e] for e in expected[v]) for v, r in routes.items())

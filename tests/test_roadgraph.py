import itertools

import networkx as nx
import numpy as np


def _nx(g):
    G = nx.DiGraph()
    for e in range(g.n_edges):
        for f in g.successors(e):
            G.add_edge(e, int(f), weight=float(max(g.length[f], 1e-3)))
    return G


def test_cost_to_matches_networkx(helsinki):
    g = helsinki.graph
    G = _nx(g)
    rng = np.random.default_rng(1)
    for dest in rng.choice(g.n_edges, size=5, replace=False):
        ours = g.cost_to(int(dest))
        ref = nx.single_source_dijkstra_path_length(G.reverse(copy=False), int(dest), weight="weight")
        for src in rng.choice(g.n_edges, size=20, replace=False):
            assert abs(ours[src] - ref[int(src)]) < 1e-6


def test_route_is_connected_and_shortest(helsinki):
    g = helsinki.graph
    rng = np.random.default_rng(2)
    for _ in range(20):
        o, d = (int(x) for x in rng.choice(g.n_edges, size=2, replace=False))
        path = g.route(o, d)
        assert path[0] == o and path[-1] == d
        for a, b in itertools.pairwise(path):
            assert b in g.successors(a)
        assert abs(sum(max(g.length[e], 1e-3) for e in path[1:]) - g.cost_to(d)[o]) < 1e-6


def test_json_round_trip(helsinki, tmp_path):
    from reled_hpc.sim.roadgraph import RoadGraph

    g = helsinki.graph
    g.to_json(tmp_path / "g.json")
    h = RoadGraph.from_json(tmp_path / "g.json")
    assert h.edge_ids == g.edge_ids and np.array_equal(h.succ_idx, g.succ_idx)
    assert np.allclose(h.length, g.length, atol=1e-3)

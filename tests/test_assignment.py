"""The transport field's reference policies: free_flow (all-or-nothing on free-flow times) and due
(dynamic user equilibrium from SUMO's duaIterate, cached per scenario), both RouteActors; the
free-flow metric of the road graph. Real SUMO throughout (duaIterate, libsumo), on small scenarios."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from reled_hpc.sim.assignment import AssignmentError, default_iterations, equilibrium_routes
from reled_hpc.sim.demand import scenario_trips
from reled_hpc.sim.env import EnvConfig, NavigationEnv
from reled_hpc.sim.maps import MapBundle
from reled_hpc.sim.policies import REFERENCE_POLICIES, RouteActor, make_policy, run_episode
from reled_hpc.sim.roadgraph import RoadGraph

ITERATIONS = 3


def _grid_cfg(**kw) -> EnvConfig:
    base = dict(map="grid", n_agents=30, traffic="light", horizon_s=600.0, depart_window_s=30.0, min_trip_m=400.0)
    return EnvConfig(**{**base, **kw})  # type: ignore[arg-type]


def _valid_route(g: RoadGraph, route: list[int], origin: int, dest: int) -> bool:
    return route[0] == origin and route[-1] == dest and all(b in g.successors(a) for a, b in itertools.pairwise(route))


def test_free_flow_metric_is_cached_and_leaves_lengths_alone(helsinki):
    g = helsinki.graph
    assert np.allclose(g.free_flow_time, g.length / g.speed)
    for dest in (0, 17, g.n_edges - 1):
        by_time = g.cost_to(dest, metric="time")
        assert g.cost_to(dest, metric="time") is by_time  # cached per destination
        assert np.allclose(by_time, g.cost_to(dest, g.free_flow_time))
        assert np.allclose(g.cost_to(dest), g.cost_to(dest, g.length))  # the length metric is unchanged
        assert g.cost_to(dest, metric="length") is g.cost_to(dest)
    with pytest.raises(ValueError, match="unknown metric"):
        g.cost_to(0, metric="hops")  # type: ignore[arg-type]


def test_free_flow_follows_fixed_free_flow_time_routes(helsinki):
    cfg = EnvConfig(map="helsinki", n_agents=25, traffic="light", horizon_s=900.0, seed=4)
    g = helsinki.graph
    with NavigationEnv(cfg, helsinki) as env:
        actor = make_policy("free_flow", env, 0)
        assert isinstance(actor, RouteActor) and not actor.observes
        seen: list[dict] = []

        def check(e: NavigationEnv) -> None:  # routes are fixed at departure: never replaced or edited
            if not seen:
                seen.append({a: list(r) for a, r in actor.routes.items()})
            assert {a: list(r) for a, r in actor.routes.items()} == seen[0]

        m = run_episode(env, actor, progress=check)
        assert m["arrived"] > 0.8 * m["agents"]
        routes = seen[0]
        assert set(routes) == set(env.agents_state)
        for aid, st in env.agents_state.items():
            o, d = st.trip.origin, st.trip.dest
            r = routes[aid]
            assert _valid_route(g, r, o, d)
            # the least free-flow time: its time equals the Dijkstra cost on length / speed limit
            assert g.free_flow_time[r[1:]].sum() == pytest.approx(g.cost_to(d, metric="time")[o])
            if st.status == "arrived" and aid not in actor.deviated:
                assert st.plan == r  # driven edges == the route
        assert len(actor.deviated) <= 1


def test_due_assignment_routes_every_agent_and_is_cached(grid, monkeypatch):
    cfg = _grid_cfg()
    agents, bg = scenario_trips(grid.graph, cfg, 11)
    t0 = time.perf_counter()
    a = equilibrium_routes(grid, agents, bg, iterations=ITERATIONS, horizon_s=cfg.horizon_s, seed=11)
    first_s = time.perf_counter() - t0
    g = grid.graph
    assert not a.cached and a.iterations == ITERATIONS
    assert set(a.routes) == {t.vid for t in agents}
    for t in agents:
        assert _valid_route(g, a.routes[t.vid], t.origin, t.dest)
    assert len(a.gaps) == len(a.travel_time) == len(a.changes) == ITERATIONS
    assert 0 <= a.relative_gap < 0.2 and np.isfinite(a.travel_time[-1]) and np.isnan(a.changes[0])
    assert 0 <= a.background_on_shortest <= 1

    # the second call is a cache hit: no duaIterate run at all
    def no_run(*args, **kwargs):
        raise AssertionError("duaIterate ran again")

    monkeypatch.setattr("reled_hpc.sim.assignment.subprocess.run", no_run)
    t0 = time.perf_counter()
    b = equilibrium_routes(grid, agents, bg, iterations=ITERATIONS, horizon_s=cfg.horizon_s, seed=11)
    assert b.cached and b.routes == a.routes and b.key == a.key
    assert time.perf_counter() - t0 < max(0.2, first_s / 5)
    with pytest.raises(AssertionError, match="ran again"):  # another option is another scenario
        equilibrium_routes(grid, agents, bg, iterations=ITERATIONS + 1, horizon_s=cfg.horizon_s, seed=11)


def test_due_policy_drives_the_equilibrium_routes(grid, monkeypatch):
    monkeypatch.setenv("RELED_HPC_DUE_ITERATIONS", str(ITERATIONS))
    assert default_iterations() == ITERATIONS
    with NavigationEnv(_grid_cfg(), grid) as env:
        ref = run_episode(env, make_policy("shortest_path", env, 0), seed=5)
        actor = make_policy("due", env, 0)
        assert isinstance(actor, RouteActor)
        m = run_episode(env, actor, seed=5)
        first = actor.planner.last  # type: ignore[union-attr]
        assert first is not None and first.iterations == ITERATIONS
        assert actor.routes == first.routes and set(first.routes) == set(env.agents_state)
        followed = 0
        for aid, st in env.agents_state.items():
            if st.status == "arrived" and aid not in actor.deviated:
                assert st.plan == first.routes[aid]  # driven edges == its DUE route
                followed += 1
        assert followed >= 0.8 * len(env.agents_state)
        assert set(m) == set(ref) and m["agents"] == ref["agents"]
        assert m["arrival_rate"] >= 0.8
        assert 0.5 < m["mean_travel_time"] / ref["mean_travel_time"] < 2

        # a new episode (another scenario) gets its own assignment; the same one again comes from the cache
        run_episode(env, actor, seed=6)
        assert actor.planner.last.key != first.key  # type: ignore[union-attr]
        run_episode(env, actor, seed=5)
        assert actor.planner.last.cached and actor.planner.last.key == first.key  # type: ignore[union-attr]


def test_duaiterate_failure_raises_with_its_log(grid):
    cfg = _grid_cfg(n_agents=5)
    g = grid.graph
    agents, bg = scenario_trips(g, cfg, 2)
    ids = list(g.edge_ids)
    ids[agents[0].dest] = "nowhere"  # a trip to an edge the net does not have
    broken = RoadGraph(ids, g.length, g.speed, g.lanes, g.start_xy, g.end_xy, g.names, g.succ_ptr, g.succ_idx)
    bundle = MapBundle(folder=grid.folder, manifest=grid.manifest, _graph=broken)
    with pytest.raises(AssignmentError, match="duaIterate failed") as info:
        equilibrium_routes(bundle, agents, bg, iterations=2, horizon_s=cfg.horizon_s)
    assert "nowhere" in str(info.value)  # the tail of duarouter's own log names the culprit


def test_route_actor_falls_back_and_resets_per_episode(grid):
    with NavigationEnv(_grid_cfg(n_agents=6), grid) as env:
        env.reset(seed=1)
        g = env.graph
        trip = env.agents_state["a0"].trip
        # a0 gets a route that starts elsewhere: it leaves it at its first decision and takes the fallback
        actor = RouteActor(env, {"a0": [int(g.successors(trip.dest)[0]), trip.dest]}, fallback="free_flow")
        run_episode(env, actor, seed=1)
        assert actor.deviated == {"a0"} and not all(actor.route_rows) and any(not r for r in actor.route_rows)
        assert actor.llm_rows is actor.route_rows
        # the same actor in a new episode forgets who deviated: with a right route a0 now follows it
        actor.routes = {"a0": g.route(trip.origin, trip.dest)}
        run_episode(env, actor, seed=1)
        assert actor.deviated == set() and env.agents_state["a0"].plan == actor.routes["a0"]
    with pytest.raises(ValueError, match="fallback"):
        RouteActor(env, {}, fallback="random")


def test_registered_everywhere():
    from reled_hpc.cli import build_parser
    from reled_hpc.launch.references import POLICIES

    assert {"free_flow", "due"} <= set(REFERENCE_POLICIES) and {"free_flow", "due"} <= set(POLICIES)
    args = build_parser().parse_args(["run-policy", "--policy", "free_flow", "due"])
    assert args.policy == ["free_flow", "due"]
    args = build_parser().parse_args(["references", "sweep_dir"])
    assert {"free_flow", "due"} <= set(args.policy)

"""The navigation environment on real SUMO (libsumo), no mocks."""

from __future__ import annotations

import numpy as np
import pytest

from reled_hpc.errors import EnvError
from reled_hpc.sim.env import CAND_FEATURES, SELF_FEATURES, EnvConfig, NavigationEnv
from reled_hpc.sim.policies import actions, deciding, make_policy, run_episode


def _cfg(**kw) -> EnvConfig:
    base = dict(map="grid", n_agents=10, traffic="light", horizon_s=600.0, depart_window_s=20.0, min_trip_m=400.0)
    base.update(kw)
    return EnvConfig(**base)


def test_reset_and_step_contract(grid):
    cfg = _cfg()
    with NavigationEnv(cfg, grid) as env:
        obs, infos = env.reset(seed=3)
        assert obs, "agents departing at t=0 must be asked for their first decision"
        assert set(obs) == set(infos) == set(env.deciding_agents)
        for aid, o in obs.items():
            assert o.shape == (cfg.obs_dim,) and o.dtype == np.float32
            assert cfg.obs_dim == len(SELF_FEATURES) + cfg.a_max * len(CAND_FEATURES)
            mask = infos[aid]["action_mask"]
            assert mask.shape == (cfg.a_max,) and mask.dtype == bool
            k = int(mask.sum())
            assert k >= 2  # single-exit junctions are taken without asking
            assert mask[:k].all() and not mask[k:].any()
            assert len(infos[aid]["candidates"]) == k
            cand = o[len(SELF_FEATURES) :].reshape(cfg.a_max, len(CAND_FEATURES))
            assert np.all(cand[k:] == 0)  # padding
        policy = make_policy("random", env, seed=1)
        ended_seen = set()
        steps = 0
        while not env.done:
            obs, rew, term, trunc, infos = env.step(actions(policy, env, obs, infos))
            steps += 1
            assert set(obs) == set(rew) == set(term) == set(trunc) == set(infos)
            for aid in obs:
                if term[aid] or trunc[aid]:
                    assert aid not in ended_seen, "an agent ends exactly once"
                    ended_seen.add(aid)
                    assert not infos[aid]["action_mask"].any()
                else:
                    assert infos[aid]["action_mask"].any()
        assert ended_seen == set(env.possible_agents)
        m = env.metrics()
        assert m["arrived"] + m["failed"] + m["truncated"] == cfg.n_agents


def test_action_required_for_every_deciding_agent(grid):
    with NavigationEnv(_cfg(), grid) as env:
        obs, infos = env.reset(seed=0)
        first = next(iter(obs))
        with pytest.raises(EnvError, match="needs an action for every deciding agent"):
            env.step({})
        acts = {a: 0 for a in deciding(obs, infos)}
        with pytest.raises(EnvError, match="unknown agent 'zzz'"):
            env.step({**acts, "zzz": 0})
        bad = dict(acts)
        bad[first] = cfg_amax = env.config.a_max  # masked (padding) slot
        with pytest.raises(EnvError, match=rf"agent '{first}': invalid action {cfg_amax}"):
            env.step(bad)
        bad[first] = 0.5
        with pytest.raises(EnvError, match=r"invalid action 0.5"):
            env.step(bad)


def test_invalid_action_fallback_is_counted(grid):
    with NavigationEnv(_cfg(invalid_action="shortest_path"), grid) as env:
        obs, infos = env.reset(seed=0)
        acts = {a: 99 for a in deciding(obs, infos)}
        env.step(acts)
        assert env.invalid_actions == len(acts)


def _trajectories(env: NavigationEnv, policy_name: str, seed: int):
    policy = make_policy(policy_name, env, seed=seed)
    obs, infos = env.reset(seed=seed)
    log = []
    while not env.done:
        acts = actions(policy, env, obs, infos)
        log.append((env.time, tuple(sorted((a, float(o.sum())) for a, o in obs.items())), tuple(sorted(acts.items()))))
        obs, _, _, _, infos = env.step(acts)
    return log, env.metrics()


def test_deterministic_for_a_seed(grid):
    with NavigationEnv(_cfg(traffic="medium"), grid) as env:
        a, ma = _trajectories(env, "random", 7)
        b, mb = _trajectories(env, "random", 7)
        c, _ = _trajectories(env, "random", 8)
    assert a == b and ma == mb
    assert a != c


def test_second_live_instance_is_refused(grid):
    first = NavigationEnv(_cfg(), grid)
    second = NavigationEnv(_cfg(), grid)
    try:
        first.reset(seed=0)
        with pytest.raises(EnvError, match="already runs a libsumo simulation"):
            second.reset(seed=0)
        first.close()
        second.reset(seed=0)  # allowed once the first released the simulation
    finally:
        first.close()
        second.close()
    with pytest.raises(EnvError, match="was closed"):
        second.reset(seed=0)


def test_sumo_route_follows_plan(grid):
    """SUMO's route is the agent's plan followed by its provisional tail, and the vehicle is on plan[pos]."""
    import libsumo

    with NavigationEnv(_cfg(n_agents=20), grid) as env:
        policy = make_policy("random", env, seed=0)
        obs, infos = env.reset(seed=0)
        checked = 0
        while not env.done and env.time < 300:
            obs, _, _, _, infos = env.step(actions(policy, env, obs, infos))
            env._flush_routes()
            for aid, st in env.agents_state.items():
                if st.status == "driving" and st.inserted:
                    ids = env.graph.edge_ids
                    want = [ids[e] for e in st.plan] + [ids[e] for e in st.tail[::-1]]
                    assert list(libsumo.vehicle.getRoute(aid)) == want
                    road = libsumo.vehicle.getRoadID(aid)
                    if not road.startswith(":"):  # on a junction's internal lane between edges
                        assert libsumo.vehicle.getRouteIndex(aid) >= st.pos
                    checked += 1
        assert checked > 100


def test_rewards_sum_to_returns(grid):
    with NavigationEnv(_cfg(), grid) as env:
        policy = make_policy("shortest_path", env)
        obs, infos = env.reset(seed=1)
        total = {a: 0.0 for a in env.possible_agents}
        while not env.done:
            obs, rew, _, _, infos = env.step(actions(policy, env, obs, infos))
            for a, r in rew.items():
                total[a] += r
        for a, st in env.agents_state.items():
            assert total[a] == pytest.approx(st.ret, abs=1e-9)
            if st.status == "arrived":  # return = -travel time / scale + bonus
                tt = st.end_time - st.trip.depart
                assert st.ret == pytest.approx(-tt / env.config.reward_time_scale_s + env.config.arrival_bonus)


def test_reference_policies_ranked_on_grid(grid):
    res = {}
    with NavigationEnv(_cfg(n_agents=30, horizon_s=900.0), grid) as env:
        for name in ("random", "shortest_path", "fastest_path"):
            res[name] = run_episode(env, make_policy(name, env, seed=0), seed=5)
    assert res["shortest_path"]["arrival_rate"] >= 0.9
    assert res["fastest_path"]["arrival_rate"] >= 0.9
    assert res["random"]["arrival_rate"] < res["shortest_path"]["arrival_rate"]
    assert res["random"]["mean_return"] < res["shortest_path"]["mean_return"]


def test_shortest_path_reaches_95_percent_on_helsinki(helsinki):
    cfg = EnvConfig(map="helsinki", n_agents=100, traffic="light", horizon_s=1200.0, seed=0)
    with NavigationEnv(cfg, helsinki) as env:
        m = run_episode(env, make_policy("shortest_path", env), seed=0)
    assert m["arrival_rate"] >= 0.95, m
    assert m["late_decisions"] == 0
    assert m["bg_vehicles"] > 0 and m["bg_arrived"] > 0
    assert 60 < m["mean_travel_time"] < 1200


@pytest.mark.slow
def test_1000_agents_every_agent_accounted_for(helsinki):
    import libsumo

    cfg = EnvConfig(map="helsinki", n_agents=1000, traffic="light", horizon_s=300.0, depart_window_s=120.0, seed=0)
    with NavigationEnv(cfg, helsinki) as env:
        policy = make_policy("shortest_path", env)
        obs, infos = env.reset(seed=0)
        while not env.done:
            if 200 <= env.time < 201:  # mid-run census
                in_sim = set(libsumo.vehicle.getIDList())
                pending_insert = set(libsumo.simulation.getPendingVehicles())
                for aid, st in env.agents_state.items():
                    if st.status == "driving" and st.in_sumo:
                        assert aid in in_sim or aid in pending_insert, f"{aid} vanished from SUMO"
            obs, _, _, _, infos = env.step(actions(policy, env, obs, infos))
        m = env.metrics()
        statuses = {st.status for st in env.agents_state.values()}
    assert statuses <= {"arrived", "failed", "truncated"}
    assert m["agents"] == 1000 and m["arrived"] + m["failed"] + m["truncated"] == 1000
    assert m["arrived"] > 0 and m["decisions"] > 1000


def test_queue_skipped_edge_checks_change_nothing(grid, monkeypatch):
    """Edge checks skipped while the odometer shows a vehicle cannot have reached its edge's end (queues)
    give the same episode, decision order included, as without those skips."""
    import itertools

    import libsumo

    calls = [0]
    get_route_index = libsumo.vehicle.getRouteIndex

    def counted(vid: str) -> int:
        calls[0] += 1
        return get_route_index(vid)

    monkeypatch.setattr(libsumo.vehicle, "getRouteIndex", counted)

    def episode() -> tuple[list, str, int]:
        calls[0] = 0
        trace = []
        with NavigationEnv(_cfg(n_agents=40, traffic="heavy", horizon_s=400.0), grid) as env:
            policy = make_policy("random", env, seed=2)
            obs, infos = env.reset(seed=5)
            while not env.done:
                obs, rew, _, _, infos = env.step(actions(policy, env, obs, infos))
                trace.append((env.sim_steps, list(obs), [o.tobytes() for o in obs.values()], list(rew.values())))
            return trace, repr(env.metrics()), calls[0]

    trace, metrics, n_checks = episode()
    leaps = itertools.count()  # an odometer that leaps a km per reading: it never justifies a skip
    monkeypatch.setattr(libsumo.vehicle, "getDistance", lambda vid: 1000.0 * next(leaps))
    trace_all, metrics_all, n_checks_all = episode()
    assert n_checks < n_checks_all  # checks were skipped
    assert trace == trace_all and metrics == metrics_all


def test_cached_choice_sets_give_the_same_episode(grid):
    """Decisions read the per-(edge, destination) ChoiceSet cache: an episode on a warm cache is the one
    on a cold cache, and the shared candidate arrays cannot be changed through an agent's state."""

    def episode(env: NavigationEnv) -> list:
        trace = []
        policy = make_policy("random", env, seed=4)
        obs, infos = env.reset(seed=9)
        while not env.done:
            trace.append([(a, obs[a].tobytes(), infos[a]["candidates"]) for a in sorted(obs)])
            obs, rew, _, _, infos = env.step(actions(policy, env, obs, infos))
            trace.append(sorted(rew.items()))
        return trace

    with NavigationEnv(_cfg(n_agents=20, traffic="medium"), grid) as env:
        cold = episode(env)
        warm_size = len(env._choice_cache)
        assert warm_size > 0
        warm = episode(env)
        assert len(env._choice_cache) == warm_size  # the second episode only hit the cache
        env._choice_cache.clear()
        assert episode(env) == cold
        obs, _ = env.reset(seed=9)
        st = env.agents_state[next(iter(obs))]
        with pytest.raises(ValueError, match="read-only"):
            st.candidates[0] = 0
    assert warm == cold

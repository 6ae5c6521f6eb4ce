"""The PettingZoo adapter (reled_hpc.pettingzoo) on real SUMO: PettingZoo's own API tests, the mask and
no-decision convention, seeding, and equality with the native NavigationEnv it wraps."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.utils.env_checker import data_equivalence
from pettingzoo.test import api_test, parallel_api_test

from reled_hpc.errors import ConfigError, EnvError
from reled_hpc.pettingzoo import NavigationParallelEnv, env, parallel_env
from reled_hpc.sim.demand import DemandConfig
from reled_hpc.sim.env import CAND_FEATURES, SELF_FEATURES, EnvConfig, NavigationEnv

CFG: dict[str, Any] = dict(map="helsinki", n_agents=10, traffic="light", horizon_s=300)
DIST_AFTER = len(SELF_FEATURES) + CAND_FEATURES.index("dist_after")  # candidate 0's distance to goal after it


def _seed_spaces(penv: NavigationParallelEnv) -> None:
    """As pettingzoo.test.seed_test does: agent i's action space gets seed 42 + i."""
    for i, agent in enumerate(penv.possible_agents):
        penv.action_space(agent).seed(42 + i)


def _greedy_or_random(penv: NavigationParallelEnv, rng: np.random.Generator):
    """Masked policy that mostly heads for the goal (so agents arrive), sometimes samples the mask; agents
    with no decision get an UNMASKED sample, which the adapter must ignore."""

    def act(agent: str, o: dict[str, np.ndarray], info: dict[str, Any]) -> int:
        space = penv.action_space(agent)
        if info["status"] != "deciding":
            return int(space.sample())
        mask = o["action_mask"]
        if rng.random() < 0.2:
            return int(space.sample(mask=mask))
        dist = o["observation"][DIST_AFTER :: len(CAND_FEATURES)][: penv.config.a_max]
        return int(np.argmin(np.where(mask == 1, dist, np.inf)))

    return act


def _rollout(penv: NavigationParallelEnv, seed: int, act=None) -> list[tuple]:
    """One episode; returns every (actions, obs, rewards, terminated, truncated, infos), checking the
    convention at each step. `act` defaults to sampling every live agent's action space with its mask."""
    obs, infos = penv.reset(seed=seed)
    _seed_spaces(penv)
    a_max = penv.config.a_max
    noop = np.eye(1, a_max, dtype=np.int8)[0]
    log: list[tuple] = [({}, obs, {}, {}, {}, infos)]
    ended: set[str] = set()
    while penv.agents:
        live = list(penv.agents)
        assert set(live) <= set(obs) and set(obs) == set(infos)  # plus those that ended in the last step
        assert penv.state_space.contains(penv.state())
        actions = {}
        for a in live:
            o, info = obs[a], infos[a]
            assert penv.observation_space(a).contains(o), (a, o)
            mask = o["action_mask"]
            if info["status"] == "deciding":
                assert mask.sum() == len(info["candidates"]) >= 1 and mask[: mask.sum()].all()
            else:
                assert info["status"] in ("pending", "driving")
                assert np.array_equal(mask, noop) and not o["observation"].any()
            actions[a] = act(a, o, info) if act else int(penv.action_space(a).sample(mask=mask))
        obs, rew, term, trunc, infos = penv.step(actions)
        log.append((actions, obs, rew, term, trunc, infos))
        assert set(obs) == set(rew) == set(term) == set(trunc) == set(infos) == set(live)
        for a in live:
            if term[a] or trunc[a]:
                assert a not in ended and a not in penv.agents and not (term[a] and trunc[a])
                assert infos[a]["status"] in ("arrived", "failed") if term[a] else infos[a]["status"] == "truncated"
                ended.add(a)
            else:
                assert a in penv.agents
    assert ended == set(penv.possible_agents), "every agent ends terminated or truncated, exactly once"
    return log


def test_parallel_api_test_passes(helsinki):
    penv = parallel_env(map_bundle=helsinki, **CFG)
    try:
        with warnings.catch_warnings():
            # its "live agent was not given an observation" etc. are warnings: make them failures
            warnings.simplefilter("error", UserWarning)
            parallel_api_test(penv, num_cycles=1000)
        assert penv.agents == [] and penv.metrics()["active"] == 0, "the episode ran to its end within 1000 cycles"
    finally:
        penv.close()


def test_aec_api_test_passes(helsinki):
    aec = env(map_bundle=helsinki, **CFG)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            api_test(aec, num_cycles=1000)
    finally:
        aec.close()
    # its advice for Box observations (ours is a Dict with the mask, as in PettingZoo's classic envs), that
    # agents without a decision see zeros, and on agent names ("a0", the native ids); nothing else
    expected = ("Observation space for each agent probably", "Observation is not a NumPy array",
                "Observation numpy array is all zeros", "We recommend agents to be named")  # fmt: skip
    unexpected = {str(w.message) for w in caught if not str(w.message).startswith(expected)}
    assert not unexpected


def test_spaces_are_fixed_objects(helsinki):
    with parallel_env(map_bundle=helsinki, **CFG) as penv:
        cfg = penv.config
        a0, a1 = penv.possible_agents[:2]
        assert penv.observation_space(a0) is penv.observation_space(a0)
        assert penv.action_space(a0) is penv.action_space(a0)
        assert penv.observation_space(a0) is not penv.observation_space(a1)  # seeded independently
        assert penv.action_space(a0) is not penv.action_space(a1)
        assert penv.action_space(a0) == spaces.Discrete(cfg.a_max)
        obs_space = penv.observation_space(a0)
        assert isinstance(obs_space, spaces.Dict) and set(obs_space.spaces) == {"observation", "action_mask"}
        assert obs_space["observation"].shape == (cfg.obs_dim,) and obs_space["observation"].dtype == np.float32
        assert obs_space["action_mask"].shape == (cfg.a_max,) and obs_space["action_mask"].dtype == np.int8
        assert penv.state_space.shape == (len(NavigationEnv.GLOBAL_FEATURES),)
        assert penv.render_mode is None and penv.unwrapped is penv
        with pytest.raises(EnvError, match="unknown agent 'zzz'"):
            penv.action_space("zzz")
        with pytest.raises(EnvError, match=r"call reset\(\) before step\(\)"):
            penv.step({})
        _rollout(penv, seed=0)  # the same objects survive an episode
        assert penv.observation_space(a0) is obs_space
        penv.close()
        with pytest.raises(EnvError, match=r"call reset\(\) before state\(\)"):
            penv.state()
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        parallel_env(map_bundle=helsinki, bogus=1)
    with pytest.raises(ConfigError, match=r"parallel_env\.n_agents"):
        parallel_env(map_bundle=helsinki, **{**CFG, "n_agents": 0})
    demand = DemandConfig(kind="commute", origin_zones=3, peak_window_s=120.0)
    with parallel_env(map_bundle=helsinki, **CFG, demand=demand) as penv:
        assert penv.config.demand == demand and penv.config.horizon_s == 300.0


def test_masked_random_rollout_is_valid_and_ends(helsinki):
    # invalid_action="error" (the default): one invalid action would raise
    with parallel_env(map_bundle=helsinki, **CFG) as penv:
        log = _rollout(penv, seed=1)
        m = penv.metrics()
    decisions = sum(len(acts) for acts, *_ in log)
    assert m["invalid_actions"] == 0 and m["decisions"] > 50 and decisions > m["decisions"]  # no-ops too
    assert m["arrived"] + m["failed"] + m["truncated"] == CFG["n_agents"] and m["active"] == 0


def test_same_seed_same_trajectory(helsinki):
    with parallel_env(map_bundle=helsinki, **CFG) as penv:
        a = _rollout(penv, seed=5)
        b = _rollout(penv, seed=5)
        c = _rollout(penv, seed=6)
    assert len(a) == len(b) and all(data_equivalence(x, y) for x, y in zip(a, b, strict=True))
    assert not (len(a) == len(c) and all(data_equivalence(x, y) for x, y in zip(a, c, strict=True)))


def test_adapter_adds_no_behaviour(helsinki):
    """The adapter's episode equals the native env's driven with the deciding agents' actions alone:
    same deciding agents and observations at every step, same arrivals, travel times and returns (so
    the unmasked actions given to agents with no decision were ignored)."""
    seed, cfg = 3, {**CFG, "horizon_s": 600}  # long enough for most trips to arrive
    with parallel_env(map_bundle=helsinki, **cfg) as penv:
        log = _rollout(penv, seed, _greedy_or_random(penv, np.random.default_rng(0)))
        m_adapter = penv.metrics()
        ends = {a: (st.status, st.end_time, st.ret) for a, st in penv.native.agents_state.items()}
    returns = {a: 0.0 for a in ends}
    for _, _, rew, *_ in log:
        for a, r in rew.items():
            returns[a] += r
    assert m_adapter["arrived"] >= 5, "a mostly greedy policy brings agents home within the horizon"

    with NavigationEnv(EnvConfig(**cfg), helsinki) as native:
        obs, infos = native.reset(seed=seed)
        for k in range(1, len(log)):
            acts_all, prev_obs = log[k][0], log[k - 1][1]
            deciding = [a for a in acts_all if log[k - 1][5][a]["status"] == "deciding"]
            assert sorted(native.deciding_agents) == sorted(deciding), f"step {k}"
            for a in deciding:
                assert np.array_equal(obs[a], prev_obs[a]["observation"])
                assert np.array_equal(infos[a]["action_mask"], prev_obs[a]["action_mask"].astype(bool))
            obs, _, _, _, infos = native.step({a: acts_all[a] for a in deciding})
        assert native.done
        m_native = native.metrics()
        for a, st in native.agents_state.items():
            assert (st.status, st.end_time, st.ret) == ends[a]
            assert returns[a] == pytest.approx(st.ret, abs=1e-9)
    assert data_equivalence(m_adapter, m_native)


def test_action_errors_and_invalid_action_fallback(helsinki):
    with parallel_env(map_bundle=helsinki, **CFG) as penv:
        obs, infos = penv.reset(seed=0)
        deciding = [a for a in penv.agents if infos[a]["status"] == "deciding"]
        assert deciding and len(deciding) < len(penv.agents), "seed 0 starts with deciding and waiting agents"
        noop = {a: 0 for a in penv.agents}
        first = deciding[0]
        k = int(obs[first]["action_mask"].sum())
        with pytest.raises(EnvError, match=rf"agent '{first}': invalid action {k}"):
            penv.step({**noop, first: k})  # masked out
        with pytest.raises(EnvError, match="needs an action for every deciding agent"):
            penv.step({a: 0 for a in penv.agents if a != first})
        with pytest.raises(EnvError, match="not live"):
            penv.step({**noop, "zzz": 0})
    with parallel_env(map_bundle=helsinki, **{**CFG, "invalid_action": "shortest_path"}) as penv:
        obs, infos = penv.reset(seed=0)
        deciding = [a for a in penv.agents if infos[a]["status"] == "deciding"]
        penv.step({a: penv.config.a_max - 1 if a in deciding else 0 for a in penv.agents})
        masked_out = sum(obs[a]["action_mask"][-1] == 0 for a in deciding)
        assert masked_out > 0 and penv.metrics()["invalid_actions"] == masked_out

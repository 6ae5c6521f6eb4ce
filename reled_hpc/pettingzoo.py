"""PettingZoo ParallelEnv adapter over `sim.env.NavigationEnv` (docs/pettingzoo.md).

`parallel_env(map="helsinki", n_agents=10, traffic="light", horizon_s=300)` takes EnvConfig fields as
keyword arguments and returns a `pettingzoo.ParallelEnv` that passes `pettingzoo.test.parallel_api_test`;
`raw_env` / `env` are its AEC views (PettingZoo's naming). The adapter wraps one NavigationEnv and adds
no behaviour: one adapter step is one native step, and the native env's rewards, terminations and
truncations pass through unchanged.

Convention for agents that need no decision: every live agent (pending, driving or deciding) is in
`agents` and gets an observation, a reward, terminated/truncated False and an info every step. An agent
that is not deciding sees an all-zero `observation` and the mask [1, 0, ..., 0]: action 0 is a no-op
that the adapter ignores (as it ignores any other value there, so unmasked sampling is harmless). A
deciding agent's mask marks its candidates; an action outside it follows `EnvConfig.invalid_action`
('error' raises EnvError, 'shortest_path' takes the candidate closest to the goal and counts it).
`infos[agent]["status"]` says which case applies ("deciding", "driving", "pending", or how it ended).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from gymnasium import spaces
from pettingzoo import AECEnv, ParallelEnv
from pettingzoo.utils import conversions, wrappers

from .config import from_dict, to_dict
from .errors import EnvError
from .sim.demand import DemandConfig
from .sim.env import EnvConfig, NavigationEnv
from .sim.maps import MapBundle

Obs = dict[str, np.ndarray]


class NavigationParallelEnv(ParallelEnv[str, Obs, int]):
    """PettingZoo Parallel API over a NavigationEnv; see the module docstring for the conventions."""

    metadata: ClassVar[dict[str, Any]] = {
        "name": NavigationEnv.metadata["name"],
        "render_modes": [],
        "is_parallelizable": True,
    }

    def __init__(
        self, config: EnvConfig | None = None, map_bundle: MapBundle | None = None, render_mode: str | None = None
    ) -> None:
        if render_mode is not None:
            raise EnvError(f"render_mode {render_mode!r} is not supported: this env has no renderer (use None)")
        self.render_mode = render_mode
        self.native = NavigationEnv(config, map_bundle)
        self.config = self.native.config
        self.possible_agents: list[str] = list(self.native.possible_agents)
        self.agents: list[str] = []
        self._known = frozenset(self.possible_agents)
        # per-agent objects, made on first use (seeding one agent's space must not touch another's;
        # building them all up front would cost seconds at 100k agents)
        self._obs_spaces: dict[str, spaces.Dict] = {}
        self._act_spaces: dict[str, spaces.Discrete] = {}
        self.state_space = spaces.Box(0.0, np.inf, (len(NavigationEnv.GLOBAL_FEATURES),), np.float32)
        a_max = self.config.a_max
        self._noop_mask = np.zeros(a_max, dtype=np.int8)
        self._noop_mask[0] = 1
        self._has_reset = False

    # ---- spaces --------------------------------------------------------------------------------
    def observation_space(self, agent: str) -> spaces.Dict:
        space = self._obs_spaces.get(agent)
        if space is None:
            self._check_agent(agent)
            cfg = self.config
            space = spaces.Dict(
                {
                    "observation": spaces.Box(-np.inf, np.inf, (cfg.obs_dim,), np.float32),
                    "action_mask": spaces.Box(0, 1, (cfg.a_max,), np.int8),
                }
            )
            self._obs_spaces[agent] = space
        return space

    def action_space(self, agent: str) -> spaces.Discrete:
        space = self._act_spaces.get(agent)
        if space is None:
            self._check_agent(agent)
            space = spaces.Discrete(self.config.a_max)
            self._act_spaces[agent] = space
        return space

    def _check_agent(self, agent: str) -> None:
        if agent not in self._known:
            raise EnvError(
                f"unknown agent {agent!r}; agents are {self.possible_agents[0]!r}..{self.possible_agents[-1]!r}"
            )

    # ---- episode -------------------------------------------------------------------------------
    def reset(
        self, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Obs], dict[str, dict[str, Any]]]:
        obs_n, infos_n = self.native.reset(seed=seed, options=options)
        self._has_reset = True
        # an agent whose trip ended before the first decision of the episode (no reward is reported for
        # it natively either) is not live, so it is left out here as in `agents`
        self.agents = self.native.agents
        obs: dict[str, Obs] = {}
        infos: dict[str, dict[str, Any]] = {}
        for aid in self.agents:
            obs[aid], infos[aid] = self._observe(aid, obs_n, infos_n)
        return obs, infos

    def step(
        self, actions: dict[str, Any]
    ) -> tuple[dict[str, Obs], dict[str, float], dict[str, bool], dict[str, bool], dict[str, dict[str, Any]]]:
        if not self._has_reset:
            raise EnvError("call reset() before step()")
        live = self.agents
        live_set = set(live)
        stray = [a for a in actions if a not in live_set]
        if stray:
            raise EnvError(f"actions for agents that are not live: {stray[:5]}{' ...' if len(stray) > 5 else ''}")
        # only deciding agents' actions reach the native env; a missing one raises there
        native_actions = {a: actions[a] for a in self.native.deciding_agents if a in actions}
        obs_n, rew_n, term_n, trunc_n, infos_n = self.native.step(native_actions)
        obs: dict[str, Obs] = {}
        rewards: dict[str, float] = {}
        terms: dict[str, bool] = {}
        truncs: dict[str, bool] = {}
        infos: dict[str, dict[str, Any]] = {}
        for aid in live:
            obs[aid], infos[aid] = self._observe(aid, obs_n, infos_n)
            # no native entry: the agent is driving or pending, and is charged at its next decision
            rewards[aid] = float(rew_n.get(aid, 0.0))
            terms[aid] = bool(term_n.get(aid, False))
            truncs[aid] = bool(trunc_n.get(aid, False))
        self.agents = self.native.agents
        return obs, rewards, terms, truncs, infos

    def _observe(
        self, aid: str, obs_n: dict[str, np.ndarray], infos_n: dict[str, dict[str, Any]]
    ) -> tuple[Obs, dict[str, Any]]:
        native_info = infos_n.get(aid)
        if native_info is None:  # live, no decision
            status = self.native.agents_state[aid].status
            return self._blank(), {"status": status}
        info = {k: v for k, v in native_info.items() if k != "action_mask"}  # the mask lives in the observation
        if native_info["status"] == "deciding":
            mask = native_info["action_mask"].astype(np.int8)
        else:  # ended this step: the native mask is all False; keep one valid (no-op) action
            mask = self._noop_mask.copy()
        return {"observation": obs_n[aid], "action_mask": mask}, info

    def _blank(self) -> Obs:
        return {"observation": np.zeros(self.config.obs_dim, dtype=np.float32), "action_mask": self._noop_mask.copy()}

    def state(self) -> np.ndarray:
        """NavigationEnv.global_state(): pooled shares of agents per status, network load, time."""
        if not self._has_reset:
            raise EnvError("call reset() before state()")
        return self.native.global_state()

    def render(self) -> None:
        raise EnvError("this env has no renderer (render_mode None)")

    def close(self) -> None:
        self.native.close()
        self._has_reset = False  # state() and step() would reach a closed libsumo

    def metrics(self) -> dict[str, float]:
        """The native episode metrics (arrivals, travel times, ...)."""
        return self.native.metrics()

    def __enter__(self) -> NavigationParallelEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parallel_env(
    *, map_bundle: MapBundle | None = None, render_mode: str | None = None, **env_config: Any
) -> NavigationParallelEnv:
    """The Parallel env; keyword arguments are EnvConfig fields (`demand` as a DemandConfig or a mapping),
    checked like a config file's `env:` section. `map_bundle` reuses an already resolved map."""
    if isinstance(env_config.get("demand"), DemandConfig):
        env_config["demand"] = to_dict(env_config["demand"])
    config = from_dict(EnvConfig, env_config, where="parallel_env")
    return NavigationParallelEnv(config, map_bundle, render_mode)


def raw_env(**kwargs: Any) -> AECEnv:
    """AEC view of `parallel_env(**kwargs)` (PettingZoo's parallel_to_aec)."""
    return conversions.parallel_to_aec(parallel_env(**kwargs))


def env(**kwargs: Any) -> AECEnv:
    """`raw_env` with PettingZoo's usual wrappers (action bounds and call order checked)."""
    return wrappers.OrderEnforcingWrapper(wrappers.AssertOutOfBoundsWrapper(raw_env(**kwargs)))

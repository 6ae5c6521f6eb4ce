"""The one acting interface, `Actor`, and the reference policies (no learning): random, shortest_path
(static lengths), fastest_path (live travel times).

An Actor maps the stacked observations and action masks of the agents that need a decision now,
and the pooled global state, to their actions (plus log-probabilities and values, 0 for reference
policies). Learners' networks (`learner.actor()`), the reference policies and SED's route followers
are all Actors: the rollout collector drives any of them, and `actions` turns one into the
PettingZoo action dict that `NavigationEnv.step` takes. Reference policies are the reference points
of every learning curve and the oracle experts of HPO.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from .env import NavigationEnv

REFERENCE_POLICIES = ("random", "shortest_path", "fastest_path")


class Actor(Protocol):
    """An actor whose class sets `observes = False` reads neither obs nor gstate (only the mask and
    the env): `actions` then skips building them, the bulk of a reference policy's cost per step."""

    def __call__(
        self, obs: np.ndarray, mask: np.ndarray, gstate: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(obs [B, D], mask [B, A], gstate [G]) -> (actions [B], logp [B], value [B]), rows in the
        order of `env.deciding_agents`."""
        ...


def deciding(obs: dict[str, np.ndarray], infos: dict[str, dict[str, Any]]) -> list[str]:
    """Agents in a step's output that need an action (ended agents carry an all-False mask)."""
    return [a for a in obs if infos[a]["action_mask"].any()]


def actions(actor: Actor, env: NavigationEnv, obs: dict[str, np.ndarray],
            infos: dict[str, dict[str, Any]]) -> dict[str, int]:  # fmt: skip
    """`actor`'s choices for the agents of a step's output that need one, as `env.step` takes them."""
    ids = deciding(obs, infos)
    if not ids:
        return {}
    m = np.stack([infos[a]["action_mask"] for a in ids])
    if getattr(actor, "observes", True):
        acts, _, _ = actor(np.stack([obs[a] for a in ids]), m, env.global_state())
    else:
        acts, _, _ = actor(np.empty((len(ids), 0), np.float32), m, np.empty(0, np.float32))
    return {a: int(x) for a, x in zip(ids, acts, strict=True)}


class ReferenceActor:
    """An Actor that picks each deciding agent's candidate with `choose(env, agent_id, mask)`."""

    observes = False

    def __init__(self, env: NavigationEnv, choose: Callable[[NavigationEnv, str, np.ndarray], int]) -> None:
        self.env = env
        self.choose = choose

    def __call__(self, obs: np.ndarray, mask: np.ndarray, gstate: np.ndarray):
        ids = self.env.deciding_agents
        if len(ids) != len(mask):
            raise RuntimeError("reference actor out of step with the env")
        acts = np.array([self.choose(self.env, a, mask[i]) for i, a in enumerate(ids)], dtype=np.int64)
        return acts, np.zeros(len(mask), np.float32), np.zeros(len(mask), np.float32)


def make_policy(name: str, env: NavigationEnv, seed: int = 0) -> Actor:
    """The reference policy `name` acting in `env` (random draws from `seed`)."""
    if name == "random":
        rng = np.random.default_rng(seed)
        return ReferenceActor(env, lambda _env, _a, mask: int(rng.choice(np.flatnonzero(mask))))
    if name == "shortest_path":
        return ReferenceActor(env, lambda e, a, _mask: e.shortest_choice(a))
    if name == "fastest_path":
        return ReferenceActor(env, lambda e, a, _mask: e.fastest_choice(a))
    raise ValueError(f"unknown reference policy {name!r} (one of {', '.join(REFERENCE_POLICIES)})")


def run_episode(
    env: NavigationEnv, actor: Actor, seed: int | None = None, max_sim_steps: int | None = None, progress=None
) -> dict[str, float]:
    """Run one episode (or until `max_sim_steps`), return env.metrics(). `progress(env)` is called per step."""
    obs, infos = env.reset(seed=seed)
    while not env.done:
        if max_sim_steps is not None and env.sim_steps >= max_sim_steps:
            break
        obs, _, _, _, infos = env.step(actions(actor, env, obs, infos))
        if progress is not None:
            progress(env)
    return env.metrics()

"""The one acting interface, `Actor`, and the reference policies (no learning): random, shortest_path
(static lengths), fastest_path (live travel times), free_flow (all-or-nothing assignment on free-flow
times) and due (dynamic user equilibrium routes from SUMO's duaIterate); docs/references.md.

An Actor maps the stacked observations and action masks of the agents that need a decision now,
and the pooled global state, to their actions (plus log-probabilities and values, 0 for reference
policies). Learners' networks (`learner.actor()`), the reference policies and SED's route followers
are all Actors: the rollout collector drives any of them, and `actions` turns one into the
PettingZoo action dict that `NavigationEnv.step` takes. Reference policies are the reference points
of every learning curve and the oracle experts of HPO. `RouteActor` makes agents follow given routes
(free_flow, due, SED's LLM plans).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .env import NavigationEnv

if TYPE_CHECKING:
    from .assignment import Assignment

REFERENCE_POLICIES = ("random", "shortest_path", "fastest_path", "free_flow", "due")
# what a RouteActor does for an agent without a route, or off it
FALLBACK_POLICIES = ("shortest_path", "fastest_path", "free_flow")

Routes = Mapping[str, Sequence[int]]
GreedyPolicy = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (obs [B, D], mask [B, A]) -> scores [B, A]


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
    # np.array, not np.stack: same result, less per-call overhead for the few rows of a step
    m = np.array([infos[a]["action_mask"] for a in ids])
    if getattr(actor, "observes", True):
        acts, _, _ = actor(np.array([obs[a] for a in ids]), m, env.global_state())
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


def free_flow_choice(env: NavigationEnv, aid: str) -> int:
    """Candidate with the least free-flow time (length / speed limit) to the goal."""
    st = env.agents_state[aid]
    g = env.graph
    cands = st.candidates
    return int(np.argmin(g.cost_to(st.trip.dest, metric="time")[cands] + g.free_flow_time[cands]))


def free_flow_routes(env: NavigationEnv) -> dict[str, list[int]]:
    """All-or-nothing assignment: each agent's least free-flow-time route, origin to destination."""
    g = env.graph
    return {aid: g.route(st.trip.origin, st.trip.dest, metric="time") for aid, st in env.agents_state.items()}


class EquilibriumPlanner:
    """Routes planner of the `due` policy: the agents' dynamic user equilibrium routes of the env's
    current scenario (its agents' and background trips), computed by duaIterate or read from the
    assignment cache (sim.assignment). `last` keeps the latest Assignment (convergence, timing)."""

    def __init__(self, iterations: int | None = None, **options: Any) -> None:
        self.iterations = iterations
        self.options = options
        self.last: Assignment | None = None

    def __call__(self, env: NavigationEnv) -> dict[str, list[int]]:
        from .assignment import equilibrium_routes

        cfg = env.config
        self.last = equilibrium_routes(
            env.map,
            [st.trip for st in env.agents_state.values()],
            env.bg_trips,
            iterations=self.iterations,
            horizon_s=cfg.horizon_s,
            time_to_teleport_s=cfg.time_to_teleport_s,
            seed=env.seed_used,
            **self.options,
        )
        return self.last.routes


class RouteActor:
    """Actor that makes each agent with a route follow it while the agent stays on it; agents
    without one, or off theirs, act by the fallback policy.

    `routes` maps agent ids to edge sequences (origin first), or is a planner `routes(env)` called
    at the first call of every episode (a new `env.episode` / `env.seed_used`), e.g. a precomputed
    assignment of the episode's scenario. An agent leaves its route for good once it is exhausted,
    the agent is off it (e.g. a late decision) or its next edge is not among the candidates (the
    a_max cap). `fallback` names a policy of FALLBACK_POLICIES; with `policy` set, agents without a
    route act greedily on its scores instead. `route_rows[j]` (alias `llm_rows`) says whether
    decision row j, in the order of the calls, came from a route; `deviated` holds the agents that
    left theirs this episode.
    """

    def __init__(
        self,
        env: NavigationEnv,
        routes: Routes | Callable[[NavigationEnv], Routes],
        fallback: str = "shortest_path",
        policy: GreedyPolicy | None = None,
    ) -> None:
        if fallback not in FALLBACK_POLICIES:
            raise ValueError(f"unknown fallback policy {fallback!r} (one of {', '.join(FALLBACK_POLICIES)})")
        self.env = env
        self.policy = policy
        self.planner = routes if callable(routes) else None
        self.routes: Routes = {} if callable(routes) else routes
        self.fallback = fallback
        self.deviated: set[str] = set()
        self.route_rows: list[bool] = []
        self._episode: tuple[int, int | None] | None = None

    @property
    def observes(self) -> bool:
        """Only the greedy policy reads observations."""
        return self.policy is not None

    @property
    def llm_rows(self) -> list[bool]:
        return self.route_rows

    def _new_episode(self) -> None:
        env = self.env
        key = (env.episode, getattr(env, "seed_used", None))
        if key != self._episode:
            self._episode = key
            self.deviated = set()
            if self.planner is not None:
                self.routes = self.planner(env)

    def _route_choice(self, aid: str) -> int | None:
        route = self.routes.get(aid)
        if route is None or aid in self.deviated:
            return None
        st = self.env.agents_state[aid]
        k = len(st.plan) - 1  # plan == route[:k+1] while the agent follows its route
        if k + 1 >= len(route) or route[k] != st.plan[-1]:
            self.deviated.add(aid)  # exhausted or left the route (e.g. a late decision): fallback from now on
            return None
        hits = np.flatnonzero(st.candidates == route[k + 1])
        if hits.size == 0:  # next edge cut by the a_max cap
            self.deviated.add(aid)
            return None
        return int(hits[0])

    def _fallback(self, aid: str) -> int:
        env = self.env
        if self.fallback == "shortest_path":
            return env.shortest_choice(aid)
        if self.fallback == "fastest_path":
            return env.fastest_choice(aid)
        return free_flow_choice(env, aid)

    def __call__(self, obs: np.ndarray, mask: np.ndarray, gstate: np.ndarray):
        self._new_episode()
        deciding = self.env.deciding_agents
        if len(deciding) != len(mask):
            raise RuntimeError("route actor out of step with the env")
        acts = np.zeros(len(mask), np.int64)
        greedy = np.argmax(self.policy(obs, mask), axis=1) if self.policy is not None else None
        for i, aid in enumerate(deciding):
            c = self._route_choice(aid)
            self.route_rows.append(c is not None)
            if c is None:
                c = int(greedy[i]) if greedy is not None else self._fallback(aid)
            acts[i] = c
        return acts, np.zeros(len(mask), np.float32), np.zeros(len(mask), np.float32)


def make_policy(name: str, env: NavigationEnv, seed: int = 0) -> Actor:
    """The reference policy `name` acting in `env` (random draws from `seed`). `due`'s duaIterate
    steps: $RELED_HPC_DUE_ITERATIONS, else sim.assignment.DEFAULT_ITERATIONS."""
    if name == "random":
        rng = np.random.default_rng(seed)
        return ReferenceActor(env, lambda _env, _a, mask: int(rng.choice(np.flatnonzero(mask))))
    if name == "shortest_path":
        return ReferenceActor(env, lambda e, a, _mask: e.shortest_choice(a))
    if name == "fastest_path":
        return ReferenceActor(env, lambda e, a, _mask: e.fastest_choice(a))
    if name == "free_flow":
        return RouteActor(env, free_flow_routes, fallback="free_flow")
    if name == "due":
        # off its route (the a_max cap, a late decision) an agent takes the live fastest way on
        return RouteActor(env, EquilibriumPlanner(), fallback="fastest_path")
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

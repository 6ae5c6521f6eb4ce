"""Choice revisions (`sed.revision_mode: choice`): the revision of a plan whose index is above its
threshold as a choice among concrete alternative routes for the agents that drive the index.

Measured on the shipped 0.5B model (docs/sed.md): asked to rewrite its whole program from the RVI/PDI
feedback, it returned the same routes in 45 of 46 revisions (the same calls with other comments, or a
broken program). A choice revision keeps the model's plan and asks, for each of the few agents with the
largest KL, which of its alternatives it should drive instead: the route the learning agents take now,
the shortest path, the fastest path on the cycle's congestion, and the fastest path avoiding the most
congested edge of its current route (deduplicated; the current route is never an option; the learners'
route is A, the others follow by live travel time). Each option
comes with its length, live travel time and size, so the model trades demonstration quality (time)
against divergence from the learners (KL); the answer is one JSON object {agent: letter}, constrained
by a JSON schema where the server supports it, and validated here either way.

Pure: routes come in as edge-id lists, the road network as the subset's sandbox snapshot (NavAPI).
"""

from __future__ import annotations

import math
import string
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .navapi import NavAPI, NavError

LEARNERS = "the route the learning agents take now"
SHORTEST = "the shortest path"
FASTEST = "the fastest path now"
AVOID = "the fastest path avoiding {edge} (the most congested edge of its current route)"
MAX_OPTIONS = 4  # one per kind above: letters A-D


@dataclass(frozen=True)
class RouteOption:
    label: str  # "A", "B", ... ("now" for the agent's current route)
    edges: tuple[str, ...]
    length_m: float
    time_s: float  # live travel time on the cycle's congestion snapshot
    what: tuple[str, ...]  # the kinds this route is (two kinds may give the same route)

    def line(self) -> str:
        km = self.length_m / 1000.0
        return f"{self.label}: {km:.2f} km, ~{self.time_s:.0f} s, {len(self.edges)} edges - " + "; ".join(self.what)


@dataclass(frozen=True)
class AgentMenu:
    agent: str
    kl: float  # the agent's KL at its worst decision (the PDI driver), nats
    current: RouteOption
    options: tuple[RouteOption, ...]

    def option(self, label: str) -> RouteOption | None:
        return next((o for o in self.options if o.label == label), None)

    def text(self) -> str:
        now = self.current
        head = (
            f"{self.agent} (KL {self.kl:.3g} at its worst decision; its route now: {now.length_m / 1000.0:.2f} km, "
            f"~{now.time_s:.0f} s, {len(now.edges)} edges)"
        )
        return "\n".join([head] + [f"  {o.line()}" for o in self.options])


def _complete(api: NavAPI, agent: str, route: Sequence[str]) -> list[str] | None:
    """`route` (origin first, possibly cut short: an agent that had not arrived at the horizon) extended
    to the destination by the shortest path; None if it does not start at the agent's position or cannot
    reach the destination from its end."""
    route = list(route)
    if not route or route[0] != api.position(agent):
        return None
    dest = api.destination(agent)
    if dest in route:
        return route[: route.index(dest) + 1]
    try:
        return route + api.shortest_path(route[-1], dest)[1:]
    except NavError:
        return None


def _congested_edge(api: NavAPI, route: Sequence[str]) -> str | None:
    """The edge of `route` (start and destination excluded) that loses the most time to congestion."""
    inner = list(route[1:-1])
    if not inner:
        return None
    lost = [(api.travel_time(e) - api.length(e) / max(api.speed_limit(e), 1e-3), e) for e in inner]
    worst = max(lost)
    return worst[1] if worst[0] > 0 else None


def agent_menu(
    api: NavAPI,
    agent: str,
    current: Sequence[str],
    learners: Sequence[str] | None,
    kl: float,
    tried: Collection[tuple[str, ...]] = (),
) -> AgentMenu | None:
    """The alternatives of one agent (see the module doc), lettered: the learners' route first, the
    others by live travel time; routes in `tried` (this cycle's earlier routes of the agent) are left out,
    so a revision never offers a way back; None when no alternative is left."""
    cur = list(current)
    seen = {tuple(cur), *(tuple(t) for t in tried)}
    dest = api.destination(agent)
    start = api.position(agent)
    kinds: list[tuple[str, list[str] | None]] = []
    if learners is not None:
        kinds.append((LEARNERS, _complete(api, agent, learners)))
    for what, fn in ((SHORTEST, api.shortest_path), (FASTEST, api.fastest_path)):
        try:
            kinds.append((what, fn(start, dest)))
        except NavError:
            kinds.append((what, None))
    worst = _congested_edge(api, cur)
    if worst is not None:
        try:
            kinds.append((AVOID.format(edge=worst), api.fastest_path_avoiding(start, dest, [worst])))
        except NavError:
            pass  # the destination is not reachable without it: no such option
    routes: dict[tuple[str, ...], list[str]] = {}
    for what, route in kinds:
        if route is None or tuple(route) in seen:
            continue
        routes.setdefault(tuple(route), []).append(what)
    if not routes:
        return None
    # the learners' route first, as A: it is what lowers the index the feedback is about; the others by time
    ranked = sorted(
        routes.items(), key=lambda kv: (LEARNERS not in kv[1], api.path_time(list(kv[0])), len(kv[0]), kv[0])
    )
    options = tuple(
        RouteOption(label, edges, api.path_length(list(edges)), api.path_time(list(edges)), tuple(what))
        for label, (edges, what) in zip(string.ascii_uppercase, ranked[:MAX_OPTIONS], strict=False)
    )
    now = RouteOption("now", tuple(cur), api.path_length(cur), api.path_time(cur), ("its current route",))
    return AgentMenu(agent, float(kl), now, options)


def build_menus(
    snapshot: dict[str, Any],
    routes: Mapping[str, Sequence[str]],
    kl: Mapping[str, float],
    learner_routes: Mapping[str, Sequence[str]],
    n_agents: int,
    tried: Mapping[str, Collection[tuple[str, ...]]] | None = None,
) -> list[AgentMenu]:
    """Menus for the (at most) `n_agents` agents of the plan with the largest KL that have an alternative
    not in `tried[agent]`."""
    tried = tried or {}
    api = NavAPI(snapshot)
    menus: list[AgentMenu] = []
    for agent, v in sorted(kl.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(menus) >= n_agents:
            break
        if agent not in routes or not math.isfinite(v):
            continue
        menu = agent_menu(api, agent, routes[agent], learner_routes.get(agent), v, tried.get(agent, ()))
        if menu is not None:
            menus.append(menu)
    return menus


def choice_schema(menus: Sequence[AgentMenu]) -> dict[str, Any]:
    """JSON schema of the answer: every listed agent -> one of its letters, nothing else."""
    return {
        "title": "route_choices",
        "type": "object",
        "properties": {m.agent: {"type": "string", "enum": [o.label for o in m.options]} for m in menus},
        "required": [m.agent for m in menus],
        "additionalProperties": False,
    }


def example_answer(menus: Sequence[AgentMenu]) -> str:
    """An answer of the right shape for the prompt, with the letters cycled so it suggests no choice."""
    parts = [f'"{m.agent}": "{m.options[i % len(m.options)].label}"' for i, m in enumerate(menus[:2])]
    return "{" + ", ".join(parts) + "}"


class ChoiceError(ValueError):
    """The answer is not a valid choice for every listed agent."""


def apply_choices(routes: Mapping[str, Sequence[str]], menus: Sequence[AgentMenu], value: Any) -> dict[str, list[str]]:
    """The plan's routes with each listed agent's route replaced by its chosen option; ChoiceError naming
    the agent and the value when an agent is missing, unknown, or its letter is not one of its options."""
    if not isinstance(value, dict):
        raise ChoiceError(f"the answer must be a JSON object {{agent: letter}}, got {type(value).__name__}")
    by_agent = {m.agent: m for m in menus}
    unknown = sorted(set(value) - set(by_agent))
    if unknown:
        raise ChoiceError(f"agent {unknown[0]!r} was not offered a choice (offered: {', '.join(by_agent)})")
    out = {a: list(r) for a, r in routes.items()}
    for agent, menu in by_agent.items():
        if agent not in value:
            raise ChoiceError(f"no choice for agent {agent!r}")
        label = value[agent]
        opt = menu.option(label) if isinstance(label, str) else None
        if opt is None:
            letters = ", ".join(o.label for o in menu.options)
            raise ChoiceError(f"agent {agent!r}: {label!r} is not one of its options ({letters})")
        out[agent] = list(opt.edges)
    return out

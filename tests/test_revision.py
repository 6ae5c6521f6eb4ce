"""Choice revisions (expert/revision.py): the menus of alternative routes, their schema, and how an answer
is applied or refused; on the shipped grid map's real routing graph."""

from __future__ import annotations

import pytest

from reled_hpc.expert.navapi import NavAPI
from reled_hpc.expert.prompts import build_choice_messages
from reled_hpc.expert.revision import (
    FASTEST,
    LEARNERS,
    SHORTEST,
    ChoiceError,
    agent_menu,
    apply_choices,
    build_menus,
    choice_schema,
    example_answer,
)
from reled_hpc.expert.sandbox import snapshot_from
from reled_hpc.llm.structured import validate_json


def _far_pair(graph) -> tuple[int, int]:
    """Two edges far apart with several routes between them (the grid's opposite corners)."""
    xy = graph.start_xy
    a = int((xy[:, 0] + xy[:, 1]).argmin())
    b = int((xy[:, 0] + xy[:, 1]).argmax())
    return a, b


@pytest.fixture(scope="module")
def setup(grid):
    graph = grid.graph
    o, d = _far_pair(graph)
    ids = graph.edge_ids
    rows = [{"id": "a1", "edge": ids[o], "dest": ids[d], "xy": (0.0, 0.0)}]
    # congestion on the shortest path's second edge: the fastest path goes around it
    sp = graph.route(o, d)
    snap = snapshot_from(graph, rows, {sp[1]: (0.9, 0.5)})
    return graph, snap, [ids[e] for e in sp]


def test_menu_lists_distinct_alternatives_never_the_current_route_learners_first(setup):
    _, snap, sp = setup
    api = NavAPI(snap)
    fast = api.fastest_path(sp[0], sp[-1])
    assert fast != sp  # the congested edge is on the shortest path
    # the learners drive a third route (around both)
    learners = api.fastest_path_avoiding(sp[0], sp[-1], [sp[1], fast[2]])
    menu = agent_menu(api, "a1", sp, learners, kl=1.7)
    assert menu is not None and menu.current.edges == tuple(sp)
    routes = [o.edges for o in menu.options]
    assert tuple(sp) not in routes and len(set(routes)) == len(routes) == 2
    assert set(routes) == {tuple(fast), tuple(learners)}
    assert [o.label for o in menu.options] == ["A", "B"]
    assert menu.options[0].edges == tuple(learners)  # the learners' route is A (here as fast as B)
    for o in menu.options:  # every option is a connected route from the position to the destination
        assert o.edges[0] == api.position("a1") and o.edges[-1] == api.destination("a1")
        for u, v in zip(o.edges, o.edges[1:], strict=False):
            assert v in api.successors(u)
    what = {o.edges: o.what for o in menu.options}
    assert what[tuple(learners)] == (LEARNERS,)
    # the fastest path is also the fastest one avoiding the current route's jammed edge: one option, two kinds
    assert what[tuple(fast)][0] == FASTEST and what[tuple(fast)][1].startswith(f"the fastest path avoiding {sp[1]}")
    assert all(SHORTEST not in w for w in what.values())  # the shortest path is the current route
    text = menu.text()
    assert text.startswith("a1 (KL 1.7") and all(f"\n  {o.label}: " in text for o in menu.options)
    # a learners' route cut short (still driving at the horizon) is completed by the shortest path: here
    # that is the current route again, so it is no option
    cut = agent_menu(api, "a1", sp, sp[:3], kl=1.7)
    assert cut is not None and all(LEARNERS not in o.what for o in cut.options)
    # routes the agent already had this cycle are never offered again: here only the learners' route is left
    again = agent_menu(api, "a1", sp, learners, kl=1.7, tried=[tuple(fast)])
    assert again is not None and [o.edges for o in again.options] == [tuple(learners)]
    assert agent_menu(api, "a1", sp, learners, kl=1.7, tried=[tuple(fast), tuple(learners)]) is None


def test_no_menu_when_every_alternative_is_the_current_route(grid):
    graph = grid.graph
    o, d = _far_pair(graph)
    ids = graph.edge_ids
    sp = [ids[e] for e in graph.route(o, d)]
    snap = snapshot_from(graph, [{"id": "a1", "edge": ids[o], "dest": ids[d], "xy": (0, 0)}])
    # free flow: shortest = fastest = the current route, no congested edge to avoid, learners the same
    assert agent_menu(NavAPI(snap), "a1", sp, sp, kl=3.0) is None
    assert build_menus(snap, {"a1": sp}, {"a1": 3.0}, {"a1": sp}, n_agents=5) == []


def test_build_menus_takes_the_largest_kl_first_and_caps_the_count(grid):
    graph = grid.graph
    ids = graph.edge_ids
    o, d = _far_pair(graph)
    sp = graph.route(o, d)
    rows, routes, kl = [], {}, {}
    for i in range(4):  # four agents on the same trip, different KL
        rows.append({"id": f"a{i}", "edge": ids[o], "dest": ids[d], "xy": (0, 0)})
        routes[f"a{i}"] = [ids[e] for e in sp]
        kl[f"a{i}"] = float(i)
    snap = snapshot_from(graph, rows, {sp[1]: (0.9, 0.5)})
    menus = build_menus(snap, routes, kl, {}, n_agents=2)
    assert [m.agent for m in menus] == ["a3", "a2"]
    schema = choice_schema(menus)
    assert schema["required"] == ["a3", "a2"] and schema["additionalProperties"] is False
    good = {m.agent: m.options[-1].label for m in menus}
    assert validate_json(good, schema) == []
    assert validate_json({"a3": "Z", "a2": "A"}, schema) and validate_json({"a3": "A"}, schema)
    out = apply_choices(routes, menus, good)
    assert out["a3"] == list(menus[0].options[-1].edges) and out["a0"] == routes["a0"]
    assert routes["a3"] == [ids[e] for e in sp]  # the plan given is not modified
    ex = example_answer(menus)
    assert validate_json(__import__("json").loads(ex), schema) == []


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ([], "JSON object"),
        ({"a3": "A"}, "no choice for agent 'a2'"),
        ({"a3": "A", "a2": "A", "a9": "A"}, "agent 'a9' was not offered"),
        ({"a3": "Q", "a2": "A"}, r"agent 'a3': 'Q' is not one of its options \(A"),
        ({"a3": 1, "a2": "A"}, "agent 'a3': 1 is not"),
    ],
)
def test_a_bad_answer_names_the_agent_and_the_value(grid, value, match):
    graph = grid.graph
    ids = graph.edge_ids
    o, d = _far_pair(graph)
    sp = graph.route(o, d)
    rows = [{"id": a, "edge": ids[o], "dest": ids[d], "xy": (0, 0)} for a in ("a2", "a3")]
    routes = {a: [ids[e] for e in sp] for a in ("a2", "a3")}
    menus = build_menus(snapshot_from(graph, rows, {sp[1]: (0.9, 0.5)}), routes, {"a2": 1.0, "a3": 2.0}, {}, 5)
    with pytest.raises(ChoiceError, match=match):
        apply_choices(routes, menus, value)


def test_choice_messages_keep_the_round_1_prefix_and_list_every_menu(setup):
    _, snap, sp = setup
    menu = agent_menu(NavAPI(snap), "a1", sp, None, kl=2.5)
    first = [{"role": "system", "content": "SYSTEM"}, {"role": "user", "content": "TASK, MAP, SUBSET\n"}]
    msgs = build_choice_messages(
        first, "```python\ndef plan(api):\n    pass\n", {"RVI": 900.0, "PDI": 2.5}, {"RVI": 750.0, "PDI": 2.0},
        [menu.text()], example_answer([menu]), round_no=2, template_version="v3",
    )  # fmt: skip
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[0] == first[0] and msgs[1]["content"] == first[1]["content"].rstrip()
    assert msgs[2]["content"].endswith("```")  # the cut fence closed again
    fb = msgs[3]["content"]
    assert fb.startswith("### FEEDBACK (round 2)") and "RVI_k = 900 " in fb and "ABOVE by" in fb
    assert menu.text() in fb and '{"a1": "A"}' in fb
    with pytest.raises(ValueError, match="at least one agent"):
        build_choice_messages(first, "x", {}, {}, [], "{}", round_no=2)

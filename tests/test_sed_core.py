"""SED core: the stationarity indices (hand-computed), the random partition, prompts and reply parsing."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from reled_hpc.expert import indices as ix
from reled_hpc.expert.partition import partition_for_cycle, random_partition
from reled_hpc.expert.prompts import (
    JSON_MAX_AGENTS,
    ReplyFormatError,
    build_feedback_messages,
    build_plan_messages,
    estimate_tokens,
    extract_json_plan,
    extract_program,
    failed_reply_result,
    json_plan_to_program,
    load_plan_schema,
    program_from_reply,
    summarise_subset,
)
from reled_hpc.expert.sandbox import execution_rate, run_program, snapshot_from, validate_program
from reled_hpc.learn.losses import masked_log_probs

# ---------------------------------------------------------------------------------------------
# indices
# ---------------------------------------------------------------------------------------------


def test_smoothed_expert_policy_matches_definition():
    masks = np.array([[1, 1, 0], [1, 1, 1]], bool)
    p = ix.smoothed_expert_policy([0, 2], masks, eps=0.3)
    # row 0: 2 valid actions -> 0.7*[1,0,0] + 0.3*[1/2,1/2,0]; row 1: 0.7*[0,0,1] + 0.3*[1/3,1/3,1/3]
    np.testing.assert_allclose(p, [[0.85, 0.15, 0.0], [0.1, 0.1, 0.8]])
    np.testing.assert_allclose(p.sum(1), 1.0)
    with pytest.raises(ValueError, match="masked"):
        ix.smoothed_expert_policy([2, 0], masks, eps=0.3)  # action 2 is masked in row 0
    with pytest.raises(ValueError, match="eps"):
        ix.smoothed_expert_policy([0, 0], masks, eps=1.5)


def test_pdi_two_states_three_actions_with_a_masked_action():
    eps = 0.3
    masks = torch.tensor([[True, True, False], [True, True, True]])
    expert = ix.smoothed_expert_policy([0, 2], masks, eps)  # [[0.85, 0.15, 0], [0.1, 0.1, 0.8]]
    # policy: state 0 logits [0, 0, 5] with action 2 masked -> q = [0.5, 0.5, 0] (the 5 must not matter);
    #         state 1 logits [0, 0, ln 2] -> q = [0.25, 0.25, 0.5]
    logits = torch.tensor([[0.0, 0.0, 5.0], [0.0, 0.0, math.log(2.0)]])
    logq = masked_log_probs(logits, masks)
    # KL_0 = 0.85 ln(0.85/0.5) + 0.15 ln(0.15/0.5) = 0.85*0.5306283 - 0.15*1.2039728 = 0.2704381
    # KL_1 = 2 * 0.1 ln(0.1/0.25) + 0.8 ln(0.8/0.5) = -0.2*0.9162907 + 0.8*0.4700036 = 0.1927448
    kl0 = 0.85 * math.log(0.85 / 0.5) + 0.15 * math.log(0.15 / 0.5)
    kl1 = 0.2 * math.log(0.1 / 0.25) + 0.8 * math.log(0.8 / 0.5)
    assert kl0 == pytest.approx(0.2704381, abs=1e-6) and kl1 == pytest.approx(0.1927448, abs=1e-6)
    np.testing.assert_allclose(ix.per_state_kl(expert, logq, masks), [kl0, kl1], rtol=1e-5)

    value, per_agent, argmax = ix.pdi(expert, logq, masks, ["veh1", "veh2"])
    assert value == pytest.approx(kl0, rel=1e-5)  # PDI_k = max(KL_0, KL_1)
    assert argmax == 0
    assert per_agent == pytest.approx({"veh1": kl0, "veh2": kl1}, rel=1e-5)


def test_pdi_per_agent_is_the_max_over_its_states():
    masks = np.ones((3, 2), bool)
    expert = ix.smoothed_expert_policy([0, 0, 0], masks, 0.0)  # one-hot: KL = -log q(expert action)
    logq = np.log([[0.5, 0.5], [0.1, 0.9], [0.8, 0.2]])
    res = ix.pdi(expert, logq, masks, np.array([7, 7, 9]))
    assert res.per_agent == pytest.approx({7: -math.log(0.1), 9: -math.log(0.8)})
    assert res.value == pytest.approx(-math.log(0.1)) and res.argmax == 1
    assert ix.pdi(np.zeros((0, 2)), np.zeros((0, 2)), np.zeros((0, 2), bool), []) == (0.0, {}, -1)


def test_kl_stays_finite_when_the_policy_gives_the_expert_action_almost_no_mass():
    eps = 0.1
    masks = torch.tensor([[True, True, False]])
    # float32: exp(-1e4) underflows, so the policy's PROBABILITY of action 0 is exactly 0 ...
    logq = masked_log_probs(torch.tensor([[-1e4, 0.0, 0.0]]), masks)
    assert torch.exp(logq)[0, 0].item() == 0.0
    expert = ix.smoothed_expert_policy([0], masks, eps)  # [0.95, 0.05, 0]
    kl = ix.per_state_kl(expert, logq, masks)
    # ... but KL is computed from log-probs: 0.95 (ln 0.95 + 1e4) + 0.05 ln 0.05 (log q_1 = 0)
    expected = 0.95 * (math.log(0.95) + 1e4) + 0.05 * math.log(0.05)
    assert np.isfinite(kl).all() and kl[0] == pytest.approx(expected, rel=1e-6)
    assert np.isfinite(ix.rvi({"a": float(kl[0])}, 0.99, 25.0).value)
    # a valid action with probability exactly 0 (log -inf) has no finite KL: refused, not inf
    with pytest.raises(ValueError, match="probability 0"):
        ix.per_state_kl(expert, np.array([[-np.inf, 0.0, -np.inf]]), masks)


def test_bound_and_rvi_hand_computed():
    kl = {"veh1": 0.5, "veh2": 0.02}
    gamma, r_max = 0.9, 2.0
    # 2*0.9*2/(1-0.9)^2 = 360; sqrt(0.5*0.5) = 0.5, sqrt(0.5*0.02) = 0.1 -> bound = 360*(0.5+0.1) = 216
    assert ix.nonstationarity_bound(kl, gamma, r_max) == pytest.approx(216.0)
    assert ix.bound_contributions(kl, gamma, r_max) == pytest.approx({"veh1": 180.0, "veh2": 36.0})
    # default return scale r_max/(1-gamma) = 20 -> RVI = 216/20 = 10.8 = 2*0.9/0.1 * 0.6
    res = ix.rvi(kl, gamma, r_max)
    assert res.return_scale == pytest.approx(20.0)
    assert res.value == pytest.approx(10.8) and res.bound == pytest.approx(216.0)
    assert res.per_agent == pytest.approx({"veh1": 9.0, "veh2": 1.8})
    assert ix.rvi(kl, gamma, r_max, return_scale=54.0).value == pytest.approx(4.0)
    assert ix.rvi_at_uniform_kl(0.5, 2, gamma) == pytest.approx(2 * 0.9 / 0.1 * 2 * 0.5)
    # r_max cancels with the default scale: RVI is unit-free
    assert ix.rvi(kl, gamma, 37.0).value == pytest.approx(10.8)
    assert ix.rvi({}, gamma, r_max).value == 0.0
    with pytest.raises(ValueError, match="gamma"):
        ix.rvi(kl, 1.0, r_max)
    with pytest.raises(ValueError, match=">= 0"):
        ix.rvi([-0.1], gamma, r_max)


def test_rvi_is_monotonic_in_kl():
    kls = [0.0, 1e-4, 0.01, 0.1, 0.5, 1.0, 3.0, 10.0]
    vals = [ix.rvi([k, 0.2], 0.99, 25.0).value for k in kls]
    assert all(b > a for a, b in itertools.pairwise(vals))
    grow = [ix.rvi([0.1] * n, 0.99, 25.0).value for n in (1, 2, 5)]
    assert grow == pytest.approx([grow[0], 2 * grow[0], 5 * grow[0]])


def test_measured_external_change():
    pol = np.array([-10.0, -12.0, -8.0, -20.0])
    exp_ = np.array([-11.0, -10.0, -8.0, -5.0])
    outside = np.array([True, True, True, False])  # agent 3 is in S_k: its own change does not count
    res = ix.measured_external_change(pol, exp_, outside, return_scale=20.0)
    # deltas outside: -1, +2, 0 -> mean 1/3, max |.| 2
    assert res.mean == pytest.approx(1 / 3) and res.abs_mean == pytest.approx(1 / 3)
    assert res.max_abs == pytest.approx(2.0) and res.n_outside == 3
    assert res.normalised == pytest.approx(1 / 60)
    assert math.isnan(ix.measured_external_change(pol, exp_, outside).normalised)
    assert ix.measured_external_change(pol, exp_, np.zeros(4, bool)).n_outside == 0


# ---------------------------------------------------------------------------------------------
# partition
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 101, 500])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
def test_partition_covers_every_agent_once_with_balanced_sizes(n, m):
    ids = [f"veh{i}" for i in range(n)]
    parts = random_partition(ids, m, np.random.default_rng(n * 31 + m))
    assert len(parts) == min(m, n)
    flat = [a for p in parts for a in p]
    assert sorted(flat) == sorted(ids) and len(flat) == len(set(flat))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_partition_is_deterministic_per_seed_and_redrawn_per_cycle():
    ids = list(range(40))
    assert partition_for_cycle(ids, 2, seed=3, cycle=0) == partition_for_cycle(ids, 2, seed=3, cycle=0)
    draws = {tuple(map(tuple, partition_for_cycle(ids, 2, seed=3, cycle=c))) for c in range(10)}
    assert len(draws) == 10  # a fresh partition each cycle
    assert partition_for_cycle(ids, 2, seed=4, cycle=0) != partition_for_cycle(ids, 2, seed=3, cycle=0)
    assert random_partition(ids, 4, 11) == random_partition(ids, 4, 11)


def test_partition_edge_cases():
    assert random_partition(["a", "b"], 5, 0) in ([["a"], ["b"]], [["b"], ["a"]])  # m > n: clamped to n
    assert random_partition([], 3, 0) == []
    with pytest.raises(ValueError, match="m"):
        random_partition(["a"], 0, 0)
    with pytest.raises(ValueError, match="unique"):
        random_partition(["a", "a"], 1, 0)


# ---------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------


def _agents(graph, n, seed=0, prefix="veh"):
    rng = np.random.default_rng(seed)
    e, d = rng.integers(0, graph.n_edges, n), rng.integers(0, graph.n_edges, n)
    return [{"id": f"{prefix}{i}", "edge": int(a), "dest": int(b)} for i, (a, b) in enumerate(zip(e, d, strict=True))]


def _tokens(messages):
    return sum(estimate_tokens(m["content"]) for m in messages)


@pytest.mark.parametrize("mapname", ["helsinki", "grid"])
def test_plan_prompt_does_not_grow_with_the_subset(mapname, request):
    graph = request.getfixturevalue(mapname).graph
    occ = np.clip(np.random.default_rng(1).beta(0.5, 3, graph.n_edges), 0, 1)
    sizes = {}
    for n in (10, 100, 1000):
        s = summarise_subset(graph, _agents(graph, n), occ, map_name=mapname, subset=1, n_subsets=2, n_total=2 * n)
        msgs = build_plan_messages(s, "code")
        assert [m["role"] for m in msgs] == ["system", "user"]
        sizes[n] = _tokens(msgs)
        assert sizes[n] < 3000, (n, sizes[n])
        assert f"{n} agents" in msgs[1]["content"] and "def plan(api):" in msgs[1]["content"]
        shown = [a["id"] for a in _agents(graph, n) if f"{a['id']}:" in msgs[1]["content"]]
        assert len(shown) <= 5  # sample agents only
    assert sizes[1000] < 1.2 * sizes[10], sizes


def test_summary_content(helsinki):
    graph = helsinki.graph
    occ = np.zeros(graph.n_edges)
    occ[[3, 10, 20]] = [0.9, 0.6, 0.3]
    agents = _agents(graph, 50, seed=2)
    s = summarise_subset(graph, agents, {graph.edge_ids[3]: (0.9, 1.0), 10: 0.6, 20: 0.3}, map_name="helsinki")
    assert [e.id for e in s.congested] == [graph.edge_ids[i] for i in (3, 10, 20)]
    s2 = summarise_subset(graph, agents, occ)  # an array gives the same
    assert [e.occupancy for e in s2.congested] == [0.9, 0.6, 0.3]
    assert sum(c.count for c in s.dest_clusters) + s.n_other_dest == 50
    assert sum(c.count for c in s.origin_clusters) + s.n_other_origin == 50
    assert len(s.samples) == 5 and len({a.id for a in s.samples}) == 5
    assert 0 < len(s.hotspots) <= 8 and all(0 < e.share <= 1 for e in s.hotspots)
    assert s.n_edges_map == graph.n_edges and s.n_edges_area <= graph.n_edges
    with pytest.raises(ValueError, match="at least one agent"):
        summarise_subset(graph, [])


def test_json_mode_prompt_lists_every_agent_and_is_only_for_small_subsets(grid):
    agents = _agents(grid.graph, 6)
    msgs = build_plan_messages(summarise_subset(grid.graph, agents), "json")
    text = msgs[1]["content"]
    assert all(f"{a['id']}: at " in text for a in agents)
    assert '"calls"' in text and _tokens(msgs) < 3000
    big = summarise_subset(grid.graph, _agents(grid.graph, JSON_MAX_AGENTS + 1))
    with pytest.raises(ValueError, match="json mode"):
        build_plan_messages(big, "json")
    with pytest.raises(ValueError, match="mode"):
        build_plan_messages(big, "yaml")  # type: ignore[arg-type]


def test_feedback_prompt_shows_indices_thresholds_drivers_and_errors(grid):
    s = summarise_subset(grid.graph, _agents(grid.graph, 30), map_name="grid")
    plan_msgs = build_plan_messages(s)
    program = "def plan(api):\n    for a in api.agents():\n        api.move_to_by_shortest_path(a, 'A0B0')\n"
    fb = build_feedback_messages(
        plan_msgs,
        program,
        indices={"RVI": 123.456789, "PDI": 0.0123456},
        thresholds={"RVI": 50.0, "PDI": 0.5},
        drivers={"RVI": {"veh17": 40.25, "veh3": 12.5, "veh9": 0.001}, "PDI": [("veh4", 0.0123456)]},
        errors=["invalid routes: agent veh3: ends at 'A0B0', not at the destination 'C1C2'"],
    )
    text = fb[1]["content"]
    assert [m["role"] for m in fb] == ["system", "user"] and fb[0] == plan_msgs[0]
    assert text.startswith(plan_msgs[1]["content"])  # the plan prompt, then the feedback
    assert "RVI_k = 123.5 (threshold tau_R = 50): ABOVE by 73.46" in text
    assert "PDI_k = 0.01235 (threshold tau_P = 0.5): ok" in text
    assert "veh17 (40.25), veh3 (12.5), veh9 (0.001)" in text and "veh4 (0.01235)" in text
    assert text.index("veh17") < text.index("veh3 (12.5)")  # largest contribution first
    assert "not at the destination 'C1C2'" in text
    assert "api.move_to_by_shortest_path(a, 'A0B0')" in text
    assert "### FEEDBACK (round 2)" in text
    assert _tokens(fb) < 3000

    # the next round replaces the feedback section: one FEEDBACK section, size bounded
    long_program = "def plan(api):\n" + "".join(f"    x{i} = {i}\n" for i in range(2000))
    fb2 = build_feedback_messages(fb, long_program, {"RVI": 40.0}, {"RVI": 50.0}, {}, [f"err {i}" for i in range(20)])
    text2 = fb2[1]["content"]
    assert text2.count("### FEEDBACK") == 1 and "### FEEDBACK (round 3)" in text2
    assert "(first 2000 of" in text2 and "... and 14 more" in text2
    assert _tokens(fb2) < 3000


# ---------------------------------------------------------------------------------------------
# reply parsing
# ---------------------------------------------------------------------------------------------

PLAN_BODY = """def plan(api):
    for a in api.agents():
        dest = api.destination(a)
        try:
            api.move_to_by_fastest_path(a, dest)
        except NavError:
            api.move_to_by_shortest_path(a, dest)"""

REPLIES = {
    "prose_and_fence": f"Sure! Here is a program that routes every agent.\n\n```python\n{PLAN_BODY}\n```\n\n"
    "It uses the fastest path and falls back to the shortest one.",
    "fence_without_language": f"```\n{PLAN_BODY}\n```",
    "capitalised_language_and_indented": "1. The plan:\n   ```Python\n"
    + "\n".join("   " + ln for ln in PLAN_BODY.splitlines())
    + "\n   ```",
    "no_fences_with_prose": f"Here is the plan:\n\n{PLAN_BODY}\n\nThis sends each agent on its fastest path.",
    "module_level_style": "LIMIT = 0.5\nHUBS = ['A0B0', 'B1C1']\n\ndef plan(api):\n    for a in agents():\n"
    "        move_to_by_shortest_path(a, destination(a))\n",
    "unclosed_fence": f"```python\n{PLAN_BODY}\n",
    "old_then_revised": "Your previous program:\n```python\ndef plan(api):\n    pass\n```\nRevised:\n"
    f"```python\n{PLAN_BODY}\n```",
    "explanation_block_first": "Call it as:\n```python\nroutes = plan(api)\n```\nProgram:\n"
    f"```python\n{PLAN_BODY}\n```",
}


@pytest.mark.parametrize("kind", sorted(REPLIES))
def test_extract_program_from_realistic_replies(kind):
    code = extract_program(REPLIES[kind])
    validate_program(code)  # the sandbox's static checks accept what was extracted
    assert code.lstrip().startswith(("def plan(api):", "LIMIT = 0.5"))
    if kind == "module_level_style":
        assert "HUBS = ['A0B0', 'B1C1']" in code and "move_to_by_shortest_path(a, destination(a))" in code
    else:
        assert code == PLAN_BODY


def test_extract_program_keeps_rule_breaks_for_the_sandbox():
    code = extract_program(f"```python\nimport math\n\n{PLAN_BODY}\n```")
    assert code.startswith("import math")  # not silently fixed: the sandbox rejects it and it counts


@pytest.mark.parametrize(
    "reply",
    [
        "",
        "   ",
        "I'm sorry, I can't help with routing vehicles.",
        "```python\nfor a in api.agents():\n    print(a)\n```",
        "def planner(api):\n    return {}",
    ],
)
def test_extract_program_rejects_garbage_clearly(reply):
    with pytest.raises(ReplyFormatError, match=r"def plan|empty reply"):
        extract_program(reply)


def test_json_plan_round_trip_runs_in_the_sandbox_like_code(grid):
    graph = grid.graph
    agents = [a for a in _agents(graph, 12, seed=5) if a["edge"] != a["dest"]][:3]
    snap = snapshot_from(graph, agents)
    a0, a1, a2 = (a["id"] for a in agents)
    mid = graph.edge_ids[graph.route(agents[1]["edge"], agents[1]["dest"])[1]]  # a waypoint on a1's way
    plan = {
        "calls": [
            {"agent": a0, "op": "move_to_by_fastest_path", "args": ["@dest"]},
            {"agent": a1, "op": "move_via", "args": [mid, "@dest"]},
            {"agent": a2, "op": "move_to_by_shortest_path", "args": [graph.edge_ids[agents[2]["dest"]]]},
        ]
    }
    reply = "Here you go:\n```json\n" + json.dumps(plan) + "\n```"
    parsed = extract_json_plan(reply, load_plan_schema())
    assert parsed == plan
    program = json_plan_to_program(parsed)
    assert program == program_from_reply(reply, "json")
    res = run_program(program, snap)
    assert res.executed, res.error
    assert res.routes[a1][1] == mid

    # the example in the code-mode prompt is itself a valid program
    prompt = build_plan_messages(summarise_subset(graph, agents))[1]["content"]
    example = extract_program(prompt.split("### OUTPUT FORMAT", 1)[1])
    ok = run_program(example, snap)
    assert ok.executed, ok.error

    # an unparsable reply counts as generated, not executed, in both modes
    bad = []
    for text, mode in (('{"calls": [{"agent": "x", "op": "teleport", "args": ["E"]}]}', "json"), ("no code", "code")):
        with pytest.raises(ReplyFormatError):
            program_from_reply(text, mode)
        try:
            program_from_reply(text, mode)
        except ReplyFormatError as e:
            bad.append(failed_reply_result(e))
    assert execution_rate([res, ok, *bad]) == pytest.approx(0.5)


def test_json_plan_errors_are_clear():
    with pytest.raises(ReplyFormatError, match=r"not JSON|invalid JSON"):
        extract_json_plan("calls: none")
    with pytest.raises(ReplyFormatError, match="exactly one target"):
        extract_json_plan('{"calls": [{"agent": "v", "op": "move_to_by_shortest_path", "args": ["A", "B"]}]}')
    with pytest.raises(ReplyFormatError, match="calls"):
        json_plan_to_program({"routes": []})


# ---------------------------------------------------------------------------------------------
# programs/routes_changed (issue 13): written and read back; part of schema version 3
# ---------------------------------------------------------------------------------------------


def test_routes_changed_column_round_trip(tmp_path):
    import sys
    from pathlib import Path

    import h5py

    from reled_hpc.errors import DumpError
    from reled_hpc.expert.summary import sed_summary
    from reled_hpc.io import TrajectoryReader, TrajectoryWriter
    from reled_hpc.io import schema as S

    sys.path.insert(0, str(Path(__file__).parent / "helpers"))
    from h5_crash_child import A_MAX, OBS_DIM, expected_metrics, expected_rows

    col = S.PROGRAM_COLUMN_BY_NAME["routes_changed"]
    assert col.dtype == np.uint8 and col.units == "bool" and col.description
    rows = [
        {"cycle": 0, "subset": 0, "round": r, "text": f"p{r}", "executed": True, "routes_changed": c,
         "completion_tokens": 5}
        for r, c in ((1, 0), (2, 1), (3, 0))
    ]  # fmt: skip
    path = tmp_path / "run.h5"
    with TrajectoryWriter(path, config_yaml="seed: 0\n", obs_dim=OBS_DIM, a_max=A_MAX) as w:
        for g in ("agent", "expert"):
            w.append_rows(g, expected_rows(0, g))
        w.append_programs(rows)
        w.end_iteration(expected_metrics(0))
    with TrajectoryReader(path) as r:
        p, m = r.programs(), r.metrics()
        assert p["routes_changed"].tolist() == [0, 1, 0] and p["routes_changed"].dtype == np.uint8
    s = sed_summary(p, m)
    assert s.revisions_routes_changed == 1
    # the column is part of version 3: a file without it is refused by name, not misread
    with h5py.File(path, "r+") as f:
        assert f.attrs["schema_version"] == 3
        del f["programs/routes_changed"]
    with pytest.raises(DumpError, match="routes_changed"):
        TrajectoryReader(path)

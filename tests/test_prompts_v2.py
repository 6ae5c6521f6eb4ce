"""Prompt layout v2 (issue 13): the parts every subset of a cycle shares come first and byte-identical, so
the server's prefix cache evaluates them once; answers stop at the code block's closing fence."""

from __future__ import annotations

import numpy as np
import pytest

from reled_hpc.expert.prompts import (
    CODE_STOP,
    SUMMARY_LIMITS,
    build_feedback_messages,
    build_plan_messages,
    estimate_tokens,
    extract_program,
    summarise_map,
    summarise_subset,
)

SUBSET_MARK = "\n\n### SUBSET\n"


def _common(a: str, b: str) -> int:
    """Length of the longest common prefix of two strings."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _agents(graph, n, seed, prefix):
    rng = np.random.default_rng(seed)
    e, d = rng.integers(0, graph.n_edges, n), rng.integers(0, graph.n_edges, n)
    return [{"id": f"{prefix}{i}", "edge": int(a), "dest": int(b)} for i, (a, b) in enumerate(zip(e, d, strict=True))]


def _cycle(graph, occ, version="v2", sizes=(5, 7)):
    """(map summary, round-1 code-mode messages of the subsets of one cycle), built as LLMExpert builds them."""
    total = sum(sizes)
    ms = summarise_map(graph, occ, map_name="helsinki", n_subsets=len(sizes), n_total=total)
    out = []
    for k, n in enumerate(sizes):
        s = summarise_subset(
            graph, _agents(graph, n, k, f"s{k}_"), occ, map_name="helsinki", subset=k + 1, n_subsets=len(sizes),
            n_total=total, **SUMMARY_LIMITS[version],
        )  # fmt: skip
        out.append(build_plan_messages(s, "code", version, ms))
    return ms, out


def _cycle_prompts(graph, occ, sizes=(5, 7)):
    """Round-1 v2 messages of the subsets of one cycle."""
    return _cycle(graph, occ, "v2", sizes)[1]


def test_v2_subsets_share_a_byte_identical_prefix_covering_all_but_the_subset_part(helsinki):
    graph = helsinki.graph
    occ = np.clip(np.random.default_rng(1).beta(0.5, 3, graph.n_edges), 0, 1)
    a, b = _cycle_prompts(graph, occ)
    assert a[0] == b[0]  # the system message
    ua, ub = a[1]["content"], b[1]["content"]
    cut = ua.index(SUBSET_MARK) + len(SUBSET_MARK)
    assert ub.index(SUBSET_MARK) + len(SUBSET_MARK) == cut
    assert ua[:cut] == ub[:cut]  # everything up to the subset part, byte for byte
    shared = ua[:cut]
    for part in ("### TASK", "### API", "Rules (", "### OUTPUT FORMAT", "def plan(api):", "### MAP", 'Map "helsinki"'):
        assert part in shared, part
    # the subset's own part is all that differs, and it names its own agents only
    assert ua[cut:] != ub[cut:]
    assert "s0_" in ua[cut:] and "s1_" not in ua and "s0_" not in ub
    assert _common(ua, ub) < cut + len("Subset 1")
    # the shared part is most of the prompt
    assert estimate_tokens(a[0]["content"] + shared) > 0.5 * estimate_tokens(a[0]["content"] + ua)
    # v1 puts the subset first: its prompts share only the task text
    s = summarise_subset(graph, _agents(graph, 5, 0, "x"), occ, map_name="helsinki", subset=1, n_subsets=2)
    s2 = summarise_subset(graph, _agents(graph, 5, 1, "y"), occ, map_name="helsinki", subset=2, n_subsets=2)
    v1a, v1b = build_plan_messages(s, "code", "v1")[1]["content"], build_plan_messages(s2, "code", "v1")[1]["content"]
    assert _common(v1a, v1b) < _common(ua, ub) / 4


def test_v2_feedback_comes_after_the_round1_prompt_and_the_answer_as_turns(helsinki):
    """[system, round-1 user, the answer as the model wrote it, feedback]: the server cached its state
    after that answer, so the revision's prompt extends it; the fence the stop sequence ate is closed."""
    graph = helsinki.graph
    (a,) = _cycle_prompts(graph, None, sizes=(5,))
    raw = "```python\ndef plan(api):\n    pass"  # cut at the closing fence by CODE_STOP
    fb = build_feedback_messages(
        a, "def plan(api):\n    pass", {"RVI": 900.0, "PDI": 2.0}, {"RVI": 350.0, "PDI": 0.5},
        {"PDI": {"s0_1": 2.0, "s0_2": 0.1}}, ["agent s0_3: no route"], round_no=2, template_version="v2",
        agent_notes=["s0_3: no valid route (unreachable)", "s0_1: KL 2 nats at its worst decision"], repeated=True,
        answer_text=raw,
    )  # fmt: skip
    assert [m["role"] for m in fb] == ["system", "user", "assistant", "user"]
    assert fb[:2] == a and fb[2]["content"] == raw + "\n```"
    section = fb[3]["content"]
    assert section.startswith("### FEEDBACK (round 2)") and "def plan" not in section  # the answer is not repeated
    assert "WHAT WENT WRONG, PER AGENT:\n- s0_3: no valid route (unreachable)\n- s0_1: KL 2" in section
    assert "exactly the same routes" in section  # repeated
    assert "RVI_k = 900 (threshold tau_R = 350): ABOVE by 550" in section
    # the next round replaces the previous answer and feedback: the size stays bounded
    fb3 = build_feedback_messages(fb, "x", {}, {}, {}, [], round_no=3, template_version="v2", answer_text="y")
    assert fb3[:2] == a and fb3[2]["content"] == "y" and fb3[3]["content"].startswith("### FEEDBACK (round 3)")
    assert "exactly the same routes" not in fb3[3]["content"]
    # v1 keeps one user message with the answer inside
    v1 = build_feedback_messages(a, "def plan(api):\n    pass", {}, {}, {}, [], round_no=2)
    assert [m["role"] for m in v1] == ["system", "user"] and "PREVIOUS ANSWER" in v1[1]["content"]


def test_v2_needs_the_map_summary_and_stays_bounded(helsinki):
    graph = helsinki.graph
    s = summarise_subset(graph, _agents(graph, 10, 0, "v"), None, map_name="helsinki")
    with pytest.raises(ValueError, match="map_summary"):
        build_plan_messages(s, "code", "v2")
    ms = summarise_map(graph, None, map_name="helsinki", n_subsets=1, n_total=10)
    sizes = {}
    for n in (10, 1000):
        s = summarise_subset(graph, _agents(graph, n, 0, "v"), None, map_name="helsinki", n_total=n)
        msgs = build_plan_messages(s, "code", "v2", ms)
        sizes[n] = sum(estimate_tokens(m["content"]) for m in msgs)
        assert sum(f"v{i}:" in msgs[1]["content"] for i in range(n)) <= 5  # sample agents, never the list
    assert sizes[1000] < 1.1 * sizes[10], sizes
    # json mode keeps its schema and the shared-first order too
    small = summarise_subset(graph, _agents(graph, 4, 0, "j"), None, map_name="helsinki")
    user = build_plan_messages(small, "json", "v2", ms)[1]["content"]
    assert user.index("### OUTPUT FORMAT") < user.index("### MAP") < user.index("### SUBSET") < user.index("j0:")


ANSWER = """```python
JAM = 0.5

def plan(api):
    for a in api.agents():
        api.move_to_by_shortest_path(a, api.destination(a))
```

This program routes every agent on its shortest path. ```python
print("not this")
```
"""


def test_the_stop_sequence_cuts_at_the_closing_fence_and_the_parser_takes_the_cut_answer():
    assert not ANSWER.startswith(CODE_STOP) and "```python\n".find(CODE_STOP) == -1
    cut = ANSWER[: ANSWER.index(CODE_STOP)]  # what the server returns: the stop text is dropped
    assert cut.endswith("destination(a))") and "```" not in cut[3:]
    code = extract_program(cut)
    assert code.startswith("JAM = 0.5") and code.rstrip().endswith(
        "api.move_to_by_shortest_path(a, api.destination(a))"
    )
    assert code == extract_program(ANSWER.split("\n\nThis program")[0])  # same program as the closed fence
    # prose before the fence (the opening fence has no newline right after ```): the stop does not fire there
    assert CODE_STOP not in "Here it is:\n```python\ndef plan(api):\n"

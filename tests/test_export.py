"""Self-describing dumps of a real training run (units seen by h5py alone) and `reled-hpc export` to
Parquet / CSV: values equal the reader's, units kept, committed rows only, streamed, clear errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from test_analysis import config, write_dump
from test_damaged_dumps import corrupt
from test_h5io import downgrade

from reled_hpc.cli import main
from reled_hpc.experiment.config import load_config
from reled_hpc.experiment.train import train
from reled_hpc.io import TrajectoryReader
from reled_hpc.io import schema as S
from reled_hpc.io.export import UNITS_SUFFIX, flat_columns

GROUPS = ("agent", "expert", "metrics", "programs")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, grid) -> Path:
    """The run folder of a real 2-iteration IPPO run on the grid map (a few seconds)."""
    d = tmp_path_factory.mktemp("trained")
    cfg = {"name": "export-test", "algorithm": "ippo", "seed": 0, "iterations": 2, "episodes_per_iteration": 1,
           "checkpoint_every": 1, "runs_dir": str(d / "runs"), "tensorboard": False,
           "env": {"map": "grid", "n_agents": 5, "traffic": "light", "horizon_s": 300.0, "depart_window_s": 20.0,
                   "min_trip_m": 400.0},
           "ppo": {"lr": 0.001, "epochs": 1, "minibatch": 64}}  # fmt: skip
    path = d / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_dir, _ = train(path)
    return run_dir


@pytest.fixture(scope="module")
def sed_dump(tmp_path_factory) -> Path:
    """A synthetic dump with expert rows and LLM programs (through the real writer)."""
    d = tmp_path_factory.mktemp("sed")
    (d / "map").mkdir()
    (d / "map" / "manifest.json").write_text('{"name": "fake", "scale_m": 1000.0}')
    return write_dump(d / "run" / "trajectories.h5", config(d / "map", "reled", 0), iterations=4, sed=True)


def test_training_dump_describes_itself_to_h5py(trained):
    """Read with h5py only: units and description on every agent/ and metrics/ dataset (real metric names),
    feature names of obs from EnvConfig.obs_features, plain uint8 booleans, an int32 metrics/iteration."""
    env = load_config(trained / "config.yaml").env
    with h5py.File(trained / "trajectories.h5", "r") as f:
        assert f.attrs["schema_version"] == 3 and f["agent/obs"].shape[0] > 0
        assert len(f["metrics"]) > len(S.METRIC_COLUMNS)  # the trainer's extra metrics are there too
        for g in ("agent", "expert", "metrics", "programs"):
            for name, ds in f[g].items():
                units = ds.attrs.get("units")
                desc = ds.attrs.get("description")
                assert isinstance(units, str) and isinstance(desc, str) and desc, f"{g}/{name}"
                assert units or desc.endswith(S.NO_UNIT), f"{g}/{name}: no units and no reason"
        assert tuple(f["agent/obs"].attrs["feature_names"]) == env.obs_features
        assert f["agent/done"].dtype == np.uint8 and f["agent/done"].attrs["units"] == "bool"
        assert f["metrics/iteration"].dtype == np.int32 and list(f["metrics/iteration"][...]) == [0, 1]
        assert f["metrics/wall_s"].attrs["units"] == "s" and f["metrics/rollout_s"].attrs["units"] == "s"


def _check_equal(reader: TrajectoryReader, group: str, df: pd.DataFrame, exact_types: bool) -> None:
    """Every exported column equals the reader's values (2-D columns feature by feature)."""
    want = reader.metrics() if group == "metrics" else reader.read(group)
    cols = flat_columns(reader, group)
    assert list(df.columns) == [c.name for c in cols]
    assert len(df) == reader.n_rows(group)
    for c in cols:
        w = want[c.source] if c.index is None else want[c.source][:, c.index]
        got = df[c.name].to_numpy()
        if w.dtype == object:  # strings; pandas reads an empty CSV field as NaN (docs/hdf5_schema.md, "Export")
            got = df[c.name].fillna("").to_numpy() if not exact_types else got
            assert [str(x) for x in got] == list(w), c.name
        elif exact_types:
            assert got.dtype == w.dtype, c.name
            np.testing.assert_array_equal(got, w, err_msg=c.name)
        else:  # CSV: float32 written with repr, so the value comes back exactly once cast back
            np.testing.assert_array_equal(got.astype(w.dtype), w, err_msg=c.name)


@pytest.mark.parametrize("which", ["trained", "sed_dump"])
def test_export_parquet_and_csv_equal_the_reader(which, request, tmp_path, capsys):
    src = request.getfixturevalue(which)
    dump = src / "trajectories.h5" if src.is_dir() else src
    chunk = 50  # several chunks per group: the export streams
    assert (
        main(["export", str(src), "--format", "parquet", "--out", str(tmp_path / "pq"), "--chunk-rows", str(chunk)])
        == 0
    )
    assert main(["export", str(src), "--format", "csv", "--out", str(tmp_path / "csv")]) == 0
    out = capsys.readouterr().out
    with TrajectoryReader(dump) as r:
        units = {g: r.units(g) for g in GROUPS}
        assert r.n_rows("agent") > chunk
        if which == "sed_dump":
            assert r.n_rows("programs") > 0 and r.n_rows("expert") > chunk
        for g in GROUPS:
            pq_path, csv_path = tmp_path / "pq" / f"{g}.parquet", tmp_path / "csv" / f"{g}.csv"
            assert f"wrote {pq_path}: {r.n_rows(g)} rows" in out
            df = pd.read_parquet(pq_path)
            _check_equal(r, g, df, exact_types=True)
            meta = pq.read_schema(pq_path)
            for c in flat_columns(r, g):
                field_meta = meta.field(c.name).metadata
                assert field_meta[b"units"].decode() == units[g][c.source], c.name
                assert field_meta[b"description"].decode(), c.name
            n = r.n_rows(g)
            assert pq.ParquetFile(pq_path).num_row_groups == max(1, math.ceil(n / chunk)) or n == 0
            df = pd.read_csv(csv_path)
            _check_equal(r, g, df, exact_types=False)
            side = json.loads(csv_path.with_suffix(UNITS_SUFFIX).read_text())
            assert side["reled_hpc.group"] == g and side["reled_hpc.schema_version"] == "3"
            assert {k: v["units"] for k, v in side["columns"].items()} == {
                c.name: units[g][c.source] for c in flat_columns(r, g)
            }
        assert units["agent"]["t"] == "s" and units["agent"]["x"] == "m" and units["metrics"]["wall_s"] == "s"
    if which == "trained":
        assert "obs.cand0.length" in pd.read_parquet(tmp_path / "pq" / "agent.parquet").columns
        assert "action_mask.cand3" in pd.read_csv(tmp_path / "csv" / "agent.csv").columns


def test_export_committed_rows_only_and_old_versions(sed_dump, tmp_path, capsys):
    """Rows of an unfinished iteration are left out (and said so); a version-2 file exports the same table."""
    from test_analysis import EXTRA, decision_rows

    from reled_hpc.io import TrajectoryWriter

    path = tmp_path / "run" / "trajectories.h5"
    path.parent.mkdir()
    shutil.copy(sed_dump, path)
    with TrajectoryWriter(path, config_yaml="", obs_dim=36, a_max=4, extra_metrics=EXTRA, resume=True) as w:
        w.append_rows("agent", decision_rows(w.last_iteration + 1, 50, 50))  # 2500 rows, never committed
    assert (
        main(["export", str(path.parent), "--format", "parquet", "--group", "agent", "--out", str(tmp_path / "a.pq")])
        == 0
    )
    err = capsys.readouterr().err
    assert "unfinished iteration" in err
    with TrajectoryReader(sed_dump) as r:
        want = r.n_rows("agent")
        new = pd.read_parquet(tmp_path / "a.pq")
    assert len(new) == want and set(new["iteration"]) == {0, 1, 2, 3}
    old = tmp_path / "old.h5"
    shutil.copy(sed_dump, old)
    downgrade(old, 2)
    for g in GROUPS:
        assert (
            main(["export", str(old), "--format", "parquet", "--group", g, "--out", str(tmp_path / f"old-{g}.pq")]) == 0
        )
        assert (
            main(["export", str(sed_dump), "--format", "parquet", "--group", g, "--out", str(tmp_path / f"new-{g}.pq")])
            == 0
        )
        a, b = pd.read_parquet(tmp_path / f"old-{g}.pq"), pd.read_parquet(tmp_path / f"new-{g}.pq")
        b = b.drop(columns=[c for c in b.columns if c.startswith("obs.")])  # old files: no feature names
        a = a.drop(columns=[c for c in a.columns if c.startswith("obs.")])
        pd.testing.assert_frame_equal(a, b)


def test_export_errors_are_clear(sed_dump, tmp_path, capsys):
    def run(*args: str) -> tuple[int, str]:
        rc = main(["export", *args])
        return rc, capsys.readouterr().err

    rc, err = run(str(tmp_path / "nope"), "--format", "csv")
    assert rc == 2 and f"{tmp_path / 'nope'}: no such run folder or dump file" in err
    (tmp_path / "empty").mkdir()
    rc, err = run(str(tmp_path / "empty"), "--format", "csv")
    assert rc == 2 and "a folder without trajectories.h5" in err
    with pytest.raises(SystemExit) as exc:
        main(["export", str(sed_dump), "--format", "xlsx"])
    assert exc.value.code == 2 and "invalid choice: 'xlsx'" in capsys.readouterr().err
    cut = tmp_path / "cut.h5"
    cut.write_bytes(sed_dump.read_bytes()[: sed_dump.stat().st_size // 2])
    rc, err = run(str(cut), "--format", "parquet")
    assert rc == 2 and f"{cut}: " in err and "cut short" in err and "Traceback" not in err
    # random bytes in the agent/ chunks: opening works, reading fails mid-stream; named, nothing left behind
    bad = corrupt(sed_dump, tmp_path / "bad" / "trajectories.h5", lambda name: name.startswith("agent/obs"))
    rc, err = run(str(bad), "--format", "csv", "--group", "agent", "--out", str(tmp_path / "bad.csv"))
    assert rc == 2 and f"{bad}: exporting agent/ failed" in err
    assert not (tmp_path / "bad.csv").exists() and not list(tmp_path.glob(".bad.csv.tmp*"))

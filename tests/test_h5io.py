"""HDF5 trajectory dump: round trip, commit/rollback semantics, bad input, lazy reading, SIGKILL safety."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

from reled_hpc.errors import DumpError
from reled_hpc.io import SCHEMA_VERSION, TrajectoryReader, TrajectoryWriter
from reled_hpc.io import schema as S
from reled_hpc.io.reader import Superblock

HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
from h5_crash_child import (  # noqa: E402
    A_MAX,
    OBS_DIM,
    expected_metrics,
    expected_programs,
    expected_rows,
    n_rows,
)

CONFIG = "env:\n  n_agents: 100\n  map: helsinki\nseed: 7\n"


def writer(path: Path, **kw) -> TrajectoryWriter:
    kw.setdefault("config_yaml", CONFIG)
    return TrajectoryWriter(path, obs_dim=OBS_DIM, a_max=A_MAX, **kw)


def write_iteration(w: TrajectoryWriter, it: int, groups=("agent", "expert"), commit: bool = True) -> None:
    for g in groups:
        w.append_rows(g, expected_rows(it, g))
    w.append_programs(expected_programs(it))
    if commit:
        w.end_iteration(expected_metrics(it))


def read_all(r: TrajectoryReader, group: str, iterations=None) -> dict[str, np.ndarray]:
    return r.read(group, iterations=iterations)


def check_content(r: TrajectoryReader, its: list[int]) -> None:
    """Every committed byte equals what the writer was given; nothing else is reported."""
    assert list(r.iterations()) == its
    for g in ("agent", "expert"):
        got = read_all(r, g)
        k = 0 if g == "agent" else 1
        assert r.n_rows(g) == sum(n_rows(i)[k] for i in its)
        for c in S.ROW_COLUMNS:
            want = np.concatenate([expected_rows(i, g)[c.name] for i in its]) if its else got[c.name][:0]
            assert got[c.name].dtype == c.dtype, c.name
            np.testing.assert_array_equal(got[c.name], want, err_msg=f"{g}/{c.name}")
    progs = r.programs()
    want_p = [p for i in its for p in expected_programs(i)]
    assert len(progs["text"]) == len(want_p) == r.n_rows("programs")
    for key in ("iteration", "subset", "round", "text", "executed", "error", "rvi", "prompt_tokens"):
        assert list(progs[key]) == [p[key] for p in want_p], key
    m = r.metrics()
    assert list(m["iteration"]) == its
    assert list(m["env_steps"]) == [expected_metrics(i)["env_steps"] for i in its]


# ---------------------------------------------------------------------------- round trip
def test_round_trip(tmp_path):
    path = tmp_path / "run.h5"
    with writer(path, extra_metrics=["kl"]) as w:
        assert w.last_iteration == -1
        for it in range(3):
            write_iteration(w, it)
        assert w.last_iteration == 2
    with TrajectoryReader(path) as r:
        check_content(r, [0, 1, 2])
        assert r.obs_dim == OBS_DIM and r.a_max == A_MAX
        assert r.attrs["schema_version"] == SCHEMA_VERSION and r.attrs["package_version"]
        assert r.attrs["created"].endswith("+00:00")
        assert r.config == {"env": {"n_agents": 100, "map": "helsinki"}, "seed": 7}
        m = r.metrics()
        assert set(m) == {*S.METRIC_COLUMNS, "kl"} and m["iteration"].dtype == np.int32
        assert all(v.dtype == np.float64 for k, v in m.items() if k != "iteration")
        assert np.isnan(m["llm_latency_s"]).all() and np.isnan(m["kl"]).all()  # not given: NaN
        assert not any(r.uncommitted_rows.values())
        # chunked iteration covers every row exactly once, in order
        n = r.n_rows("agent")
        seen = np.concatenate([c["t"] for c in r.iter_chunks("agent", columns=["t"], chunk_rows=1000)])
        assert len(seen) == n
        np.testing.assert_array_equal(seen, read_all(r, "agent")["t"])
        sizes = [len(c["iteration"]) for c in r.iter_chunks("agent", ["iteration"], chunk_rows=1000)]
        assert max(sizes) == 1000 and sum(sizes) == n
        # iterations filter
        only = read_all(r, "expert", iterations=[2, 0, 7])
        want = np.concatenate([expected_rows(i, "expert")["obs"] for i in (0, 2)])
        np.testing.assert_array_equal(only["obs"], want)
        assert set(only["iteration"]) == {0, 2}
        assert list(r.programs(iterations=[3])["text"]) == []  # not committed
        assert r.programs(iterations=[1])["subset"].tolist() == [0]


def test_empty_and_sparse_iterations(tmp_path):
    path = tmp_path / "run.h5"
    with writer(path) as w:
        w.end_iteration({"wall_s": 1.0})  # no rows at all: iteration 0
        write_iteration(w, 5, groups=("agent",))  # gaps are fine, only increasing matters
    with TrajectoryReader(path) as r:
        assert list(r.iterations()) == [0, 5]
        assert r.n_rows("expert") == 0 and list(r.iter_chunks("expert")) == []
        assert r.n_rows("agent") == n_rows(5)[0]


# ---------------------------------------------------------------------------- commit and resume
def test_resume_rolls_back_unfinished_iteration(tmp_path):
    path = tmp_path / "run.h5"
    with writer(path) as w:
        for it in range(2):
            write_iteration(w, it)
        # iteration 2 is appended but never committed; big enough that whole chunks reach the file
        w.append_rows("agent", {k: np.concatenate([v] * 3) for k, v in expected_rows(2, "agent").items()})
        w.append_programs(expected_programs(2))
    with pytest.warns(RuntimeWarning, match="unfinished iteration"), TrajectoryReader(path) as r:
        assert r.uncommitted_rows["agent"] > 0 and r.uncommitted_rows["programs"] == 2
        check_content(r, [0, 1])
    with writer(path, resume=True) as w:
        assert w.last_iteration == 1
        with h5py.File(path, "r", swmr=True) as f:
            assert f["agent/obs"].shape[0] == sum(n_rows(i)[0] for i in (0, 1))  # rolled back on disk
            assert f["programs/text"].shape[0] == 1
        for it in (2, 3):
            write_iteration(w, it)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing uncommitted any more
        with TrajectoryReader(path) as r:
            check_content(r, [0, 1, 2, 3])


def test_sized_but_unwritten_rows_are_uncommitted(tmp_path):
    """What a kill can leave: datasets extended on disk whose cells never arrived (fill values)."""
    path = tmp_path / "run.h5"
    with writer(path) as w:
        for it in range(2):
            write_iteration(w, it)
    with h5py.File(path, "r+") as f:
        for g in ("agent", "programs", "metrics"):
            for ds in f[g].values():
                ds.resize(ds.shape[0] + 5, axis=0)
    with pytest.warns(RuntimeWarning), TrajectoryReader(path) as r:
        assert r.uncommitted_rows == {"agent": 5, "expert": 0, "programs": 5, "metrics": 5}
        check_content(r, [0, 1])
    with writer(path, resume=True) as w:
        assert w.last_iteration == 1
        write_iteration(w, 2)
    with TrajectoryReader(path) as r:
        check_content(r, [0, 1, 2])


def test_refuses_duplicate_iteration(tmp_path):
    path = tmp_path / "run.h5"
    with writer(path) as w:
        write_iteration(w, 0)
        write_iteration(w, 1)
        with pytest.raises(DumpError, match=r"iteration 1 <= last committed iteration 1"):
            w.append_rows("agent", expected_rows(1, "agent"))
        with pytest.raises(DumpError, match=r"duplicate"):
            w.end_iteration({"iteration": 0})
        with pytest.raises(DumpError, match=r"duplicate"):
            w.append_programs([{**expected_programs(2)[0], "iteration": 1}])
        w.append_rows("agent", expected_rows(2, "agent"))
        with pytest.raises(DumpError, match=r"rows of iteration 2 are pending"):
            w.append_rows("expert", expected_rows(3, "expert"))
        with pytest.raises(DumpError, match=r"belong to iteration 2"):
            w.end_iteration({"iteration": 3})
        with pytest.raises(DumpError, match=r"unknown metrics \['speed'\]"):
            w.end_iteration({"speed": 1.0})
        assert w.end_iteration({}) == 2
    with writer(path, resume=True) as w, pytest.raises(DumpError, match="duplicate"):
        w.append_rows("expert", expected_rows(2, "expert"))


@pytest.mark.parametrize(
    "change, match",
    [
        ({"obs_dim": OBS_DIM + 1}, "obs_dim=36"),
        ({"a_max": A_MAX + 2}, "a_max=4"),
        ({"extra_metrics": ["kl"]}, "extra_metrics"),
    ],
)
def test_resume_schema_mismatch(tmp_path, change, match):
    path = tmp_path / "run.h5"
    with writer(path) as w:
        write_iteration(w, 0)
    kw = {"config_yaml": CONFIG, "obs_dim": OBS_DIM, "a_max": A_MAX, **change}
    with pytest.raises(DumpError, match=match) as exc:
        TrajectoryWriter(path, resume=True, **kw)
    assert str(path) in str(exc.value)


def test_resume_wrong_schema_version_and_missing_file(tmp_path):
    path = tmp_path / "run.h5"
    with writer(path) as w:
        write_iteration(w, 0)
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(DumpError, match=r"schema_version=99"):
        writer(path, resume=True)
    with pytest.raises(DumpError, match=r"schema_version 99"):
        TrajectoryReader(path)
    with pytest.raises(DumpError, match="does not exist"):
        writer(tmp_path / "nope.h5", resume=True)
    with pytest.raises(DumpError, match="exists; pass resume=True"):
        writer(path)


def _replace(grp: h5py.Group, name: str, data: np.ndarray, dtype: object, fill: object) -> None:
    """Recreate `grp/name` with another dtype, as an older writer made it (same chunks and filters)."""
    old = grp[name]
    kw = {"chunks": old.chunks, "compression": old.compression, "compression_opts": old.compression_opts}
    del grp[name]
    grp.create_dataset(name, data=data, maxshape=(None, *data.shape[1:]), dtype=dtype, fillvalue=fill, **kw)


def downgrade(path: Path, version: int) -> None:
    """Turn a version-3 dump into what a writer of schema `version` (1 or 2) left: booleans as h5py's
    HDF5 enum, metrics/iteration float64 with NaN fill, no programs/answer_bytes, no dataset attributes;
    version 1 also without programs/rank (folded into subset)."""
    with h5py.File(path, "r+") as f:
        for g in S.ALL_GROUPS:
            grp = f[g]
            for name in list(grp):
                for key in list(grp[name].attrs):
                    del grp[name].attrs[key]
                if grp[name].dtype == S.BOOL_STORAGE and g != "metrics":
                    _replace(grp, name, grp[name][...].astype(bool), np.bool_, False)
        its = f["metrics/iteration"][...]
        _replace(f["metrics"], "iteration", its.astype(np.float64), np.float64, np.nan)
        del f["programs/answer_bytes"]
        if version == 1:
            g = f["programs"]
            g["subset"][...] = g["subset"][...] + S.V1_RANK_STRIDE * g["rank"][...]
            del g["rank"]
        f.attrs["schema_version"] = version


def test_program_rank_round_trip_and_version_1_files_are_read(tmp_path):
    """programs/rank is stored as given; a schema-1 file (no rank column, subset + 1000 * rank) reads
    as subset and rank, and cannot be resumed by a schema-3 writer."""
    path = tmp_path / "run.h5"
    progs = [{**p, "rank": 3 * j, "subset": j % 2} for j, p in enumerate(expected_programs(3))]
    assert len(progs) == 3
    with writer(path) as w:
        w.append_programs(progs)
        w.end_iteration(expected_metrics(3))
    with TrajectoryReader(path) as r:
        got = r.programs()
        assert r.schema_version == SCHEMA_VERSION == 3
    assert list(got["rank"]) == [p["rank"] for p in progs] and got["rank"].dtype == np.int16
    assert list(got["subset"]) == [p["subset"] for p in progs]
    downgrade(path, 1)  # as a version-1 writer left it
    with TrajectoryReader(path) as r:
        old = r.programs()
        chunk = next(r.iter_chunks("programs", ["rank"]))
    assert list(old["rank"]) == [p["rank"] for p in progs] and list(old["subset"]) == [p["subset"] for p in progs]
    assert list(chunk) == ["rank"] and list(chunk["rank"]) == [p["rank"] for p in progs]
    with pytest.raises(DumpError, match=r"schema_version=1"):
        writer(path, resume=True)


# ---------------------------------------------------------------------------- self-describing files (v3)
FEATURES = tuple(f"feat{i}" for i in range(OBS_DIM))
EXTRA_INFO = {"kl": ("nat", "KL of the update")}


def is_enum(ds: h5py.Dataset) -> bool:
    """The stored HDF5 type is an enum (h5py shows its bool enum as numpy bool, hiding that)."""
    return isinstance(ds.id.get_type(), h5py.h5t.TypeEnumID)


def test_every_dataset_carries_units_and_plain_types(tmp_path):
    """h5py alone sees units/description on every dataset, feature names on obs and action_mask, booleans
    as uint8 0/1 (no HDF5 enum) and an integer metrics/iteration; the reader still returns numpy bool."""
    path = tmp_path / "run.h5"
    with writer(path, extra_metrics=["kl"], metric_info=EXTRA_INFO, obs_features=FEATURES) as w:
        for it in range(2):
            write_iteration(w, it)
    with h5py.File(path, "r") as f:
        for g in S.ALL_GROUPS:
            for name, ds in f[g].items():
                where = f"{g}/{name}"
                units, desc = ds.attrs[S.UNITS_ATTR], ds.attrs[S.DESCRIPTION_ATTR]
                assert isinstance(units, str) and isinstance(desc, str) and desc, where
                assert units or desc.endswith(S.NO_UNIT), f"{where}: no units and no reason"
                assert not is_enum(ds), f"{where}: HDF5 enum"
        for name in ("done", "action_mask"):
            ds = f[f"agent/{name}"]
            assert ds.dtype == np.uint8 and ds.attrs[S.UNITS_ATTR] == "bool" and set(np.unique(ds[...])) == {0, 1}
        assert f["programs/executed"].dtype == np.uint8
        assert f["metrics/iteration"].dtype == f["agent/iteration"].dtype == np.int32
        assert list(f["metrics/iteration"][...]) == [0, 1]
        units = {g: {n: ds.attrs[S.UNITS_ATTR] for n, ds in f[g].items()} for g in S.ALL_GROUPS}
        assert (units["agent"]["t"], units["agent"]["x"], units["agent"]["reward"]) == ("s", "m", "min")
        assert units["metrics"]["kl"] == "nat" and units["metrics"]["wall_s"] == "s"
        assert tuple(f["agent/obs"].attrs[S.FEATURES_ATTR]) == FEATURES
        assert tuple(f["expert/action_mask"].attrs[S.FEATURES_ATTR]) == ("cand0", "cand1", "cand2", "cand3")
    with TrajectoryReader(path) as r:
        check_content(r, [0, 1])  # bool columns come back as bool, equal to what was written
        assert r.feature_names("agent", "obs") == FEATURES
        assert r.units("metrics")["kl"] == "nat" and r.descriptions("programs")["answer_bytes"]


def test_writer_refuses_missing_units_and_wrong_feature_count(tmp_path):
    with pytest.raises(DumpError, match=r"no units for extra metrics \['kl'\]"):
        writer(tmp_path / "a.h5", extra_metrics=["kl", "x"], metric_info={"x": ("1", "x")})
    with pytest.raises(DumpError, match=r"35 obs_features for obs_dim 36"):
        writer(tmp_path / "b.h5", obs_features=FEATURES[:-1])
    assert not (tmp_path / "a.h5").exists() and not (tmp_path / "b.h5").exists()


def test_metric_units_table_covers_every_metric():
    """A metric added to EXTRA_METRICS (or the schema) without units fails here, and in the trainer's writer."""
    from reled_hpc.experiment.metrics import ALL_METRIC_INFO, EXTRA_METRIC_INFO, EXTRA_METRICS

    names = S.metric_columns(EXTRA_METRICS)
    assert set(ALL_METRIC_INFO) == set(names), "metrics without units, or units of no metric"
    for name in names:
        units, desc = ALL_METRIC_INFO[name]
        assert desc and (units or desc.endswith(S.NO_UNIT)), name
    for c in (*S.ROW_COLUMNS, *S.PROGRAM_COLUMNS):
        assert c.description and (c.units or c.description.endswith(S.NO_UNIT)), c.name
    # the trainer passes the table: a missing entry is refused when its writer is made
    with pytest.raises(DumpError, match="no units"):
        info = {k: v for k, v in EXTRA_METRIC_INFO.items() if k != "ranks"}
        TrajectoryWriter("/nonexistent/x.h5", config_yaml="", obs_dim=4, a_max=2, extra_metrics=EXTRA_METRICS,
                         metric_info=info)  # fmt: skip


def test_unsafe_program_strings_are_stored_safely(tmp_path):
    """A lone surrogate or NUL in a program's text/error (LLM output) is stored as U+FFFD, not an error."""
    from reled_hpc.text import is_safe, safe_text

    path = tmp_path / "run.h5"
    bad = {**expected_programs(1)[0], "text": "def plan(api):\n    return '\ud800'\x00tail", "error": "Bad\x00\udfff"}
    with writer(path) as w:
        w.append_programs([bad, {**bad, "answer_bytes": 12345}])
        w.end_iteration({})
    with TrajectoryReader(path) as r:
        got = r.programs()
    assert list(got["text"]) == [safe_text(bad["text"])] * 2 and list(got["error"]) == [safe_text(bad["error"])] * 2
    assert all(is_safe(t) for t in (*got["text"], *got["error"])) and "tail" in got["text"][0]
    assert "\ufffd" in got["text"][0] and got["text"][0].startswith("def plan(api):")
    assert list(got["answer_bytes"]) == [-1, 12345] and got["answer_bytes"].dtype == np.int64


@pytest.mark.parametrize("version", [1, 2])
def test_old_versions_read_with_version_3_types(tmp_path, version):
    """A file of schema 1 or 2 (HDF5 enum booleans, float64 metrics/iteration, no answer_bytes, no attributes)
    reads with the same values and types as the version-3 file it was made from, units from the schema."""
    path = tmp_path / "run.h5"
    with writer(path, extra_metrics=["kl"], metric_info=EXTRA_INFO) as w:
        for it in range(3):
            write_iteration(w, it)
    with TrajectoryReader(path) as r:
        new = {g: r.read(g) for g in ("agent", "expert", "programs")} | {"metrics": r.metrics()}
        new_units = {g: r.units(g) for g in S.ALL_GROUPS}
    downgrade(path, version)
    with h5py.File(path, "r") as f:
        assert is_enum(f["agent/done"]) and f["metrics/iteration"].dtype == np.float64
        assert "answer_bytes" not in f["programs"] and not f["agent/t"].attrs
    with TrajectoryReader(path) as r:
        assert r.schema_version == version
        check_content(r, [0, 1, 2])
        old = {g: r.read(g) for g in ("agent", "expert", "programs")} | {"metrics": r.metrics()}
        units = {g: r.units(g) for g in S.ALL_GROUPS}
        assert r.feature_names("agent", "obs") == S.default_feature_names(OBS_DIM)
        assert r.feature_names("agent", "action_mask") == S.candidate_names(A_MAX)
    for g, cols in new.items():
        assert list(old[g]) == list(cols), g
        for name, a in cols.items():
            assert old[g][name].dtype == a.dtype, f"{g}/{name}"
            np.testing.assert_array_equal(old[g][name], a, err_msg=f"{g}/{name}")
    assert (old["programs"]["answer_bytes"] == -1).all()
    # units: the schema's for every column it describes; an old file cannot say what an extra metric is in
    assert {g: u for g, u in units.items() if g != "metrics"} == {g: u for g, u in new_units.items() if g != "metrics"}
    assert units["metrics"]["wall_s"] == "s" and units["metrics"]["kl"] == ""


def test_uncommitted_row_of_a_version_2_file_is_ignored(tmp_path):
    """The version-2 commit marker (NaN in a float64 metrics/iteration) still counts: a sized, unwritten row
    is not read."""
    path = tmp_path / "run.h5"
    with writer(path) as w:
        for it in range(2):
            write_iteration(w, it)
    downgrade(path, 2)
    with h5py.File(path, "r+") as f:
        for ds in f["metrics"].values():
            ds.resize(3, axis=0)  # a third metrics row, iteration cell never written (NaN fill)
    with pytest.warns(RuntimeWarning, match="unfinished"), TrajectoryReader(path) as r:
        assert r.uncommitted_rows["metrics"] == 1 and list(r.metrics()["iteration"]) == [0, 1]
        check_content(r, [0, 1])


# ---------------------------------------------------------------------------- bad input
def test_bad_rows_name_the_column(tmp_path):
    with writer(tmp_path / "run.h5") as w:
        rows = expected_rows(0, "agent")
        with pytest.raises(DumpError, match=r"missing columns \['logp'\]"):
            w.append_rows("agent", {k: v for k, v in rows.items() if k != "logp"})
        with pytest.raises(DumpError, match=r"agent/obs: expected shape \(n, 36\), got \(\d+, 35\)"):
            w.append_rows("agent", {**rows, "obs": rows["obs"][:, :35]})
        with pytest.raises(DumpError, match=r"expert/action_mask: expected shape \(n, 4\)"):
            w.append_rows("expert", {**rows, "action_mask": rows["action_mask"][:, 0]})
        with pytest.raises(DumpError, match=r"agent/action: expected int16 \(integers\), got float64"):
            w.append_rows("agent", {**rows, "action": rows["action"] + 0.5})
        with pytest.raises(DumpError, match=r"agent/rank: values .* do not fit int16"):
            w.append_rows("agent", {**rows, "rank": rows["rank"].astype(np.int64) + 40000})
        with pytest.raises(DumpError, match=r"columns differ in length.*'reward'"):
            w.append_rows("agent", {**rows, "reward": rows["reward"][:-1]})
        with pytest.raises(DumpError, match=r"unknown columns \['speed'\]"):
            w.append_rows("agent", {**rows, "speed": rows["reward"]})
        with pytest.raises(DumpError, match=r"group must be one of"):
            w.append_rows("learner", rows)  # type: ignore[arg-type]
        with pytest.raises(DumpError, match=r"programs/ row 0: missing keys \['text'\]"):
            w.append_programs([{k: v for k, v in expected_programs(1)[0].items() if k != "text"}])
        # value-preserving casts are accepted (int64 ids, float64 rewards, 0/1 ints as bool)
        w.append_rows(
            "agent",
            {
                **rows,
                "agent_id": rows["agent_id"].astype(np.int64),
                "reward": rows["reward"].astype(np.float64),
                "done": rows["done"].astype(np.int8),
            },
        )


def test_bad_files_name_the_file(tmp_path):
    not_h5 = tmp_path / "notes.h5"
    not_h5.write_text("hello")
    with pytest.raises(DumpError, match=r"notes\.h5: not an HDF5 file"):
        TrajectoryReader(not_h5)
    with pytest.raises(DumpError, match=r"missing\.h5: no such file"):
        TrajectoryReader(tmp_path / "missing.h5")

    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = [1, 2]
    with pytest.raises(DumpError, match=r"other\.h5: file attribute 'schema_version' is missing"):
        TrajectoryReader(other)

    path = tmp_path / "run.h5"
    with writer(path) as w:
        for it in range(3):
            write_iteration(w, it)
    size = path.stat().st_size
    with h5py.File(path, "r+") as f:
        del f.attrs["obs_dim"]
    with pytest.raises(DumpError, match=r"run\.h5: file attribute 'obs_dim' is missing"):
        TrajectoryReader(path)
    with h5py.File(path, "r+") as f:
        f.attrs["obs_dim"] = OBS_DIM
        del f["expert"]
    with pytest.raises(DumpError, match=r"run\.h5: group 'expert/' is missing"):
        TrajectoryReader(path)

    truncated = tmp_path / "truncated.h5"
    with writer(truncated) as w:
        for it in range(3):
            write_iteration(w, it)
    with open(truncated, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(DumpError, match=r"truncated\.h5: .*truncated or damaged"):
        TrajectoryReader(truncated)


# ---------------------------------------------------------------------------- lazy reading
_RSS_SCRIPT = r"""
import sys
from reled_hpc.io import TrajectoryReader

def rss_kb():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))

with TrajectoryReader(sys.argv[1]) as r:
    n_rows = r.n_rows("agent")
    first = next(r.iter_chunks("agent", chunk_rows=65536))  # warm up: imports, caches, one chunk
    del first
    base = peak = rss_kb()
    total = 0
    for chunk in r.iter_chunks("agent", chunk_rows=65536):
        total += len(chunk["iteration"])
        peak = max(peak, rss_kb())
print(n_rows, total, base, peak)
"""


def test_lazy_reading_is_memory_bounded(tmp_path):
    path = tmp_path / "big.h5"
    n_it, per = 12, 100_000  # 1.2 M rows; 227 MB uncompressed
    rng = np.random.default_rng(0)
    obs = np.zeros((per, OBS_DIM), np.float32)
    obs[:, :4] = rng.random((per, 4), dtype=np.float32)  # like real obs: own features, padding zeros
    base_rows = expected_rows(0, "agent")
    k = len(base_rows["iteration"])
    template = {c: np.resize(v, (per, *v.shape[1:])) for c, v in base_rows.items() if c != "obs"}
    assert k > 0
    with writer(path) as w:
        for it in range(n_it):
            w.append_rows("agent", {**template, "iteration": np.full(per, it, np.int32), "obs": obs})
            w.end_iteration({"iteration": it})
    raw_bytes = n_it * per * sum(v.itemsize * int(np.prod(v.shape[1:])) for v in (*template.values(), obs))
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(path)], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    n_rows_, total, base_kb, peak_kb = map(int, out)
    assert n_rows_ == total == n_it * per
    growth = (peak_kb - base_kb) * 1024
    # one 64k-row slice of all columns is 12 MB (plus h5py's read buffers and chunk caches, ~40 MB
    # measured); loading the datasets whole would take the full 227 MB
    assert growth < raw_bytes / 4, (growth, raw_bytes)


# ---------------------------------------------------------------------------- SIGKILL safety
def _run_child_and_kill(path: Path, rnd: random.Random, resume: bool) -> list[int]:
    """Start the writer child, SIGKILL it at a random moment, return the iterations it reported committed."""
    args = [sys.executable, str(HELPERS / "h5_crash_child.py"), str(path), "1000"] + (["--resume"] if resume else [])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    started = threading.Event()
    target = rnd.randint(1, 4)  # commits to wait for

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.strip())
            if line.startswith("committed") and sum(x.startswith("committed") for x in lines) >= target:
                started.set()

    th = threading.Thread(target=pump, daemon=True)
    th.start()
    assert started.wait(60), f"child made no progress: {lines}"
    # then kill at a random moment inside the next iteration(s): mid-append, mid-commit or between
    time.sleep(rnd.uniform(0.0, 0.25))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    th.join()
    proc.stdout.close()  # type: ignore[union-attr]
    return [int(x.split()[1]) for x in lines if x.startswith("committed")]


def test_sigkill_leaves_every_committed_iteration(tmp_path):
    """A writer killed with SIGKILL at random moments (and resumed each time) loses no committed iteration."""
    path = tmp_path / "run.h5"
    rnd = random.Random(1234)
    committed: list[int] = []
    for kill in range(10):
        reported = _run_child_and_kill(path, rnd, resume=kill > 0)
        committed += reported
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            with TrajectoryReader(path) as r:
                its = [int(i) for i in r.iterations()]
                # every reported commit is there; at most one more (killed between commit and print)
                assert its[: len(committed)] == committed == list(range(len(committed)))
                assert len(its) <= len(committed) + 1
                check_content(r, its)
        committed = its
    assert len(committed) >= 10


def _set_superblock(path: Path, *, eoa: int, flags: int) -> None:
    """Rewrite the superblock's EOA and status flags (with a valid checksum), as a killed SWMR writer
    leaves them: flags 'open for SWMR write' and an EOA that lags behind its allocations."""
    with open(path, "r+b") as fh:
        sb = Superblock.parse(fh.read(64))
        assert sb is not None and sb.checksum_ok()
        fh.seek(0)
        fh.write(sb.rewritten(flags=flags, eoa=eoa))


def test_resume_after_swmr_kill_with_stale_eoa(tmp_path):
    """The CI failure of a kill test ("addr overflow ... eoa"): a SWMR writer's superblock EOA lags
    behind chunks its index already points to. Resume and reading must still see every committed row.
    Made deterministic here by setting the EOA below the last-written chunk of a finished file."""
    path = tmp_path / "run.h5"
    with writer(path) as w:
        for it in range(3):
            write_iteration(w, it)
    with h5py.File(path, "r") as f:
        ds = f["agent/iteration"]
        last_chunk = max(ds.id.get_chunk_info(i).byte_offset for i in range(ds.id.get_num_chunks()))
    size = path.stat().st_size
    _set_superblock(path, eoa=last_chunk, flags=0x05)  # write access + SWMR write
    with pytest.raises(OSError, match="open for write"):
        h5py.File(path, "r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing uncommitted, so no warning either
        with TrajectoryReader(path) as r:  # SWMR read ignores the stale EOA
            check_content(r, [0, 1, 2])
    with writer(path, resume=True) as w:  # clears the flags and raises the EOA, then rolls back
        assert w.last_iteration == 2
        write_iteration(w, 3)
    assert path.stat().st_size >= size
    with h5py.File(path, "r") as f:  # a plain open works again: flags cleared, EOA covers the file
        assert f["metrics/iteration"].shape == (4,)
    with TrajectoryReader(path) as r:
        check_content(r, [0, 1, 2, 3])

"""Sharded dumps without MPI: per-rank shard writers, the master of virtual datasets, rebuild and resume.

The MPI runs that write them are in tests/test_dist.py; here three shard writers in one process stand
in for three ranks, so every case (a lagging master, a rank's uncommitted rows, a missing shard) is
cheap to set up.
"""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from reled_hpc.errors import DumpError
from reled_hpc.io import TrajectoryReader, TrajectoryWriter
from reled_hpc.io import schema as S
from reled_hpc.io.master import SHARDED_GROUPS, MasterWriter, rebuild_master, shard_path, shard_paths

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from h5_crash_child import A_MAX, OBS_DIM, expected_metrics, expected_programs, expected_rows

R = 3


def rank_rows(it: int, rank: int, group: str) -> dict[str, np.ndarray]:
    """A rank's rows of an iteration: a different-sized slice per rank, marked with the rank."""
    rows = expected_rows(it, group)
    n = 40 + 17 * rank + 5 * it
    out = {k: v[:n].copy() for k, v in rows.items()}
    out["rank"][:] = rank
    return out


def open_shards(dump: Path, resume: bool = False, keep_through: int | None = None) -> list[TrajectoryWriter]:
    return [TrajectoryWriter(shard_path(dump, r), config_yaml="seed: 1\n", obs_dim=OBS_DIM, a_max=A_MAX,
                             commits=r == 0, resume=resume, keep_through=keep_through) for r in range(R)]  # fmt: skip


def run_iteration(ws: list[TrajectoryWriter], master: MasterWriter | None, it: int, commit: bool = True) -> None:
    counts: dict[str, list[int]] = {g: [] for g in SHARDED_GROUPS}
    for r, w in enumerate(ws):
        for g in S.ROW_GROUPS:
            w.append_rows(g, rank_rows(it, r, g))
        w.append_programs([dict(p, rank=r) for p in expected_programs(it)])
        if r:
            w.end_rows(it)
        for g, n in w.rows_after_commit().items():
            counts[g].append(n)
    if commit:
        ws[0].end_iteration(expected_metrics(it))
        if master is not None:
            master.write(counts, ws[0].n_committed)


def written(dump: Path, iterations: int, commit_last: bool = True) -> list[TrajectoryWriter]:
    ws = open_shards(dump)
    master = MasterWriter(dump, [shard_path(dump, r) for r in range(R)], ws[0].file)
    master.write({g: [0] * R for g in SHARDED_GROUPS}, 0)
    for it in range(iterations):
        run_iteration(ws, master, it, commit=commit_last or it < iterations - 1)
    return ws


def expected(its: list[int], group: str) -> dict[str, np.ndarray]:
    """What the master must hold: rank after rank, each rank's rows in iteration order."""
    parts = [rank_rows(it, r, group) for r in range(R) for it in its]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_master_reads_as_one_file_rank_after_rank(tmp_path):
    dump = tmp_path / "trajectories.h5"
    for w in written(dump, 3):
        w.close()
    assert [p.name for p in shard_paths(dump)] == [f"trajectories.rank0000{r}.h5" for r in range(R)]
    with h5py.File(dump, "r") as f:  # plain h5py, no reled-hpc code: the VDS resolves the shards
        assert f.attrs["schema_version"] == S.MASTER_VERSION and f["agent/obs"].is_virtual
        assert f["agent/obs"].attrs["units"] == "1" and f["metrics/iteration"].shape == (3,)
        assert np.array_equal(f["agent/obs"][:], expected([0, 1, 2], "agent")["obs"])
    with TrajectoryReader(dump) as r:
        assert r.schema_version == S.MASTER_VERSION and list(r.iterations()) == [0, 1, 2]
        for g in S.ROW_GROUPS:
            got, want = r.read(g), expected([0, 1, 2], g)
            for c in want:
                assert np.array_equal(got[c].astype(want[c].dtype), want[c]), (g, c)
        # one iteration: a slice in each rank's block, in rank order
        one = r.read("agent", columns=["iteration", "rank"], iterations=[1])
        assert set(one["iteration"]) == {1} and list(np.unique(one["rank"])) == [0, 1, 2]
        assert np.all(np.diff(one["rank"]) >= 0) and len(r.row_ranges("agent", [1])) == R
        progs = r.programs()
        assert len(progs["text"]) == R * sum(len(expected_programs(it)) for it in range(3))
        assert list(r.metrics()["mean_return"]) == [-0.0, -1.0, -2.0]


def test_uncommitted_rows_stay_out_and_rebuild_and_resume_drop_them(tmp_path):
    dump = tmp_path / "trajectories.h5"
    ws = written(dump, 3, commit_last=False)  # iteration 2: every shard has rows, rank 0 never committed
    for w in ws:
        w.close()
    with TrajectoryReader(dump) as r:
        assert list(r.iterations()) == [0, 1] and r.n_rows("agent") == len(expected([0, 1], "agent")["iteration"])
    dump.unlink()  # a master lost (or one behind): the shards hold all there is
    rebuild_master(dump)
    with TrajectoryReader(dump) as r:
        assert list(r.iterations()) == [0, 1]
        assert np.array_equal(r.read("expert")["obs"], expected([0, 1], "expert")["obs"])
    ws = open_shards(dump, resume=True, keep_through=1)
    # each shard was cut back to iterations 0 and 1 (rank_rows: 40 + 17 rank + 5 iteration rows)
    kept = [w.rows_after_commit()["agent"] for w in ws]
    assert kept == [sum(40 + 17 * r + 5 * it for it in (0, 1)) for r in range(R)]
    master = MasterWriter(dump, [shard_path(dump, r) for r in range(R)], ws[0].file)
    run_iteration(ws, master, 2)
    for w in ws:
        w.close()
    with TrajectoryReader(dump) as r:
        assert list(r.iterations()) == [0, 1, 2]
        got, want = r.read("agent"), expected([0, 1, 2], "agent")
        assert np.array_equal(got["obs"], want["obs"]) and np.array_equal(got["iteration"], want["iteration"])


def test_missing_shard_is_named_not_read_as_fill_values(tmp_path):
    dump = tmp_path / "trajectories.h5"
    for w in written(dump, 2):
        w.close()
    shard_path(dump, 1).rename(tmp_path / "elsewhere.h5")
    with pytest.raises(DumpError, match=r"shard files missing: .*trajectories\.rank00001\.h5"):
        TrajectoryReader(dump)
    with pytest.raises(DumpError, match=r"not ranks 0\.\.1 without gaps"):
        rebuild_master(dump)


def test_shard_writer_without_commits_refuses_what_belongs_to_rank_0(tmp_path):
    dump = tmp_path / "trajectories.h5"
    ws = written(dump, 1)
    with pytest.raises(DumpError, match="takes no metrics rows"):
        ws[1].end_iteration(expected_metrics(1))
    with pytest.raises(DumpError, match="duplicate"):
        ws[1].end_rows(0)
    with pytest.raises(DumpError, match="end_rows"):
        ws[0].end_rows(1)
    for w in ws:
        w.close()
    with pytest.raises(DumpError, match="needs keep_through"):
        TrajectoryWriter(shard_path(dump, 1), config_yaml="", obs_dim=OBS_DIM, a_max=A_MAX, commits=False, resume=True)
    with pytest.raises(DumpError, match="holds metrics rows"):
        TrajectoryWriter(shard_path(dump, 0), config_yaml="", obs_dim=OBS_DIM, a_max=A_MAX, commits=False,
                         resume=True, keep_through=0)  # fmt: skip

"""The master file of a sharded dump: one HDF5 file whose datasets are virtual views of per-rank shards.

With several MPI ranks each rank appends its own decisions and programs to its shard
(`trajectories.rank00003.h5`, a schema version 3 file written by `TrajectoryWriter`), and rank 0's
shard also holds the `metrics/` commit markers. Nothing of a rank's trajectories travels to rank 0.
After each commit rank 0 replaces the master (`trajectories.h5`, schema version 4) atomically: its
`agent/`, `expert/`, `programs/` and `metrics/` datasets are HDF5 virtual datasets (VDS) mapping
exactly the committed rows of every shard, rank after rank, so h5py, h5dump and `TrajectoryReader`
read one file as before. A master is a derived index: `rebuild_master` makes it again from the shards
(on resume, or by hand after a kill between a commit and the master's replacement).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import DumpError
from . import schema as S
from .reader import committed_metric_rows, open_h5, rows_through

_LIBVER = ("v110", "latest")
# groups whose rows every rank writes to its own shard (metrics/ lives in rank 0's shard only)
SHARDED_GROUPS: tuple[str, ...] = (*S.ROW_GROUPS, S.PROGRAMS_GROUP)


def shard_path(dump: str | Path, rank: int) -> Path:
    """Rank `rank`'s shard next to the master `dump`: trajectories.h5 -> trajectories.rank00003.h5."""
    p = Path(dump)
    return p.with_name(f"{p.stem}.rank{rank:05d}{p.suffix}")


def shard_paths(dump: str | Path) -> list[Path]:
    """The shards next to `dump` on disk, rank order (ranks 0..k-1 without gaps, else DumpError)."""
    p = Path(dump)
    found = sorted(p.parent.glob(f"{p.stem}.rank[0-9][0-9][0-9][0-9][0-9]{p.suffix}"))
    want = [shard_path(p, r) for r in range(len(found))]
    if found != want:
        missing = sorted(set(want) - set(found))
        raise DumpError(f"{p}: shard files are not ranks 0..{len(found) - 1} without gaps (missing {missing})")
    return found


@dataclass(frozen=True)
class _Dataset:
    group: str
    name: str
    dtype: np.dtype
    tail: tuple[int, ...]
    attrs: dict[str, Any]


class MasterWriter:
    """Writes the master of `shards` (paths, rank order) from rank 0's open shard `template`, whose
    file attributes, dataset types and dataset attributes the master copies once."""

    def __init__(self, path: str | Path, shards: Sequence[str | Path], template: h5py.File) -> None:
        self.path = Path(path)
        # relative names: HDF5 looks for a VDS source next to the master file, so a moved run folder reads
        self.names = [os.path.relpath(Path(s), self.path.parent) for s in shards]
        self.file_attrs = {k: template.attrs[k] for k in template.attrs}
        self.datasets = [
            _Dataset(g, name, ds.dtype, tuple(ds.shape[1:]), {k: ds.attrs[k] for k in ds.attrs})
            for g in S.ALL_GROUPS
            for name, ds in template[g].items()
        ]

    def write(self, rank_rows: Mapping[str, Sequence[int]], n_metrics: int) -> None:
        """Replace the master: `rank_rows[group][r]` committed rows of rank r's shard for each sharded group,
        `n_metrics` committed metrics rows in rank 0's shard. Atomic (a reader sees the old or the new file)."""
        for g in SHARDED_GROUPS:
            if len(rank_rows[g]) != len(self.names):
                raise DumpError(f"{self.path}: {len(rank_rows[g])} row counts for {g}/, {len(self.names)} shards")
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with h5py.File(tmp, "w", libver=_LIBVER) as f:
                f.attrs.update(self.file_attrs)
                f.attrs["schema_version"] = S.MASTER_VERSION
                f.attrs[S.SHARDS_ATTR] = np.array(self.names, dtype=S.VLEN_STR)
                for g in S.ALL_GROUPS:
                    grp = f.create_group(g)
                    if g in SHARDED_GROUPS:
                        grp.attrs[S.RANK_ROWS_ATTR] = np.asarray(rank_rows[g], np.int64)
                for d in self.datasets:
                    counts = [n_metrics] if d.group == S.METRICS_GROUP else list(rank_rows[d.group])
                    self._virtual(f[d.group], d, counts)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except (OSError, RuntimeError) as exc:  # h5py raises RuntimeError when a flush fails (disk full)
            tmp.unlink(missing_ok=True)
            raise DumpError(f"{self.path}: cannot write the master file of the shards ({exc}); every committed "
                            "iteration is in the shards, and --resume writes the master again") from exc  # fmt: skip

    def _virtual(self, grp: h5py.Group, d: _Dataset, counts: Sequence[int]) -> None:
        """`d` as rows [0, counts[r]) of shard r, r = 0, 1, ... (an empty plain dataset when there are none).
        Built with h5py's low-level API: its high-level VirtualSource deep-copies itself per mapping,
        40x slower at a few thousand mappings (1,024 ranks: 43k)."""
        total = int(sum(counts))
        if total == 0:
            ds = grp.create_dataset(d.name, shape=(0, *d.tail), dtype=d.dtype)
        else:
            space = h5py.h5s.create_simple((total, *d.tail))
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            zeros = (0,) * len(d.tail)
            src_name = f"{d.group}/{d.name}".encode()
            at = 0
            for name, n in zip(self.names, counts, strict=False):
                if n:
                    target = space.copy()
                    target.select_hyperslab((at, *zeros), (int(n), *d.tail))
                    dcpl.set_virtual(target, name.encode(), src_name, h5py.h5s.create_simple((int(n), *d.tail)))
                    at += n
            tid = h5py.h5t.py_create(d.dtype, logical=True)
            h5py.h5d.create(grp.id, d.name.encode(), tid, space, dcpl=dcpl)
            ds = grp[d.name]
        ds.attrs.update(d.attrs)


def rebuild_master(dump: str | Path) -> Path:
    """Write the master `dump` again from its shards on disk: the iterations committed in rank 0's shard,
    every shard's rows up to the last of them. Returns the master's path."""
    dump = Path(dump)
    shards = shard_paths(dump)
    if not shards:
        raise DumpError(f"{dump}: no shard files ({shard_path(dump, 0).name}, ...) to rebuild the master from")
    with open_h5(shards[0]) as f0:
        n_metrics = committed_metric_rows(f0[S.METRICS_GROUP])
        last = int(f0[S.METRICS_GROUP]["iteration"][n_metrics - 1]) if n_metrics else -1
        writer = MasterWriter(dump, shards, f0)
        rows: dict[str, list[int]] = {g: [] for g in SHARDED_GROUPS}
        for r, p in enumerate(shards):
            if r == 0:
                counts = rows_through(f0, last)
            else:
                with open_h5(p) as f:
                    counts = rows_through(f, last)
            for g in SHARDED_GROUPS:
                rows[g].append(counts[g])
        writer.write(rows, n_metrics)
    return dump

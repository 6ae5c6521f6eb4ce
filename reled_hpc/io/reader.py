"""TrajectoryReader: lazy, committed-only access to a run's HDF5 dump (docs/hdf5_schema.md).

Rows are stored in iteration order (in a sharded dump's master, schema version 4: rank after rank,
each rank's rows in iteration order), so the rows of any iteration are one contiguous slice per
block found by binary search on the `iteration` column; nothing is read beyond the slices asked for.
"""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np
import yaml

from ..errors import DumpError
from . import schema as S
from .heap import leading_heap_problems

# ---------------------------------------------------------------------------- file opening
_FLAGS_MSG = "already open for write"


_M32 = 0xFFFFFFFF


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M32


def _lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 hashlittle(), the checksum HDF5 puts on superblock v2/v3."""
    m = _M32
    n = len(data)
    a = b = c = (0xDEADBEEF + n + initval) & m
    i = 0
    while n - i > 12:
        a = (a + int.from_bytes(data[i : i + 4], "little")) & m
        b = (b + int.from_bytes(data[i + 4 : i + 8], "little")) & m
        c = (c + int.from_bytes(data[i + 8 : i + 12], "little")) & m
        # mix(a, b, c)
        for k in ((4, 6, 8), (16, 19, 4)):
            a = ((a - c) & m) ^ _rot(c, k[0])
            c = (c + b) & m
            b = ((b - a) & m) ^ _rot(a, k[1])
            a = (a + c) & m
            c = ((c - b) & m) ^ _rot(b, k[2])
            b = (b + a) & m
        i += 12
    if n == i:
        return c
    tail = data[i:] + bytes(12 - (n - i))
    a = (a + int.from_bytes(tail[0:4], "little")) & m
    b = (b + int.from_bytes(tail[4:8], "little")) & m
    c = (c + int.from_bytes(tail[8:12], "little")) & m
    # final(a, b, c)
    c = ((c ^ b) - _rot(b, 14)) & m
    a = ((a ^ c) - _rot(c, 11)) & m
    b = ((b ^ a) - _rot(a, 25)) & m
    c = ((c ^ b) - _rot(b, 16)) & m
    a = ((a ^ c) - _rot(c, 4)) & m
    b = ((b ^ a) - _rot(a, 14)) & m
    c = ((c ^ b) - _rot(b, 24)) & m
    return c


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class Superblock:
    """A v2/v3 HDF5 superblock: signature, version, sizes of offsets and lengths, status flags, base,
    extension, end-of-address (EOA) and root addresses, then a lookup3 checksum of all before it."""

    def __init__(self, block: bytes) -> None:
        """`block`: the file's first bytes (64 hold any v2/v3 superblock); see `parse`."""
        self.size_o = block[9]
        self.end = 12 + 4 * self.size_o  # where the checksum starts
        self.block = bytes(block[: self.end + 4])
        self.flags = block[11]
        self.base = self._addr(0)
        self.eoa = self._addr(2)  # relative to the base address

    @classmethod
    def parse(cls, head: bytes) -> Superblock | None:
        """The superblock at the start of `head`, None if it holds no (whole) v2/v3 one."""
        if len(head) < 12 or head[:8] != HDF5_SIGNATURE or head[8] not in (2, 3) or len(head) < 16 + 4 * head[9]:
            return None
        return cls(head)

    @property
    def expected_size(self) -> int:
        """The file size this superblock records: base address plus end of address."""
        return self.base + self.eoa

    def _addr(self, k: int) -> int:
        at = 12 + k * self.size_o
        return int.from_bytes(self.block[at : at + self.size_o], "little")

    def checksum_ok(self) -> bool:
        return _lookup3(self.block[: self.end]) == struct.unpack("<I", self.block[self.end :])[0]

    def rewritten(self, *, flags: int, eoa: int) -> bytes:
        """This superblock's bytes with the given status flags and EOA, and a matching checksum."""
        at = 12 + 2 * self.size_o
        body = b"".join(
            (self.block[:11], bytes([flags]), self.block[12:at], eoa.to_bytes(self.size_o, "little"),
             self.block[at + self.size_o : self.end])
        )  # fmt: skip
        return body + struct.pack("<I", _lookup3(body))


def clear_status_flags(path: str | Path) -> None:
    """Make a killed SWMR writer's file openable without SWMR, as `h5clear -s -i` does.

    Two things are fixed in the superblock: the 'open for (SWMR) write' flags are cleared, and the
    end-of-address (EOA) is raised to the file's size. A SWMR writer does not keep the superblock's
    EOA in step with its allocations (SWMR readers ignore it), so after a kill the index may point to
    chunks beyond the recorded EOA, which a non-SWMR open refuses ("addr overflow"), committed rows
    of a rewritten partial chunk included. A file shorter than its EOA is extended to it. Refuses any
    superblock whose checksum does not verify, so only an intact v2/v3 superblock at offset 0 is
    ever changed.
    """
    path = Path(path)
    with open(path, "r+b") as fh:
        sb = Superblock.parse(fh.read(64))
        if sb is None:
            raise DumpError(f"{path}: no version 2/3 HDF5 superblock at offset 0, cannot clear its write flags")
        if not sb.checksum_ok():
            raise DumpError(f"{path}: superblock checksum does not verify, refusing to clear its write flags")
        size = os.fstat(fh.fileno()).st_size
        eoa = max(sb.eoa, size - sb.base)
        fh.seek(0)
        fh.write(sb.rewritten(flags=0, eoa=eoa))
        if size < sb.base + eoa:
            fh.truncate(sb.base + eoa)


def open_h5(path: str | Path, mode: str = "r", libver: Any = None) -> h5py.File:
    """Open a dump, also one whose writer was killed (its superblock still says 'open for write').

    Reading such a file uses SWMR read mode, which accepts those flags; writing (resume) clears them.
    """
    path = Path(path)
    if not path.exists():
        raise DumpError(f"{path}: no such file")
    if not h5py.is_hdf5(path):
        raise DumpError(f"{path}: not an HDF5 file")
    try:
        try:
            return h5py.File(path, mode, libver=libver)
        except OSError as exc:
            if _FLAGS_MSG not in str(exc):
                raise
        if mode == "r":
            return h5py.File(path, "r", swmr=True)
        clear_status_flags(path)
        return h5py.File(path, mode, libver=libver)
    except OSError as exc:
        raise DumpError(f"{path}: cannot open HDF5 file ({exc}); is it truncated or damaged?") from exc


def written_iterations(it: np.ndarray) -> np.ndarray:
    """Which `metrics/iteration` cells were written: not the fill value (ITERATION_FILL in version 3,
    NaN in the float64 column of versions 1-2)."""
    return np.isfinite(it) if it.dtype.kind == "f" else it != S.ITERATION_FILL


def committed_metric_rows(metrics: h5py.Group) -> int:
    """Number of committed metrics rows: the leading rows whose `iteration` cell was written.

    The writer writes `metrics/iteration` last, after flushing everything else.
    """
    n = min(ds.shape[0] for ds in metrics.values())
    if n == 0:
        return 0
    it = metrics["iteration"][:n]  # one number per iteration: small
    bad = np.flatnonzero(~written_iterations(it))
    return int(bad[0]) if bad.size else n


def metrics_as_read(cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """metrics/ columns with the types of version 3 whatever the file's version: `iteration` int32
    (float64 before version 3, committed cells are whole numbers), every other column float64."""
    out = dict(cols)
    if "iteration" in out:
        out["iteration"] = out["iteration"].astype(S.METRIC_ITERATION_DTYPE)
    return out


def first_row_after(iteration: h5py.Dataset, value: int, n: int, lo: int = 0) -> int:
    """Index of the first of rows [lo, n) whose iteration > value (those rows are sorted by iteration)."""
    hi = n
    while lo < hi:
        mid = (lo + hi) // 2
        if int(iteration[mid]) > value:
            hi = mid
        else:
            lo = mid + 1
    return lo


def rows_through(f: h5py.File, last: int) -> dict[str, int]:
    """Rows of agent/, expert/ and programs/ of an open dump (or shard) whose iteration is <= `last`:
    each group's leading rows written in every column, cut after `last` (rows are in iteration order)."""
    out = {}
    for g in (*S.ROW_GROUPS, S.PROGRAMS_GROUP):
        n_min = min(ds.shape[0] for ds in f[g].values())
        out[g] = first_row_after(f[g]["iteration"], last, n_min)
    return out


# ---------------------------------------------------------------------------- reader
class TrajectoryReader:
    """Read a dump lazily; only iterations whose metrics row was committed are ever reported."""

    _unreadable = "unreadable ({}); is it truncated or damaged?"  # SalvageReader words it its own way

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._f = open_h5(self.path, "r")
        try:
            if self._f.attrs.get("schema_version") == S.MASTER_VERSION and not self._f.swmr_mode:
                # a sharded dump's master: its shards may be open for SWMR writing, which only a SWMR
                # reader of the virtual datasets may read (HDF5 opens the shards as the master was opened)
                self._f.close()
                self._f = h5py.File(self.path, "r", swmr=True)
            self._check_attribute_heap()
            self._validate()
        except BaseException:
            self._f.close()
            raise

    def _err(self, problem: str) -> DumpError:
        return DumpError(f"{self.path}: {problem}")

    def _check_attribute_heap(self) -> None:
        """Damage in place to the heap of the file attributes makes HDF5 loop forever on the first
        string attribute it reads (it has no checksum): refuse it by name first."""
        bad = leading_heap_problems(self.path)
        if bad:
            at, why = bad[0]
            raise self._err(self._unreadable.format(f"the global heap collection at byte {at:,} is damaged: {why}"))

    def _validate(self) -> None:
        try:
            self._check_layout()
            self._count_committed()
        except DumpError:
            raise
        except (OSError, KeyError, ValueError, TypeError, IndexError) as exc:
            raise self._err(self._unreadable.format(f"{type(exc).__name__}: {exc}")) from exc
        if any(self.uncommitted_rows.values()):
            left = {g: n for g, n in self.uncommitted_rows.items() if n}
            warnings.warn(
                f"{self.path}: ignoring rows of an unfinished iteration (no metrics row): {left}",
                RuntimeWarning,
                stacklevel=3,
            )

    def _check_layout(self) -> None:
        """File attributes, schema version, groups and datasets (sets the attribute-derived fields)."""
        f = self._f
        try:
            attrs = {k: f.attrs[k] for k in f.attrs}
        except (OSError, RuntimeError, KeyError) as exc:  # a damaged global heap holds the string attributes
            raise self._err(self._unreadable.format(f"file attributes: {type(exc).__name__}: {exc}")) from exc
        for key in S.FILE_ATTRS:
            if key not in attrs:
                raise self._err(f"file attribute {key!r} is missing; not a reled-hpc dump?")
        version = int(attrs["schema_version"])
        if version not in S.READABLE_VERSIONS:
            raise self._err(f"schema_version {version}, this reader reads {S.READABLE_VERSIONS}")
        self.schema_version = version
        self.obs_dim = int(attrs["obs_dim"])
        self.a_max = int(attrs["a_max"])
        self.extra_metrics = tuple(str(m) for m in attrs["extra_metrics"])
        for g in S.ALL_GROUPS:
            if g not in f or not isinstance(f[g], h5py.Group):
                raise self._err(f"group {g + '/'!r} is missing")
        self.shards = self._check_shards() if version == S.MASTER_VERSION else []
        want = {
            **{g: [c.name for c in S.ROW_COLUMNS] for g in S.ROW_GROUPS},
            S.METRICS_GROUP: list(S.metric_columns(self.extra_metrics)),
            S.PROGRAMS_GROUP: [c.name for c in S.program_columns(version)],
        }
        for g, names in want.items():
            missing = [n for n in names if n not in f[g]]
            if missing:
                raise self._err(f"group {g + '/'!r} lacks datasets {missing}")

    def _check_shards(self) -> list[Path]:
        """The shard files a master names, each present next to it (HDF5 would read a missing shard's
        rows as fill values, silently)."""
        names = [x.decode() if isinstance(x, bytes) else str(x) for x in self._f.attrs.get(S.SHARDS_ATTR, [])]
        if not names:
            raise self._err(f"schema version {S.MASTER_VERSION} master without a {S.SHARDS_ATTR!r} attribute")
        paths = [self.path.parent / n for n in names]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise self._err(f"shard files missing: {', '.join(missing)}; this master's rows live in its shards "
                            f"({len(paths)} files), keep them next to it")  # fmt: skip
        return paths

    def _count_committed(self) -> None:
        """Committed metrics rows and, per row group, the rows up to the last committed iteration."""
        f = self._f
        self._n_metrics = committed_metric_rows(f[S.METRICS_GROUP])
        its = f[S.METRICS_GROUP]["iteration"][: self._n_metrics]
        self._iterations = its.astype(np.int64)
        last = int(self._iterations[-1]) if self._n_metrics else -1
        self._n: dict[str, int] = {}
        self.uncommitted_rows: dict[str, int] = {}
        # row blocks sorted by iteration: the whole group, or in a master one block per rank's shard
        self._blocks: dict[str, list[tuple[int, int]]] = {}
        if self.schema_version == S.MASTER_VERSION:
            for g in (*S.ROW_GROUPS, S.PROGRAMS_GROUP):
                # the master maps committed rows only
                self._n[g] = min(ds.shape[0] for ds in f[g].values())
                counts = np.asarray(f[g].attrs.get(S.RANK_ROWS_ATTR, []), np.int64)
                if len(counts) != len(self.shards) or counts.sum() != self._n[g]:
                    raise self._err(f"{g}/ attribute {S.RANK_ROWS_ATTR!r} {counts.tolist()} does not match "
                                    f"{len(self.shards)} shards and {self._n[g]} rows")  # fmt: skip
                ends = np.cumsum(counts)
                self._blocks[g] = [(int(e - c), int(e)) for c, e in zip(counts, ends, strict=True) if c]
                self.uncommitted_rows[g] = 0
            self.uncommitted_rows[S.METRICS_GROUP] = 0
            return
        self._n = rows_through(f, last)
        for g, n in self._n.items():
            self._blocks[g] = [(0, n)] if n else []
            self.uncommitted_rows[g] = max(ds.shape[0] for ds in f[g].values()) - n
        self.uncommitted_rows[S.METRICS_GROUP] = f[S.METRICS_GROUP]["iteration"].shape[0] - self._n_metrics

    # ------------------------------------------------------------------ metadata
    @property
    def attrs(self) -> dict[str, Any]:
        """File attributes, strings decoded, arrays as lists."""
        out: dict[str, Any] = {}
        for k, v in self._f.attrs.items():
            if isinstance(v, bytes):
                v = v.decode()
            elif isinstance(v, np.ndarray):
                v = [x.decode() if isinstance(x, bytes) else x for x in v.tolist()]
            elif isinstance(v, np.generic):
                v = v.item()
            out[k] = v
        return out

    @property
    def config(self) -> dict[str, Any]:
        """The run's resolved configuration (the `config` attribute parsed as YAML)."""
        try:
            cfg = yaml.safe_load(self.attrs["config"])
        except yaml.YAMLError as exc:
            raise self._err(f"config attribute is not valid YAML: {exc}") from exc
        return cfg if cfg is not None else {}

    def iterations(self) -> np.ndarray:
        """The committed iteration numbers, ascending."""
        return self._iterations.copy()

    @property
    def last_iteration(self) -> int:
        return int(self._iterations[-1]) if self._iterations.size else -1

    def n_rows(self, group: str) -> int:
        """Committed rows of `agent`, `expert`, `programs` or `metrics`."""
        if group == S.METRICS_GROUP:
            return self._n_metrics
        self._check_group(group, (*S.ROW_GROUPS, S.PROGRAMS_GROUP))
        return self._n[group]

    def _check_group(self, group: str, allowed: Sequence[str]) -> None:
        if group not in allowed:
            raise self._err(f"group must be one of {tuple(allowed)}, got {group!r}")

    def columns(self, group: str) -> tuple[str, ...]:
        """The column names of `group`, as the reader returns them (for every schema version)."""
        if group == S.METRICS_GROUP:
            return S.metric_columns(self.extra_metrics)
        self._check_group(group, (*S.ROW_GROUPS, S.PROGRAMS_GROUP))
        return tuple(c.name for c in (S.PROGRAM_COLUMNS if group == S.PROGRAMS_GROUP else S.ROW_COLUMNS))

    def _column_attr(self, group: str, name: str, key: str) -> str | None:
        ds = self._f[group].get(name)
        if ds is None or key not in ds.attrs:
            return None
        v = ds.attrs[key]
        return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)

    def _schema_info(self, group: str, name: str) -> S.MetricInfo:
        """Units and description from the schema tables: files before version 3 have no attributes."""
        if group == S.METRICS_GROUP:
            return S.METRIC_INFO.get(name, S.MetricInfo("", f"not described in this file {S.NO_UNIT}"))
        col = (S.PROGRAM_COLUMN_BY_NAME if group == S.PROGRAMS_GROUP else S.ROW_COLUMN_BY_NAME)[name]
        return S.MetricInfo(col.units, col.description)

    def units(self, group: str) -> dict[str, str]:
        """{column: units} of `group` (the `units` attributes; the schema's units for older files)."""
        return {n: self._column_attr(group, n, S.UNITS_ATTR) or self._schema_info(group, n).units
                for n in self.columns(group)}  # fmt: skip

    def descriptions(self, group: str) -> dict[str, str]:
        """{column: description} of `group` (the `description` attributes, or the schema's)."""
        return {n: self._column_attr(group, n, S.DESCRIPTION_ATTR) or self._schema_info(group, n).description
                for n in self.columns(group)}  # fmt: skip

    def feature_names(self, group: str, column: str) -> tuple[str, ...]:
        """Names of the trailing entries of a 2-D column (`obs`, `action_mask`) of agent/ or expert/."""
        self._check_group(group, S.ROW_GROUPS)
        col = S.ROW_COLUMN_BY_NAME.get(column)
        if col is None or not col.trailing:
            raise self._err(f"{group}/{column} is not a 2-D column")
        ds = self._f[group][column]
        if S.FEATURES_ATTR in ds.attrs:
            return tuple(x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)
                         for x in ds.attrs[S.FEATURES_ATTR])  # fmt: skip
        width = col.shape(self.obs_dim, self.a_max)[0]
        return S.default_feature_names(width) if column == "obs" else S.candidate_names(width)

    # ------------------------------------------------------------------ data
    def metrics(self) -> dict[str, np.ndarray]:
        """metrics/ columns, committed iterations only: `iteration` int32, the others float64."""
        g = self._f[S.METRICS_GROUP]
        return metrics_as_read({name: g[name][: self._n_metrics] for name in S.metric_columns(self.extra_metrics)})

    def row_ranges(self, group: str, iterations: Iterable[int] | None = None) -> list[tuple[int, int]]:
        """[start, stop) row slices of `group` holding the committed `iterations` (None: all)."""
        n = self.n_rows(group)
        if iterations is None:
            return [(0, n)] if n else []
        want = sorted({int(i) for i in iterations} & {int(i) for i in self._iterations})
        it = self._f[group]["iteration"]
        ranges: list[tuple[int, int]] = []
        for b0, b1 in self._blocks[group]:
            for i in want:
                start, stop = first_row_after(it, i - 1, b1, b0), first_row_after(it, i, b1, b0)
                if stop <= start:
                    continue
                if ranges and ranges[-1][1] == start:
                    ranges[-1] = (ranges[-1][0], stop)
                else:
                    ranges.append((start, stop))
        return ranges

    def iter_chunks(
        self,
        group: str,
        columns: Sequence[str] | None = None,
        chunk_rows: int = 65536,
        iterations: Iterable[int] | None = None,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Yield {column: array} of at most `chunk_rows` committed rows at a time, in file order."""
        self._check_group(group, (*S.ROW_GROUPS, S.PROGRAMS_GROUP))
        names = [c.name for c in (S.PROGRAM_COLUMNS if group == S.PROGRAMS_GROUP else S.ROW_COLUMNS)]
        cols = list(names if columns is None else columns)
        unknown = [c for c in cols if c not in names]
        if unknown:
            raise self._err(f"{group}/ has no columns {unknown}")
        if chunk_rows < 1:
            raise self._err(f"chunk_rows must be >= 1, got {chunk_rows}")
        g = self._f[group]
        by_name = S.PROGRAM_COLUMN_BY_NAME if group == S.PROGRAMS_GROUP else S.ROW_COLUMN_BY_NAME
        v1_programs = group == S.PROGRAMS_GROUP and self.schema_version < 2
        # programs/ columns this file's version lacks are filled in: answer_bytes (-1: unknown), and
        # version 1's rank, split out of subset
        absent = {c for c in cols if c not in g} if group == S.PROGRAMS_GROUP else set()
        stored = [c for c in cols if c not in absent]
        if v1_programs and "rank" in cols and "subset" not in stored:
            stored.append("subset")
        for start, stop in self.row_ranges(group, iterations):
            for lo in range(start, stop, chunk_rows):
                hi = min(lo + chunk_rows, stop)
                chunk = {c: self._read(g[c], lo, hi, by_name[c]) for c in stored}
                if v1_programs and "subset" in chunk:
                    rank, chunk["subset"] = np.divmod(chunk["subset"], S.V1_RANK_STRIDE)
                    chunk["rank"] = rank.astype(np.int16)
                for c in absent - chunk.keys():
                    chunk[c] = np.full(hi - lo, by_name[c].fill, by_name[c].dtype)
                yield {c: chunk[c] for c in cols}

    @staticmethod
    def _read(ds: h5py.Dataset, lo: int, hi: int, col: S.Column) -> np.ndarray:
        """Rows [lo, hi) as the column's type: str objects for strings, bool for the uint8 flags of version 3."""
        if h5py.check_string_dtype(ds.dtype) is not None:
            return np.array(ds.asstr()[lo:hi], dtype=object)
        arr = ds[lo:hi]
        if arr.dtype == col.dtype:
            return arr
        return arr != 0 if col.dtype.kind == "b" else arr.astype(col.dtype)

    def read(
        self, group: str, columns: Sequence[str] | None = None, iterations: Iterable[int] | None = None
    ) -> dict[str, np.ndarray]:
        """Whole columns in memory (concatenated iter_chunks); mind the size of `obs` on big runs."""
        parts = list(self.iter_chunks(group, columns, chunk_rows=1 << 20, iterations=iterations))
        if not parts:
            cols = S.PROGRAM_COLUMNS if group == S.PROGRAMS_GROUP else S.ROW_COLUMNS
            names = columns or [c.name for c in cols]
            by_name = {c.name: c for c in cols}
            parts = [{c: np.empty((0, *by_name[c].shape(self.obs_dim, self.a_max)), by_name[c].dtype)
                      if by_name[c].dtype != S.VLEN_STR else np.empty(0, object) for c in names}]  # fmt: skip
        return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}

    def programs(self, iterations: Iterable[int] | None = None) -> dict[str, np.ndarray]:
        """programs/ columns of the committed iterations (text and error as str objects)."""
        return self.read(S.PROGRAMS_GROUP, iterations=iterations)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> TrajectoryReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

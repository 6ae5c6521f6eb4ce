"""TrajectoryWriter: appends decisions, programs and per-iteration metrics to one HDF5 file per run.

Commit protocol (why a SIGKILL at any moment leaves every finished iteration readable):
rows of iteration k are appended and flushed, then the metrics row of k is written in all
metric columns but `iteration` and flushed, and last `metrics/iteration` (fill value
schema.ITERATION_FILL; NaN in files before version 3) is written and flushed. A metrics row whose
`iteration` cell holds an iteration therefore proves that all of
the iteration's data reached the file; rows past the last such row are ignored by the reader and
removed on resume. See docs/hdf5_schema.md for the measurements behind the file settings.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import re
import resource
import shutil
import traceback
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from .. import __version__
from ..errors import DumpError
from ..text import safe_text
from . import schema as S
from .reader import committed_metric_rows, open_h5, rows_through

# False only to reproduce the plain-flush mode that SIGKILL corrupts (docs/hdf5_schema.md)
_SWMR = True
_LIBVER = ("v110", "latest")  # SWMR needs the 1.10 format; files stay readable by HDF5 >= 1.10
# room kept beyond a write's raw size for HDF5 metadata (B-tree nodes, object headers, the superblock)
_ROOM_MARGIN = 256 * 1024


def _coerce(where: str, value: Any, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """Return `value` as an array of `dtype` with trailing `shape`, or raise naming `where`.

    Only value-preserving casts are done: ints that fit, 0/1 into bool, ints or floats into floats.
    """
    arr = np.asarray(value)
    if arr.ndim != 1 + len(shape) or tuple(arr.shape[1:]) != shape:
        want = "(n" + "".join(f", {d}" for d in shape) + ")"
        raise DumpError(f"{where}: expected shape {want}, got {arr.shape}")
    if arr.dtype == dtype:
        return arr
    kind = arr.dtype.kind
    if dtype.kind == "b":
        if kind in "iu" and arr.size and not np.isin(arr, (0, 1)).all():
            raise DumpError(f"{where}: bool column holds values other than 0/1")
        if kind not in "biu":
            raise DumpError(f"{where}: expected bool, got {arr.dtype}")
    elif dtype.kind in "iu":
        if kind not in "biu":
            raise DumpError(f"{where}: expected {dtype} (integers), got {arr.dtype}")
        info = np.iinfo(dtype)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise DumpError(f"{where}: values {arr.min()}..{arr.max()} do not fit {dtype}")
    elif dtype.kind == "f" and kind not in "biuf":
        raise DumpError(f"{where}: expected {dtype} (numbers), got {arr.dtype}")
    return arr.astype(dtype)


def _errno_text(msg: str) -> str:
    """'No space left on device' (or whichever OS error) out of an HDF5 error message."""
    m = re.search(r"error message = '([^']*)'", msg)
    return m.group(1) if m else msg


class TrajectoryWriter:
    """Writes the run's HDF5 dump; one instance per run, on the learner rank only."""

    def __init__(
        self,
        path: str | Path,
        *,
        config_yaml: str,
        obs_dim: int,
        a_max: int,
        extra_metrics: Sequence[str] = (),
        metric_info: Mapping[str, tuple[str, str]] | None = None,
        obs_features: Sequence[str] | None = None,
        resume: bool = False,
        keep_through: int | None = None,
        commits: bool = True,
    ) -> None:
        """`metric_info`: (units, description) of each extra metric, stored as its dataset's attributes;
        when given it must cover every extra metric (None: their units are stored as unknown, "").
        `obs_features`: the obs_dim feature names (EnvConfig.obs_features), obs's `feature_names`.
        `keep_through` (with resume): also drop committed iterations after this one, e.g. those a
        run finished after its last checkpoint, which the resumed run will redo.
        `commits=False`: the shard of a rank > 0 in a sharded dump (reled_hpc.io.master): it holds no
        metrics rows, `end_rows()` makes an iteration's rows durable and rank 0's shard commits it;
        resuming one needs `keep_through` (rank 0's last committed iteration)."""
        self.path = Path(path)
        self._keep_through = keep_through
        self.commits = commits
        if resume and not commits and keep_through is None:
            raise DumpError(f"{self.path}: resuming a shard without commits needs keep_through")
        self.obs_dim = int(obs_dim)
        self.a_max = int(a_max)
        self.extra_metrics = tuple(safe_text(str(m)) for m in extra_metrics)
        if self.obs_dim < 1 or self.a_max < 1:
            raise DumpError(f"{self.path}: obs_dim and a_max must be >= 1, got {obs_dim}, {a_max}")
        clash = set(self.extra_metrics) & set(S.METRIC_COLUMNS)
        if clash or len(set(self.extra_metrics)) != len(self.extra_metrics):
            raise DumpError(f"{self.path}: extra_metrics repeat a metric column: {sorted(clash) or self.extra_metrics}")
        self.metric_names = S.metric_columns(self.extra_metrics)
        self._metric_info = self._resolve_metric_info(metric_info)
        self.obs_features = S.default_feature_names(self.obs_dim) if obs_features is None else tuple(obs_features)
        if len(self.obs_features) != self.obs_dim:
            raise DumpError(f"{self.path}: {len(self.obs_features)} obs_features for obs_dim {self.obs_dim}")
        self._pending: int | None = None  # iteration of rows appended since the last commit
        self._f: h5py.File | None = None
        if resume:
            self._f = self._open_resume()
        else:
            self._f = self._create(config_yaml)
        self._n = {g: self._f[g]["iteration"].shape[0] for g in (*S.ROW_GROUPS, S.PROGRAMS_GROUP)}
        self._n_metrics = self._f[S.METRICS_GROUP]["iteration"].shape[0]
        # rows appended but not yet written, per group (less than a chunk once written out)
        self._buf: dict[str, list[dict[str, np.ndarray]]] = {g: [] for g in S.ROW_GROUPS}
        self._buffered = dict.fromkeys(S.ROW_GROUPS, 0)
        self._chunk_rows = int(self._f[S.ROW_GROUPS[0]]["iteration"].chunks[0])
        self._last = self._read_last()
        if _SWMR:
            # SWMR keeps the on-disk file consistent at every write, not only after flush()
            try:
                self._f.swmr_mode = True
            except (RuntimeError, ValueError) as exc:
                self.close()
                raise DumpError(f"{self.path}: cannot start SWMR writing: {exc}") from exc

    # ------------------------------------------------------------------ file setup
    def _resolve_metric_info(self, info: Mapping[str, tuple[str, str]] | None) -> dict[str, S.MetricInfo]:
        """(units, description) of every metrics column: the schema's, then the caller's for the extras."""
        out = dict(S.METRIC_INFO)
        if info is None:
            unknown = S.MetricInfo("", f"not described by the writer's caller {S.NO_UNIT}")
            out.update(dict.fromkeys(self.extra_metrics, unknown))
            return out
        missing = [m for m in self.extra_metrics if m not in info]
        if missing:
            raise DumpError(f"{self.path}: metric_info gives no units for extra metrics {missing}")
        for m in self.extra_metrics:
            units, description = info[m]
            out[m] = S.MetricInfo(str(units), str(description))
        return out

    @staticmethod
    def _describe(ds: h5py.Dataset, units: str, description: str, features: Sequence[str] | None = None) -> None:
        ds.attrs[S.UNITS_ATTR] = safe_text(units)
        ds.attrs[S.DESCRIPTION_ATTR] = safe_text(description)
        if features is not None:
            ds.attrs[S.FEATURES_ATTR] = np.array([safe_text(x) for x in features], dtype=S.VLEN_STR)

    def _features(self, name: str) -> tuple[str, ...] | None:
        return {"obs": self.obs_features, "action_mask": S.candidate_names(self.a_max)}.get(name)

    def _create(self, config_yaml: str) -> h5py.File:
        if self.path.exists():
            raise DumpError(f"{self.path}: exists; pass resume=True to continue that run or remove it")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            f = h5py.File(self.path, "w", libver=_LIBVER if _SWMR else None)
        except OSError as exc:
            raise DumpError(f"{self.path}: cannot create HDF5 file: {exc}") from exc
        f.attrs["schema_version"] = S.SCHEMA_VERSION
        f.attrs["config"] = safe_text(config_yaml)
        f.attrs["created"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        f.attrs["package_version"] = __version__
        f.attrs["obs_dim"] = self.obs_dim
        f.attrs["a_max"] = self.a_max
        f.attrs["extra_metrics"] = np.array(self.extra_metrics, dtype=S.VLEN_STR)
        comp = {"compression": S.COMPRESSION, "compression_opts": S.COMPRESSION_OPTS, "shuffle": S.SHUFFLE}
        for g in S.ROW_GROUPS:
            grp = f.create_group(g)
            for c in S.ROW_COLUMNS:
                tail = c.shape(self.obs_dim, self.a_max)
                ds = grp.create_dataset(
                    c.name,
                    shape=(0, *tail),
                    maxshape=(None, *tail),
                    dtype=c.storage,
                    chunks=(S.CHUNK_ROWS, *tail),
                    fillvalue=c.fill,
                    **comp,
                )
                self._describe(ds, c.units, c.description, self._features(c.name))
        grp = f.create_group(S.METRICS_GROUP)
        for name in self.metric_names:
            # iteration: an integer whose fill (never a real iteration) marks a row whose commit never
            # reached the disk; the other metrics: NaN fill, as for a metric that does not apply
            is_it = name == "iteration"
            ds = grp.create_dataset(
                name,
                shape=(0,),
                maxshape=(None,),
                dtype=S.METRIC_ITERATION_DTYPE if is_it else np.float64,
                chunks=(S.SMALL_CHUNK_ROWS,),
                fillvalue=S.ITERATION_FILL if is_it else np.nan,
            )
            self._describe(ds, *self._metric_info[name])
        grp = f.create_group(S.PROGRAMS_GROUP)
        for c in S.PROGRAM_COLUMNS:
            if c.dtype == S.VLEN_STR:
                # one row per chunk: a rollback then drops whole chunks, so no chunk keeps heap ids of
                # strings a killed writer never finished storing (HDF5 frees old strings on overwrite)
                extra: dict[str, Any] = {"chunks": (1,)}
            else:
                extra = {"chunks": (S.SMALL_CHUNK_ROWS,), "fillvalue": c.fill, **comp}
            ds = grp.create_dataset(c.name, shape=(0,), maxshape=(None,), dtype=c.storage, **extra)
            self._describe(ds, c.units, c.description)
        f.flush()
        return f

    def _open_resume(self) -> h5py.File:
        if not self.path.exists():
            raise DumpError(f"{self.path}: cannot resume, the file does not exist")
        f = open_h5(self.path, "r+", libver=_LIBVER if _SWMR else None)
        try:
            self._check_resume(f)
            self._rollback(f)
        except OSError as exc:
            f.close()
            raise DumpError(f"{self.path}: cannot resume, reading its committed rows failed ({exc})") from exc
        except BaseException:
            f.close()
            raise
        return f

    def _check_resume(self, f: h5py.File) -> None:
        for key in S.FILE_ATTRS:
            if key not in f.attrs:
                raise DumpError(f"{self.path}: cannot resume, file attribute {key!r} is missing")
        for g in S.ALL_GROUPS:
            if g not in f:
                raise DumpError(f"{self.path}: cannot resume, group {g!r} is missing")
        found = {
            "schema_version": int(f.attrs["schema_version"]),
            "obs_dim": int(f.attrs["obs_dim"]),
            "a_max": int(f.attrs["a_max"]),
            "extra_metrics": tuple(str(m) for m in f.attrs["extra_metrics"]),
        }
        want = {
            "schema_version": S.SCHEMA_VERSION,
            "obs_dim": self.obs_dim,
            "a_max": self.a_max,
            "extra_metrics": self.extra_metrics,
        }
        for key, value in want.items():
            if found[key] != value:
                raise DumpError(f"{self.path}: cannot resume, file has {key}={found[key]!r}, this run has {value!r}")

    def _rollback(self, f: h5py.File) -> None:
        """Resize away everything of an iteration whose metrics row was not committed (and of
        committed iterations after `keep_through`)."""
        metrics = f[S.METRICS_GROUP]
        n_m = committed_metric_rows(metrics)
        if not self.commits and n_m:
            raise DumpError(f"{self.path}: cannot resume as a shard without commits, it holds metrics rows")
        if self._keep_through is not None and n_m:
            # metrics rows are in increasing iteration order: keep those <= keep_through
            n_m = int(np.searchsorted(metrics["iteration"][:n_m], self._keep_through, side="right"))
        for ds in metrics.values():
            ds.resize(n_m, axis=0)
        last = int(metrics["iteration"][n_m - 1]) if n_m else -1
        if not self.commits:
            assert self._keep_through is not None
            last = self._keep_through  # rank 0's shard committed these
        for g, keep in rows_through(f, last).items():
            for ds in f[g].values():
                if ds.shape[0] != keep:
                    ds.resize(keep, axis=0)
        f.flush()

    # ------------------------------------------------------------------ state
    def _read_last(self) -> int:
        if not self.commits:  # the last iteration whose rows it holds (rank 0's shard committed it)
            return -1 if self._keep_through is None else self._keep_through
        n = self._n_metrics
        return int(self._file()[S.METRICS_GROUP]["iteration"][n - 1]) if n else -1

    @property
    def file(self) -> h5py.File:
        """The open HDF5 file (read its attributes and datasets; write through this class only)."""
        return self._file()

    @property
    def n_committed(self) -> int:
        """Committed metrics rows."""
        return self._n_metrics

    @property
    def last_iteration(self) -> int:
        """The last committed iteration (its metrics row is on disk), -1 if none."""
        return self._last

    def _file(self) -> h5py.File:
        if self._f is None:
            raise DumpError(f"{self.path}: writer is closed (or stopped after a failed write)")
        return self._f

    def _claim_iteration(self, values: np.ndarray, where: str) -> None:
        """All rows between two commits belong to one iteration, newer than the last committed one."""
        if values.size == 0:
            return
        lo, hi = int(values.min()), int(values.max())
        if lo != hi:
            raise DumpError(f"{where}: rows of several iterations ({lo}..{hi}) before one end_iteration()")
        if lo >= S.ITERATION_FILL:
            raise DumpError(f"{where}: iteration {lo} is reserved (fill value)")
        if self._pending is None:
            last = self.last_iteration
            if lo <= last:
                raise DumpError(f"{where}: iteration {lo} <= last committed iteration {last} (duplicate)")
            self._pending = lo
        elif lo != self._pending:
            raise DumpError(f"{where}: iteration {lo}, but rows of iteration {self._pending} are pending")

    @staticmethod
    def _append(grp: h5py.Group, n0: int, cols: Mapping[str, np.ndarray], n: int) -> None:
        for name, arr in cols.items():
            ds = grp[name]
            ds.resize(n0 + n, axis=0)
            ds[n0 : n0 + n] = arr
            # write the chunk now: a write the chunk cache defers fails later, where HDF5 only prints the
            # error (dataset dealloc) and the next write may crash the process
            ds.flush()

    # ------------------------------------------------------------------ API
    def append_rows(self, group: S.RowGroup, rows: Mapping[str, np.ndarray]) -> None:
        """Append decision rows to `agent/` or `expert/`; every column is required, all of one length."""
        self._file()
        if group not in S.ROW_GROUPS:
            raise DumpError(f"{self.path}: group must be one of {S.ROW_GROUPS}, got {group!r}")
        missing = [c.name for c in S.ROW_COLUMNS if c.name not in rows]
        unknown = sorted(set(rows) - set(S.ROW_COLUMN_BY_NAME))
        if missing or unknown:
            raise DumpError(f"{group}/: missing columns {missing}, unknown columns {unknown}")
        cols: dict[str, np.ndarray] = {}
        for c in S.ROW_COLUMNS:
            arr = _coerce(f"{group}/{c.name}", rows[c.name], c.dtype, c.shape(self.obs_dim, self.a_max))
            cols[c.name] = arr.view(c.storage) if c.storage != c.dtype else arr  # bool -> uint8 0/1, no copy
        lengths = {name: len(a) for name, a in cols.items()}
        n = lengths["iteration"]
        if len(set(lengths.values())) != 1:
            odd = {k: v for k, v in lengths.items() if v != n}
            raise DumpError(f"{group}/: columns differ in length: iteration has {n} rows, {odd}")
        if n == 0:
            return
        self._claim_iteration(cols["iteration"], f"{group}/iteration")
        self._buf[group].append(cols)
        self._buffered[group] += n
        with self._failing_write():
            self._write_rows(group, final=False)

    def _write_rows(self, group: str, final: bool) -> None:
        """Write buffered rows up to the last whole chunk (all of them when `final`).

        Why buffer: under SWMR the file never reuses the space of a rewritten chunk, so each partial
        chunk written and later rewritten is lost space; this way a chunk is rewritten at most once
        per iteration boundary inside it, however many append_rows() calls fill it.
        """
        n0, k = self._n[group], self._buffered[group]
        n = k if final else (n0 + k) // self._chunk_rows * self._chunk_rows - n0
        if n <= 0:
            return
        parts = self._buf[group]
        self._check_room(sum(a.nbytes for p in parts for a in p.values()))
        cols = {
            name: np.concatenate([p[name] for p in parts]) if len(parts) > 1 else parts[0][name] for name in parts[0]
        }
        self._append(self._file()[group], n0, {name: a[:n] for name, a in cols.items()}, n)
        self._n[group] += n
        self._buffered[group] = k - n
        self._buf[group] = [{name: a[n:] for name, a in cols.items()}] if k > n else []

    def append_programs(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append LLM programs; `iteration` defaults to the pending one, optional keys to PROGRAM_DEFAULTS."""
        f = self._file()
        if not rows:
            return
        default_it = self._pending if self._pending is not None else self.last_iteration + 1
        required = [c.name for c in S.PROGRAM_COLUMNS if c.name != "iteration" and c.name not in S.PROGRAM_DEFAULTS]
        values: dict[str, list[Any]] = {c.name: [] for c in S.PROGRAM_COLUMNS}
        for i, row in enumerate(rows):
            missing = [k for k in required if k not in row]
            unknown = sorted(set(row) - set(S.PROGRAM_COLUMN_BY_NAME))
            if missing or unknown:
                raise DumpError(f"programs/ row {i}: missing keys {missing}, unknown keys {unknown}")
            for c in S.PROGRAM_COLUMNS:
                v = row.get(c.name, default_it if c.name == "iteration" else S.PROGRAM_DEFAULTS.get(c.name))
                if c.dtype == S.VLEN_STR:
                    if not isinstance(v, str):
                        raise DumpError(f"programs/{c.name} row {i}: expected str, got {type(v).__name__}")
                    v = safe_text(v)  # lone surrogates would raise UnicodeEncodeError, NUL cut the string
                values[c.name].append(v)
        cols: dict[str, np.ndarray] = {}
        for c in S.PROGRAM_COLUMNS:
            if c.dtype == S.VLEN_STR:
                cols[c.name] = np.array(values[c.name], dtype=S.VLEN_STR)
            else:
                try:
                    raw = np.asarray(values[c.name])
                except (TypeError, ValueError) as exc:
                    raise DumpError(f"programs/{c.name}: {exc}") from exc
                arr = _coerce(f"programs/{c.name}", raw, c.dtype, ())
                cols[c.name] = arr.view(c.storage) if c.storage != c.dtype else arr
        self._claim_iteration(cols["iteration"], "programs/iteration")
        n = len(rows)
        self._check_room(sum(a.nbytes if a.dtype != S.VLEN_STR else sum(map(len, a)) * 4 for a in cols.values()))
        with self._failing_write():
            self._append(f[S.PROGRAMS_GROUP], self._n[S.PROGRAMS_GROUP], cols, n)
        self._n[S.PROGRAMS_GROUP] += n

    def rows_after_commit(self) -> dict[str, int]:
        """Rows of agent/, expert/ and programs/ once the pending iteration is on disk (buffered rows counted)."""
        return {g: self._n[g] + self._buffered.get(g, 0) for g in (*S.ROW_GROUPS, S.PROGRAMS_GROUP)}

    def end_rows(self, iteration: int) -> None:
        """A shard without commits (`commits=False`): write and flush the rows of `iteration` (there may be
        none); rank 0's shard then commits the iteration."""
        f = self._file()
        if self.commits:
            raise DumpError(f"{self.path}: end_rows() is for shards without commits; use end_iteration()")
        if self._pending is not None and self._pending != iteration:
            raise DumpError(f"{self.path}: end_rows({iteration}), but rows of iteration {self._pending} are pending")
        if iteration <= self._last:
            raise DumpError(f"{self.path}: end_rows({iteration}) <= last iteration {self._last} (duplicate)")
        with self._failing_write():
            for g in S.ROW_GROUPS:
                self._write_rows(g, final=True)
            f.flush()
            self._fsync()
        self._last = iteration
        self._pending = None

    def end_iteration(self, metrics: Mapping[str, float]) -> int:
        """Commit the pending iteration: write its metrics row (the commit marker) and flush.

        `metrics["iteration"]` may be left out (the pending iteration, else last_iteration + 1);
        metrics left out are stored as NaN. Returns the committed iteration.
        """
        f = self._file()
        if not self.commits:
            raise DumpError(f"{self.path}: a shard without commits takes no metrics rows; use end_rows()")
        unknown = sorted(set(metrics) - set(self.metric_names))
        if unknown:
            raise DumpError(f"metrics/: unknown metrics {unknown}; register extras via extra_metrics")
        row: dict[str, float] = {}
        for name in self.metric_names:
            try:
                row[name] = float(metrics.get(name, math.nan))
            except (TypeError, ValueError) as exc:
                raise DumpError(f"metrics/{name}: not a number: {metrics[name]!r}") from exc
        it_given = metrics.get("iteration")
        if it_given is None:
            it = self._pending if self._pending is not None else self.last_iteration + 1
        else:
            if not math.isfinite(row["iteration"]) or row["iteration"] != int(row["iteration"]):
                raise DumpError(f"metrics/iteration: expected a whole number, got {it_given!r}")
            it = int(row["iteration"])
            if self._pending is not None and it != self._pending:
                raise DumpError(f"metrics/iteration: {it}, but the rows appended belong to iteration {self._pending}")
        if it >= S.ITERATION_FILL:
            raise DumpError(f"metrics/iteration: {it} is reserved (fill value)")
        if it <= self.last_iteration:
            raise DumpError(f"metrics/iteration: {it} <= last committed iteration {self.last_iteration} (duplicate)")
        row["iteration"] = float(it)
        grp = f[S.METRICS_GROUP]
        n0 = self._n_metrics
        with self._failing_write():
            for g in S.ROW_GROUPS:
                self._write_rows(g, final=True)
            f.flush()  # 1) the iteration's rows
            self._fsync()
            self._append(grp, n0, {k: np.array([v]) for k, v in row.items() if k != "iteration"}, 1)
            f.flush()  # 2) the metrics row
            self._append(grp, n0, {"iteration": np.array([it], S.METRIC_ITERATION_DTYPE)}, 1)
            f.flush()  # 3) the commit marker
            self._fsync()
        self._n_metrics += 1
        self._last = it
        self._pending = None
        return it

    def _check_room(self, raw_bytes: int) -> None:
        """Refuse a write that may not fit (free disk space, RLIMIT_FSIZE) before HDF5 starts it: HDF5 cannot
        be closed cleanly after a failed write (its dirty cache crashes the process at exit), whereas a
        write never started leaves the file whole. `raw_bytes` is uncompressed, so the test is conservative."""
        need = raw_bytes + _ROOM_MARGIN
        try:
            free = shutil.disk_usage(self.path.parent).free
            size = self.path.stat().st_size
        except OSError:
            return  # cannot tell: the write itself will say
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if free >= need and (limit == resource.RLIM_INFINITY or size + need <= limit):
            return
        self.close()
        room = f"{free} bytes free" if free < need else f"file size limit {limit} bytes, file {size} bytes"
        raise DumpError(f"{self.path}: no room for the next write ({room}, need about {need} bytes); {self._kept()}, "
                        "resume once there is space")  # fmt: skip

    @contextlib.contextmanager
    def _failing_write(self) -> Iterator[None]:
        """Stop at the first failed write (disk full, quota, file size limit): writing on after a failed
        resize or flush can crash inside HDF5, so the file is closed at once (iterations committed before
        stay readable) and every later call raises DumpError."""
        try:
            yield
        except (OSError, RuntimeError) as exc:  # h5py raises RuntimeError when a flush fails
            why = str(exc).split(" (file write failed")[0] + (
                f": {_errno_text(str(exc))}" if "errno" in str(exc) else ""
            )
            # the traceback's frames hold dataset handles: freeing them after the file is closed crashes
            # HDF5, so drop them first
            traceback.clear_frames(exc.__traceback__)
            del exc
            self._abandon()
            try:
                free = f"{shutil.disk_usage(self.path.parent).free} bytes free"
            except OSError:
                free = "free space unknown"
            raise DumpError(f"{self.path}: writing failed ({free}; {self._kept()}): {why}") from None

    def _kept(self) -> str:
        """What survives a failed write, in the words of an error message."""
        if self.commits:
            return f"iterations up to {self._last} are committed and readable"
        return f"this shard's rows up to iteration {self._last} are on disk (rank 0's shard commits iterations)"

    def _abandon(self) -> None:
        f, self._f = self._f, None
        if f is None:
            return
        try:
            f.close()
        except Exception:  # the close flushes too and may fail the same way; the file is left as it is
            pass

    def _fsync(self) -> None:
        """Also survive a node crash (flush() only reaches the OS page cache, enough for a killed process)."""
        try:
            os.fsync(self._file().id.get_vfd_handle())
        except (OSError, ValueError, TypeError):
            pass  # a driver without a file descriptor: flush() alone still covers killed processes

    def close(self) -> None:
        """Close the file. Rows of an iteration without end_iteration() are dropped (never committed)."""
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> TrajectoryWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

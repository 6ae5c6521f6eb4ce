"""Lazy access to HDF5 dumps, run discovery under a sweep folder, grouping of runs, references.

An intact dump is read through `reled_hpc.io.TrajectoryReader`. One shorter than its superblock says
(cut short) or that the reader finds damaged is read by `SalvageDump` through `PaddedFile`, and only
rows whose chunks lie wholly inside the file are used: HDF5 reads the missing bytes as zeros, which for
uncompressed data (`metrics/`) would otherwise come back as iterations full of 0.
Nothing here loads a whole `agent/` or `expert/` column: rows are streamed with `iter_chunks`.
"""

from __future__ import annotations

import io
import json
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import h5py
import numpy as np
import yaml

from reled_hpc.errors import DumpError, ReledError
from reled_hpc.io import TrajectoryReader
from reled_hpc.io import schema as S
from reled_hpc.io.reader import Superblock, first_row_after

DUMP_NAME = "trajectories.h5"
REFERENCES_NAME = "references.json"
CHUNK_ROWS = 65536  # rows per read: 64k rows of the narrow columns analysis reads are a few MB


# ---------------------------------------------------------------------------- lazy dump access
class Dump(Protocol):
    """What analysis reads of a dump: the reader's API, restricted to what is readable."""

    path: Path
    config: dict[str, Any]
    a_max: int
    problems: list[str]

    def metrics(self) -> dict[str, np.ndarray]: ...
    def iterations(self) -> np.ndarray: ...
    def n_rows(self, group: str) -> int: ...
    def iter_chunks(
        self,
        group: str,
        columns: Sequence[str] | None = None,
        chunk_rows: int = CHUNK_ROWS,
        iterations: Iterable[int] | None = None,
    ) -> Iterator[dict[str, np.ndarray]]: ...
    def close(self) -> None: ...
    def __enter__(self) -> Dump: ...
    def __exit__(self, *exc: object) -> None: ...


def _parse_config(path: Path, text: Any, problems: list[str]) -> dict[str, Any]:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    try:
        cfg = yaml.safe_load(str(text))
    except yaml.YAMLError as exc:
        problems.append(f"{path}: config attribute is not valid YAML ({exc}); config fields shown as '?'")
        return {}
    return cfg if isinstance(cfg, dict) else {}


class _Closing:
    def __enter__(self) -> Any:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()  # type: ignore[attr-defined]


class ReaderDump(_Closing):
    """An intact dump, through TrajectoryReader; read errors later on (a damaged chunk) become DumpError."""

    def __init__(self, reader: TrajectoryReader) -> None:
        self._r = reader
        self.path = reader.path
        self.a_max = reader.a_max
        self.problems: list[str] = []
        self.config = _parse_config(self.path, reader.attrs.get("config", ""), self.problems)
        left = {g: n for g, n in reader.uncommitted_rows.items() if n}
        if left:
            self.problems.append(
                f"{self.path}: ignoring rows of an unfinished iteration (no metrics row: the writer stopped "
                f"mid-iteration): {left}"
            )

    def metrics(self) -> dict[str, np.ndarray]:
        try:
            return self._r.metrics()
        except (OSError, RuntimeError) as exc:
            raise DumpError(f"{self.path}: metrics/ unreadable ({exc}); is the file damaged?") from exc

    def iterations(self) -> np.ndarray:
        return self._r.iterations()

    def n_rows(self, group: str) -> int:
        return self._r.n_rows(group)

    def iter_chunks(
        self,
        group: str,
        columns: Sequence[str] | None = None,
        chunk_rows: int = CHUNK_ROWS,
        iterations: Iterable[int] | None = None,
    ) -> Iterator[dict[str, np.ndarray]]:
        done = 0
        try:
            for chunk in self._r.iter_chunks(group, columns, chunk_rows, iterations):
                yield chunk
                done += len(next(iter(chunk.values()))) if chunk else 0
        except (OSError, RuntimeError, ValueError) as exc:
            raise DumpError(
                f"{self.path}: {group}/ unreadable after {done} rows ({exc}); is the file damaged?"
            ) from exc

    def close(self) -> None:
        self._r.close()


def _readable_rows(ds: h5py.Dataset, eof: int) -> int:
    """Leading rows of `ds` whose chunks lie wholly inside the first `eof` bytes of the file.

    The chunk index itself may be cut: chunks listed before the index became unreadable still count.
    """
    n = int(ds.shape[0])
    if n == 0:
        return 0
    try:
        if ds.chunks is None:
            off = ds.id.get_offset()
            return n if off is not None and off + ds.id.get_storage_size() <= eof else 0
    except (OSError, RuntimeError, ValueError):
        return 0
    inside: set[int] = set()
    outside = [n]

    def visit(info: Any) -> None:
        start = int(info.chunk_offset[0])
        if info.byte_offset is None or info.byte_offset + info.size > eof:
            outside.append(start)
        else:
            inside.add(start)

    try:
        if hasattr(ds.id, "chunk_iter"):  # one pass over the chunk index (HDF5 >= 1.12.3)
            ds.id.chunk_iter(visit)
        else:
            for i in range(ds.id.get_num_chunks()):
                visit(ds.id.get_chunk_info(i))
    except (OSError, RuntimeError, ValueError, KeyError):  # the index is cut: keep the run of listed chunks
        k, step = 0, int(ds.chunks[0])
        while k < n and k in inside:
            k += step
        outside.append(k)
    return min(min(outside), n)


def superblock_eoa(head: bytes) -> int | None:
    """End of address recorded in a v2/v3 superblock (the file's expected size), None if not one."""
    sb = Superblock.parse(head)
    return None if sb is None else sb.base + sb.eoa


class PaddedFile(io.RawIOBase):
    """A read-only view of a cut file as long as its superblock says it should be, zeros past the end.

    HDF5 refuses a file shorter than its recorded end of address ("truncated file"). Its SWMR read
    mode skips that check but retries every failed metadata read ~100 times with sleeps, so reading
    anything past the cut hangs for minutes; through this view a plain read-only open sees the
    missing bytes as zeros and fails at once (checksums, filters). A killed writer's "open for
    write" superblock flags are shown cleared, as h5clear would, without touching the file.
    """

    def __init__(self, path: Path) -> None:
        self._fh = open(path, "rb")  # noqa: SIM115 - closed by close()
        self.size = os.fstat(self._fh.fileno()).st_size
        self._pos = 0
        self._head = b""
        sb = Superblock.parse(self._fh.read(64))
        self.virtual_size = max(self.size, sb.base + sb.eoa if sb else 0)
        if sb is not None and sb.flags:
            self._head = sb.rewritten(flags=0, eoa=sb.eoa)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.virtual_size}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        n = max(0, min(len(view), self.virtual_size - self._pos))
        self._fh.seek(self._pos)
        got = self._fh.readinto(view[:n]) or 0
        view[got:n] = bytes(n - got)  # past the cut: zeros
        if self._head and self._pos < len(self._head):
            k = min(n, len(self._head) - self._pos)
            view[:k] = self._head[self._pos : self._pos + k]
        self._pos += n
        return n

    def close(self) -> None:
        self._fh.close()
        super().close()


class SalvageDump(_Closing):
    """A dump TrajectoryReader refuses (truncated, damaged): the committed iterations that are readable.

    The reader's commit rule is kept (leading finite `metrics/iteration` cells), applied to the part
    of every metrics column that lies inside the file; rows are cut to whole iterations.
    """

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.problems: list[str] = []
        self._raw = PaddedFile(path)
        try:
            self._f = h5py.File(self._raw, "r")
        except OSError as exc:
            self._raw.close()
            raise DumpError(f"{path}: cannot open the file even to recover its readable part ({exc})") from exc
        try:
            self._scan(self._raw.size, reason)
        except (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
            self.close()
            raise DumpError(f"{path}: cannot recover anything readable ({type(exc).__name__}: {exc})") from exc
        except BaseException:
            self.close()
            raise

    def _scan(self, eof: int, reason: str) -> None:
        f, path = self._f, self.path
        missing = [k for k in S.FILE_ATTRS if k not in f.attrs]
        if missing:
            raise DumpError(f"{path}: file attributes {missing} are missing; not a reled-hpc dump?")
        version = int(f.attrs["schema_version"])
        if version != S.SCHEMA_VERSION:
            raise DumpError(f"{path}: schema_version {version}, this analysis reads {S.SCHEMA_VERSION}")
        self.config = _parse_config(path, f.attrs["config"], self.problems)
        self.a_max = int(f.attrs["a_max"])
        extra = tuple(x.decode() if isinstance(x, bytes) else str(x) for x in f.attrs["extra_metrics"])
        for g in S.ALL_GROUPS:
            if g not in f:
                raise DumpError(f"{path}: group {g + '/'!r} is missing")
        mg = f[S.METRICS_GROUP]
        names = [n for n in S.metric_columns(extra) if n in mg]
        if "iteration" not in names:
            raise DumpError(f"{path}: metrics/iteration is missing")
        written = int(mg["iteration"].shape[0])
        cols: dict[str, np.ndarray] = {}
        for n in names:
            k = _readable_rows(mg[n], eof)
            try:
                cols[n] = mg[n][:k]
            except (OSError, RuntimeError):
                cols[n] = np.empty(0)
        k = min(len(a) for a in cols.values())
        it = cols["iteration"][:k]
        ok = np.isfinite(it)
        ok[1:] &= np.diff(it) > 0  # iterations strictly increase; anything else is not data
        bad = np.flatnonzero(~ok)
        n_commit = int(bad[0]) if bad.size else k
        self._metrics = {n: a[:n_commit] for n, a in cols.items()}
        self._iterations = it[:n_commit].astype(np.int64)
        last = int(self._iterations[-1]) if n_commit else -1
        self._n: dict[str, int] = {}
        notes = []
        for g in (*S.ROW_GROUPS, S.PROGRAMS_GROUP):
            grp = f[g]
            numeric = [grp[c] for c in grp if h5py.check_string_dtype(grp[c].dtype) is None]
            n_total = min(int(ds.shape[0]) for ds in grp.values())
            readable = min([_readable_rows(ds, eof) for ds in numeric] + [n_total])
            n = first_row_after(grp["iteration"], last, readable)
            if readable < n_total and n == readable and n > 0:
                # the readable prefix ends inside committed rows: its last iteration may be partial
                n = first_row_after(grp["iteration"], int(grp["iteration"][n - 1]) - 1, n)
            self._n[g] = n
            if readable < n_total:
                upto = f"iterations <= {int(grp['iteration'][n - 1])}" if n else "none"
                notes.append(f"{g}/ keeps {n} of {n_total} rows ({upto})")
        lost = f"; rows past the damage are left out: {', '.join(notes)}" if notes else ""
        sep = " " if reason.endswith(("?", ".")) else ". "
        self.problems.append(
            f"{path}: {reason}{sep}Analysed the readable part: {n_commit} committed iterations "
            f"(of {written} metrics rows written){lost}"
        )

    def metrics(self) -> dict[str, np.ndarray]:
        return {n: a.copy() for n, a in self._metrics.items()}

    def iterations(self) -> np.ndarray:
        return self._iterations.copy()

    def n_rows(self, group: str) -> int:
        return len(self._iterations) if group == S.METRICS_GROUP else self._n[group]

    def iter_chunks(
        self,
        group: str,
        columns: Sequence[str] | None = None,
        chunk_rows: int = CHUNK_ROWS,
        iterations: Iterable[int] | None = None,
    ) -> Iterator[dict[str, np.ndarray]]:
        if group not in self._n:
            raise DumpError(f"{self.path}: group must be one of {tuple(self._n)}, got {group!r}")
        grp = self._f[group]
        cols = list(columns) if columns is not None else list(grp)
        unknown = [c for c in cols if c not in grp]
        if unknown:
            raise DumpError(f"{self.path}: {group}/ has no columns {unknown}")
        n = self._n[group]
        if iterations is None:
            ranges = [(0, n)] if n else []
        else:
            it = grp["iteration"]
            want = sorted({int(i) for i in iterations} & {int(i) for i in self._iterations})
            ranges = [(first_row_after(it, i - 1, n), first_row_after(it, i, n)) for i in want]
        for start, stop in ranges:
            for lo in range(start, stop, chunk_rows):
                hi = min(lo + chunk_rows, stop)
                try:
                    yield {c: _read(grp[c], lo, hi) for c in cols}
                except (OSError, RuntimeError) as exc:
                    raise DumpError(f"{self.path}: {group}/ rows {lo}..{hi} unreadable ({exc})") from exc

    def close(self) -> None:
        if getattr(self, "_f", None) is not None:
            self._f.close()  # before the file object under it: HDF5 still talks to it while closing
            self._f = None
        self._raw.close()


def _read(ds: h5py.Dataset, lo: int, hi: int) -> np.ndarray:
    if h5py.check_string_dtype(ds.dtype) is not None:
        return np.array(ds.asstr()[lo:hi], dtype=object)
    return ds[lo:hi]


def resolve_dump_path(path: str | Path) -> Path:
    """A dump file, or a run folder holding `trajectories.h5`."""
    p = Path(path)
    if p.is_dir():
        if (p / DUMP_NAME).is_file():
            return p / DUMP_NAME
        raise DumpError(f"{p}: a folder without {DUMP_NAME}; give the dump file or a run folder")
    return p


def _short_file(p: Path) -> str | None:
    """Why `p` is shorter than its superblock says, or None. Such a file goes straight to SalvageDump:
    the reader may open it in SWMR mode (a killed writer's flags), where every metadata read past the
    end is retried ~100 times with sleeps."""
    try:
        with open(p, "rb") as fh:
            eoa = superblock_eoa(fh.read(64))
            size = os.fstat(fh.fileno()).st_size
    except OSError:
        return None
    if eoa is None or size >= eoa:
        return None
    return f"the file is {size:,} bytes, its superblock records {eoa:,} (cut short, or its writer was killed)"


def open_dump(path: str | Path) -> Dump:
    """Open a dump lazily; a truncated or damaged one is opened for its readable part (see `problems`)."""
    p = resolve_dump_path(path)
    short = _short_file(p) if p.is_file() else None
    if short:
        return SalvageDump(p, reason=short)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # uncommitted rows: reported via problems
            reader = TrajectoryReader(p)
    except DumpError as exc:
        # only damage is worth recovering from; a missing file, another format or schema is not
        if not p.is_file() or not h5py.is_hdf5(p) or "truncated or damaged" not in str(exc):
            raise
        try:
            return SalvageDump(p, reason=str(exc).removeprefix(f"{p}: "))
        except DumpError as salvage_exc:
            raise DumpError(f"{exc}; {str(salvage_exc).removeprefix(f'{p}: ')}") from exc
    try:
        return ReaderDump(reader)
    except BaseException:
        reader.close()
        raise


# ---------------------------------------------------------------------------- one run in memory
def cfg_get(cfg: dict[str, Any], dotted: str, default: Any = None) -> Any:
    """cfg["a"]["b"] for "a.b", `default` where a level is missing."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def last_finite(values: np.ndarray | None) -> float:
    if values is None:
        return math.nan
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    return float(v[-1]) if v.size else math.nan


@dataclass
class RunData:
    """A run's config, per-iteration metrics and row counts: small, no rows (those stay in the file)."""

    path: Path
    config: dict[str, Any]
    metrics: dict[str, np.ndarray]
    rows: dict[str, int]
    a_max: int
    problems: list[str] = field(default_factory=list)

    def cfg(self, dotted: str, default: Any = None) -> Any:
        return cfg_get(self.config, dotted, default)

    @property
    def algorithm(self) -> str:
        return str(self.cfg("algorithm", "?"))

    @property
    def seed(self) -> Any:
        return self.cfg("seed", "?")

    @property
    def ranks(self) -> int:
        """MPI ranks of the run (the `ranks` metric; 1 when the dump does not record it)."""
        r = last_finite(self.metrics.get("ranks"))
        return int(r) if math.isfinite(r) and r >= 1 else 1

    @property
    def total_agents(self) -> int | None:
        """dist.total_agents when > 0, else env.n_agents per rank times the ranks."""
        total = self.cfg("dist.total_agents", 0)
        if isinstance(total, int) and total > 0:
            return total
        n = self.cfg("env.n_agents")
        return n * self.ranks if isinstance(n, int) else None

    @property
    def iterations(self) -> np.ndarray:
        return self.metrics["iteration"].astype(np.int64)

    @property
    def n_iterations(self) -> int:
        return len(self.metrics["iteration"])

    def metric(self, name: str) -> np.ndarray:
        """A metrics column; all-NaN when the dump does not have it."""
        if name in self.metrics:
            return np.asarray(self.metrics[name], np.float64)
        return np.full(self.n_iterations, np.nan)

    def final(self, name: str, window: int = 5) -> float:
        """Mean of a metric over the last `window` committed iterations (NaNs left out)."""
        v = self.metric(name)[-window:]
        v = v[np.isfinite(v)]
        return float(v.mean()) if v.size else math.nan

    @property
    def has_sed(self) -> bool:
        """SED/HPO data: LLM programs, or any finite alpha, DTW, RVI, PDI or execution rate."""
        keys = ("alpha_mean", "dtw_mean", "rvi_max", "pdi_max", "execution_rate")
        return self.rows.get("programs", 0) > 0 or any(np.isfinite(self.metric(k)).any() for k in keys)


def run_data(dump: Dump) -> RunData:
    """The small part of an open dump: config, metrics, row counts, problems."""
    return RunData(
        path=dump.path,
        config=dump.config,
        metrics=dump.metrics(),
        rows={g: dump.n_rows(g) for g in (*S.ROW_GROUPS, S.PROGRAMS_GROUP)},
        a_max=dump.a_max,
        problems=list(dump.problems),
    )


def load_run(path: str | Path) -> RunData:
    """Read a run's config, metrics and row counts, then close the file."""
    with open_dump(path) as d:
        return run_data(d)


def find_runs(sweep_dir: str | Path) -> list[Path]:
    """Every trajectories.h5 under `sweep_dir`, recursively, in path order."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise ReledError(f"{root}: not a folder (expected a sweep folder holding run folders)")
    found = sorted(p for p in root.rglob(DUMP_NAME) if p.is_file())
    if not found:
        raise ReledError(f"{root}: no {DUMP_NAME} found under it")
    return found


def load_runs(paths: Iterable[str | Path]) -> tuple[list[RunData], list[str]]:
    """(runs that could be read, one message per file that could not); a bad file never stops the rest."""
    runs, bad = [], []
    for p in paths:
        try:
            runs.append(load_run(p))
        except DumpError as exc:
            bad.append(str(exc))
    return runs, bad


# ---------------------------------------------------------------------------- grouping
# Keys that do not change the experiment: seeds (what a group averages over) and bookkeeping.
NON_EXPERIMENT_KEYS = frozenset(
    {
        "seed",
        "env.seed",
        "name",
        "runs_dir",
        "tensorboard",
        "checkpoint_every",
        "keep_checkpoints",
        "torch_threads",
        "llm.endpoint",
        "llm.wait_s",
        "llm.timeout_s",
    }
)
# Agent counts enter the key as the derived total and rank count, not as written in the config.
AGENT_KEYS = frozenset({"env.n_agents", "dist.total_agents"})
LABEL_ORDER = ("agents", "ranks", "env.traffic", "env.map", "hpo.expert", "sed.feedback")


def flat_config(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "."))
        else:
            out[key] = tuple(v) if isinstance(v, list) else v
    return out


def unused_keys(cfg: dict[str, Any]) -> tuple[str, ...]:
    """Config keys (or "section." prefixes) the run's algorithm never reads (reled_hpc/train.py):
    a difference there does not make another experiment, nor belongs in a label."""
    algo, expert = cfg.get("algorithm"), cfg_get(cfg, "hpo.expert")
    expert_keys = ("hpo.expert", "hpo.kappa", "hpo.dtw_radius", "hpo.oracle_policy")  # not hpo.scenario_period
    unused: list[str] = ["ppo."] if algo == "qmix" else ["qmix."]
    if algo != "reled":
        unused += [*expert_keys, "sed.", "llm."]
    elif expert != "llm":
        unused += ["sed.", "llm."] + (["hpo.kappa", "hpo.dtw_radius", "hpo.oracle_policy"] if expert == "none" else [])
    else:
        unused.append("hpo.oracle_policy")
    return tuple(unused)


def experiment_key(run: RunData, ignore: Iterable[str] = ()) -> dict[str, Any]:
    """The run's config minus seeds, bookkeeping and keys its algorithm does not read, with the total
    agent count and ranks."""
    skip = NON_EXPERIMENT_KEYS | AGENT_KEYS | set(ignore)
    unused = unused_keys(run.config)
    key = {
        k: v
        for k, v in flat_config(run.config).items()
        if k not in skip and not any(k == u or (u.endswith(".") and k.startswith(u)) for u in unused)
    }
    for k, v in (("agents", run.total_agents), ("ranks", run.ranks)):
        if k not in skip:
            key[k] = v
    return key


def _short(key: str) -> str:
    return key.removeprefix("env.")


@dataclass
class Group:
    """Runs of one experiment (same config but the seed)."""

    label: str
    key: dict[str, Any]
    runs: list[RunData]

    @property
    def algorithm(self) -> str:
        return self.runs[0].algorithm

    @property
    def seeds(self) -> list[Any]:
        return [r.seed for r in self.runs]


def group_runs(runs: Sequence[RunData], ignore: Iterable[str] = ()) -> list[Group]:
    """Group runs by experiment_key; labels name the algorithm and the keys that vary between the
    groups of that algorithm (agent count, traffic, sed.feedback, hpo.expert, ...)."""
    ignore = tuple(ignore)
    buckets: dict[str, tuple[dict[str, Any], list[RunData]]] = {}
    for r in runs:
        key = experiment_key(r, ignore)
        sig = repr(sorted(key.items(), key=lambda kv: kv[0]))
        buckets.setdefault(sig, (key, []))[1].append(r)
    groups = [Group("", key, rs) for key, rs in buckets.values()]
    by_algo: dict[str, list[Group]] = {}
    for g in groups:
        by_algo.setdefault(g.algorithm, []).append(g)
    for algo, gs in by_algo.items():
        keys = sorted({k for g in gs for k in g.key})
        # a key that only some groups have (None elsewhere, e.g. sed.* without an LLM expert) does
        # not tell them apart: label with keys whose present values differ
        varying = [k for k in keys if len({repr(g.key.get(k)) for g in gs if g.key.get(k) is not None}) > 1]
        varying.sort(key=lambda k: (LABEL_ORDER.index(k) if k in LABEL_ORDER else len(LABEL_ORDER), k))
        for g in gs:
            parts = [f"{_short(k)}={g.key.get(k)}" for k in varying if k != "algorithm" and g.key.get(k) is not None]
            g.label = f"{algo} ({', '.join(parts)})" if parts else algo
    groups.sort(key=lambda g: g.label)
    return groups


# ---------------------------------------------------------------------------- references
def read_references(path: str | Path) -> dict[str, dict[str, float]]:
    """references.json: {"shortest_path": {"mean_travel_time": s, "arrival_rate": r, "mean_return": x}, ...}."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as exc:
        raise ReledError(f"{p}: cannot read references ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise ReledError(f"{p}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ReledError(f"{p}: expected an object of policies, e.g. {{'shortest_path': {{'mean_travel_time': 300}}}}")
    out: dict[str, dict[str, float]] = {}
    for policy, vals in data.items():
        if policy.startswith("_"):  # metadata (e.g. _meta from `reled-hpc references`), not a policy
            continue
        if not isinstance(vals, dict):
            raise ReledError(f"{p}: {policy!r} must map metric names to numbers, got {type(vals).__name__}")
        try:
            out[str(policy)] = {str(k): float(v) for k, v in vals.items() if v is not None}
        except (TypeError, ValueError) as exc:
            raise ReledError(f"{p}: {policy!r} holds a value that is not a number ({exc})") from exc
    return out


def find_references(paths: Iterable[str | Path], levels: int = 3) -> Path | None:
    """The references.json next to the given files/folders or up to `levels` folders above them."""
    for p in paths:
        d = Path(p).resolve()
        d = d if d.is_dir() else d.parent
        for cand in [d, *list(d.parents)[:levels]]:
            if (cand / REFERENCES_NAME).is_file():
                return cand / REFERENCES_NAME
    return None


def parse_ref_args(items: Sequence[str], default_metric: str = "mean_travel_time") -> dict[str, dict[str, float]]:
    """--ref POLICY=VALUE (the default metric) or --ref POLICY.METRIC=VALUE."""
    out: dict[str, dict[str, float]] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ReledError(f"--ref expects POLICY=VALUE or POLICY.METRIC=VALUE, got {item!r}")
        policy, _, metric = name.strip().partition(".")
        try:
            out.setdefault(policy, {})[metric or default_metric] = float(value)
        except ValueError as exc:
            raise ReledError(f"--ref {item!r}: {value!r} is not a number") from exc
    return out


def merge_references(*refs: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Later sources override earlier ones metric by metric (command line over references.json)."""
    out: dict[str, dict[str, float]] = {}
    for ref in refs:
        for policy, vals in ref.items():
            out.setdefault(policy, {}).update(vals)
    return out


# ---------------------------------------------------------------------------- a sweep
@dataclass
class Sweep:
    """The readable runs under a folder, the unreadable ones (messages) and the references."""

    root: Path
    runs: list[RunData]
    bad: list[str]
    references: dict[str, dict[str, float]]
    references_path: Path | None


def load_sweep(root: str | Path, references: str | Path | None = None) -> Sweep:
    """Load every dump under `root`; references from `references` or `root`/references.json."""
    root = Path(root)
    paths = find_runs(root)
    runs, bad = load_runs(paths)
    if not runs:
        raise ReledError(f"{root}: none of the {len(paths)} dumps is readable:\n  " + "\n  ".join(bad))
    ref_path = Path(references) if references else find_references([root], levels=0)
    refs = read_references(ref_path) if ref_path else {}
    return Sweep(root, runs, bad, refs, ref_path)


def default_threshold(references: dict[str, dict[str, float]], given: float | None) -> float | None:
    """The travel-time threshold: the one given, else the shortest_path reference, else none."""
    if given is not None:
        return given
    v = references.get("shortest_path", {}).get("mean_travel_time")
    return v if v is not None and math.isfinite(v) else None

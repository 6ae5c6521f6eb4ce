"""Lazy access to HDF5 dumps, run discovery under a sweep folder, grouping of runs, references.

An intact dump is read through `reled_hpc.io.TrajectoryReader`; one shorter than its superblock says
(cut short) or that the reader finds damaged through `reled_hpc.io.SalvageReader`, for the committed
iterations that are readable, with a problem saying what was left out.
Nothing here loads a whole `agent/` or `expert/` column: rows are streamed with `iter_chunks`.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import h5py
import numpy as np
import yaml

from reled_hpc.errors import ConfigError, DumpError, ReledError
from reled_hpc.experiment.algorithms import get_algorithm
from reled_hpc.experiment.config import agent_counts
from reled_hpc.experiment.run_dir import DUMP_FILE, dump_path
from reled_hpc.io import SalvageReader, TrajectoryReader, cut_short
from reled_hpc.io import schema as S

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


class ReaderDump:
    """A dump through a reled_hpc.io reader: a TrajectoryReader of an intact file, or a SalvageReader of
    a damaged one (`reason`: what is wrong with it). Read errors later on (a damaged chunk) become DumpError."""

    def __init__(self, reader: TrajectoryReader, reason: str = "") -> None:
        self._r = reader
        self.path = reader.path
        self.a_max = reader.a_max
        self.problems: list[str] = []
        self.config = _parse_config(self.path, reader.attrs.get("config", ""), self.problems)
        if isinstance(reader, SalvageReader):
            sep = " " if reason.endswith(("?", ".")) else ". "
            self.problems.append(f"{self.path}: {reason}{sep}Analysed the readable part: {reader.recovered}")
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

    def __enter__(self) -> ReaderDump:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve_dump_path(path: str | Path) -> Path:
    """A dump file, or a run folder holding one."""
    p = dump_path(path)
    if Path(path).is_dir() and not p.is_file():
        raise DumpError(f"{path}: a folder without {DUMP_FILE}; give the dump file or a run folder")
    return p


def _reader_dump(reader: TrajectoryReader, reason: str = "") -> ReaderDump:
    try:
        return ReaderDump(reader, reason)
    except BaseException:
        reader.close()
        raise


def open_dump(path: str | Path) -> Dump:
    """Open a dump lazily; a truncated or damaged one is opened for its readable part (see `problems`)."""
    p = resolve_dump_path(path)
    short = cut_short(p) if p.is_file() else None
    if short:  # straight to the salvage reader: no SWMR open, whose reads past the end are retried for minutes
        return _reader_dump(SalvageReader(p), short)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # uncommitted rows: reported via problems
            reader = TrajectoryReader(p)
    except DumpError as exc:
        # only damage is worth recovering from; a missing file, another format or schema is not
        if not p.is_file() or not h5py.is_hdf5(p) or "truncated or damaged" not in str(exc):
            raise
        try:
            return _reader_dump(SalvageReader(p), str(exc).removeprefix(f"{p}: "))
        except DumpError as salvage_exc:
            raise DumpError(f"{exc}; {str(salvage_exc).removeprefix(f'{p}: ')}") from exc
    return _reader_dump(reader)


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
        """Agents over all ranks, as training split them (reled_hpc.experiment.config.agent_counts:
        dist.total_agents when > 0, else env.n_agents per rank); None when the config is unreadable or
        its values are unusable."""
        if not self.config:
            return None
        try:
            total = sum(agent_counts(self.config, self.ranks))
        except (ConfigError, TypeError, ValueError, AttributeError):  # e.g. a string where a count belongs
            return None
        return total if isinstance(total, int) else None

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
    """Every dump (trajectories.h5) under `sweep_dir`, recursively, in path order."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise ReledError(f"{root}: not a folder (expected a sweep folder holding run folders)")
    found = sorted(p for p in root.rglob(DUMP_FILE) if p.is_file())
    if not found:
        raise ReledError(f"{root}: no {DUMP_FILE} found under it")
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
    """Config keys (or "section." prefixes) the run's algorithm never reads (the algorithm registry):
    a difference there does not make another experiment, nor belongs in a label. An algorithm the
    package does not know (an old dump): none, so that no difference is hidden."""
    try:
        algo = get_algorithm(str(cfg.get("algorithm")))
    except ConfigError:
        return ()
    return algo.unused_keys(cfg_get(cfg, "hpo.expert"))


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

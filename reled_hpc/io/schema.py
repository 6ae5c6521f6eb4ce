"""The HDF5 trajectory dump schema as data (docs/architecture.md section 4; docs/hdf5_schema.md).

Writer, reader and docs all derive from these tables, so the contract lives in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import h5py
import numpy as np

SCHEMA_VERSION = 2
# Version 1 files (before programs/rank) are read too: their programs/subset held
# subset + V1_RANK_STRIDE * rank, which the reader splits into subset and rank.
READABLE_VERSIONS = (1, 2)
V1_RANK_STRIDE = 1000

ROW_GROUPS: tuple[str, ...] = ("agent", "expert")
RowGroup = Literal["agent", "expert"]
METRICS_GROUP = "metrics"
PROGRAMS_GROUP = "programs"
ALL_GROUPS: tuple[str, ...] = (*ROW_GROUPS, METRICS_GROUP, PROGRAMS_GROUP)

# File attributes every dump carries (all checked by the reader).
FILE_ATTRS: tuple[str, ...] = (
    "schema_version",
    "config",
    "created",
    "package_version",
    "obs_dim",
    "a_max",
    "extra_metrics",
)

# Storage settings, measured on real observations (docs/hdf5_schema.md, "Compression"): gzip 4
# without shuffle stores 64 B/row against 189 B raw at ~115k rows/s; lzf is faster to read but
# 27% larger and readable only through h5py, gzip by every HDF5 tool. 2048-row chunks (obs:
# 295 kB) because the partial chunk at each iteration boundary is rewritten once, and SWMR never
# reuses the space it leaves: 8192-row chunks cost 70% more file on 8000-row iterations.
CHUNK_ROWS = 2048
SMALL_CHUNK_ROWS = 256  # metrics and programs: one row per iteration / program, few rows
COMPRESSION = "gzip"
COMPRESSION_OPTS = 4
SHUFFLE = False  # shuffle made the real (mostly zero-padded, quantised) observations 15% larger

VLEN_STR = h5py.string_dtype(encoding="utf-8")


@dataclass(frozen=True)
class Column:
    name: str
    dtype: np.dtype
    # trailing shape: () scalar per row, ("obs_dim",) / ("a_max",) resolved from file attributes
    trailing: tuple[str, ...] = ()
    fill: object = 0

    def shape(self, obs_dim: int, a_max: int) -> tuple[int, ...]:
        dims = {"obs_dim": obs_dim, "a_max": a_max}
        return tuple(dims[t] for t in self.trailing)


# Fill of the `iteration` columns: rows a killed writer sized but never filled read as "later than
# any iteration", keeping the column sorted so the commit boundary is one binary search away.
ITERATION_FILL = int(np.iinfo(np.int32).max)


def _c(name: str, dtype: object, trailing: tuple[str, ...] = (), fill: object = 0) -> Column:
    return Column(name, np.dtype(dtype), trailing, fill)


# agent/ and expert/: one row per decision, all columns of equal length.
ROW_COLUMNS: tuple[Column, ...] = (
    _c("iteration", np.int32, fill=ITERATION_FILL),
    _c("rank", np.int16),
    _c("episode", np.int32),
    _c("agent_id", np.int32),
    _c("t", np.float32),
    _c("obs", np.float32, ("obs_dim",)),
    _c("action", np.int16),
    _c("action_mask", np.bool_, ("a_max",)),
    _c("reward", np.float32),
    _c("done", np.bool_),
    _c("logp", np.float32),
    _c("value", np.float32),
    _c("x", np.float32),
    _c("y", np.float32),
)

# row columns the training loop adds to a rollout batch's (the rest come from the rollout)
TRAINER_COLUMNS: tuple[str, ...] = ("iteration", "rank")

# metrics/: one float64 row per committed iteration; NaN where a metric does not apply.
# The `iteration` column is written last and flushed separately: it is the commit marker.
METRIC_COLUMNS: tuple[str, ...] = (
    "iteration",
    "env_steps",
    "wall_s",
    "mean_return",
    "mean_travel_time",
    "arrival_rate",
    "alpha_mean",
    "dtw_mean",
    "rvi_max",
    "pdi_max",
    "execution_rate",
    "llm_latency_s",
)

# programs/: every LLM program.
PROGRAM_COLUMNS: tuple[Column, ...] = (
    _c("iteration", np.int32, fill=ITERATION_FILL),
    _c("rank", np.int16),  # the MPI rank whose expert ran the program (subset numbers are per rank)
    _c("cycle", np.int32),
    _c("subset", np.int32),
    _c("round", np.int32),
    Column("text", VLEN_STR, (), ""),
    _c("executed", np.bool_),
    Column("error", VLEN_STR, (), ""),
    _c("rvi", np.float64, fill=np.nan),
    _c("pdi", np.float64, fill=np.nan),
    _c("latency_s", np.float64, fill=np.nan),
    _c("prompt_tokens", np.int32, fill=-1),
    _c("completion_tokens", np.int32, fill=-1),
)
# Keys a program dict may omit, with the value stored instead (iteration: the pending one).
PROGRAM_DEFAULTS: dict[str, object] = {
    "rank": 0,
    "error": "",
    "rvi": np.nan,
    "pdi": np.nan,
    "latency_s": np.nan,
    "prompt_tokens": -1,
    "completion_tokens": -1,
}

ROW_COLUMN_BY_NAME = {c.name: c for c in ROW_COLUMNS}


def program_columns(version: int = SCHEMA_VERSION) -> tuple[Column, ...]:
    """programs/ datasets a file of schema `version` holds."""
    return PROGRAM_COLUMNS if version >= 2 else tuple(c for c in PROGRAM_COLUMNS if c.name != "rank")


PROGRAM_COLUMN_BY_NAME = {c.name: c for c in PROGRAM_COLUMNS}


def metric_columns(extra_metrics: tuple[str, ...] | list[str] = ()) -> tuple[str, ...]:
    return (*METRIC_COLUMNS, *extra_metrics)

"""The HDF5 trajectory dump schema as data (docs/architecture.md section 4; docs/hdf5_schema.md).

Writer, reader and docs all derive from these tables, so the contract lives in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import h5py
import numpy as np

SCHEMA_VERSION = 3
# Older files are read too, with the same types as version 3 (docs/hdf5_schema.md, "Reading old files"):
# version 1 (before programs/rank) held subset + V1_RANK_STRIDE * rank in programs/subset, which the
# reader splits; versions 1-2 stored booleans as HDF5 enums, metrics/iteration as float64 (NaN fill),
# no programs/answer_bytes and no units/description attributes.
# version 4 is the master file of a sharded dump (reled_hpc.io.master): version 3's groups and
# columns, agent/, expert/, programs/ and metrics/ being virtual datasets over per-rank shard files
# (each a version 3 file), rows ordered by rank, then iteration
MASTER_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
SHARDS_ATTR = "shards"  # master file attribute: the shard file names, rank order, relative to the master
RANK_ROWS_ATTR = "rank_rows"  # master group attribute: each rank's number of rows in the group
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

# Dataset attributes of version 3 (every dataset of every group): `units` is a UDUNITS-style string,
# "1" for dimensionless numbers, BOOL_UNITS for 0/1 flags, "" only for ids and strings (whose
# `description` then says so, ending in NO_UNIT). `feature_names` on the 2-D columns names each of
# their trailing entries (obs: EnvConfig.obs_features; action_mask: the candidates).
UNITS_ATTR = "units"
DESCRIPTION_ATTR = "description"
FEATURES_ATTR = "feature_names"
BOOL_UNITS = "bool"
NO_UNIT = "(an id or text: no unit)"
# booleans are stored as plain 0/1 integers from version 3 on: pandas, h5py and every HDF5 tool read
# them without knowing h5py's enum convention; the reader returns numpy bool for every version
BOOL_STORAGE = np.dtype(np.uint8)


@dataclass(frozen=True)
class Column:
    name: str
    dtype: np.dtype  # what the writer takes and the reader returns (for every readable version)
    # trailing shape: () scalar per row, ("obs_dim",) / ("a_max",) resolved from file attributes
    trailing: tuple[str, ...] = ()
    fill: object = 0
    units: str = "1"
    description: str = ""

    def shape(self, obs_dim: int, a_max: int) -> tuple[int, ...]:
        dims = {"obs_dim": obs_dim, "a_max": a_max}
        return tuple(dims[t] for t in self.trailing)

    @property
    def storage(self) -> np.dtype:
        """The dtype of the dataset in a version-3 file."""
        return BOOL_STORAGE if self.dtype.kind == "b" else self.dtype


# Fill of the `iteration` columns: rows a killed writer sized but never filled read as "later than
# any iteration", keeping the column sorted so the commit boundary is one binary search away.
ITERATION_FILL = int(np.iinfo(np.int32).max)


def _c(name: str, dtype: object, units: str, description: str, trailing: tuple[str, ...] = (),
       fill: object = 0) -> Column:  # fmt: skip
    dt = np.dtype(dtype)
    if dt.kind == "b":
        units = BOOL_UNITS
    if not units:
        description = f"{description} {NO_UNIT}"
    return Column(name, dt, trailing, fill, units, description)


_ITERATION = "training iteration the row belongs to (0-based)"

# agent/ and expert/: one row per decision, all columns of equal length.
ROW_COLUMNS: tuple[Column, ...] = (
    _c("iteration", np.int32, "", _ITERATION, fill=ITERATION_FILL),
    _c("rank", np.int16, "", "MPI rank that simulated the decision"),
    _c("episode", np.int32, "", "episode number, counted over the whole run"),
    _c("agent_id", np.int32, "", "the deciding agent (vehicle) within its episode"),
    _c("t", np.float32, "s", "simulated time of the decision"),
    _c(
        "obs",
        np.float32,
        "1",
        "the agent's observation, scaled features named by the feature_names attribute "
        "(lengths in km, speeds in units of 30 m/s, shares and flags)",
        ("obs_dim",),
    ),
    _c("action", np.int16, "", "index of the chosen candidate edge (into action_mask)"),
    _c("action_mask", np.bool_, "", "1 where candidate j was a valid action", ("a_max",)),
    _c(
        "reward",
        np.float32,
        "min",
        "minus the time since the agent's last decision in units of "
        "env.reward_time_scale_s (default 60 s: minutes), plus the arrival bonus / minus the failure penalty",
    ),
    _c("done", np.bool_, "", "1 on the agent's last decision of the episode"),
    _c("logp", np.float32, "1", "natural log-probability of `action` under the behaviour policy"),
    _c("value", np.float32, "min", "the critic's value estimate, in reward units"),
    _c("x", np.float32, "m", "vehicle position east, SUMO network coordinates"),
    _c("y", np.float32, "m", "vehicle position north, SUMO network coordinates"),
)

# row columns the training loop adds to a rollout batch's (the rest come from the rollout)
TRAINER_COLUMNS: tuple[str, ...] = ("iteration", "rank")


class MetricInfo(NamedTuple):
    """`units` and `description` attributes of a metrics/ dataset."""

    units: str
    description: str


# metrics/: one row per committed iteration: `iteration` int32 (as in the other groups), every other
# column float64, NaN where a metric does not apply. The `iteration` column (fill ITERATION_FILL) is
# written last and flushed separately: it is the commit marker.
METRIC_ITERATION_DTYPE = np.dtype(np.int32)
METRIC_INFO: dict[str, MetricInfo] = {
    "iteration": MetricInfo("", f"{_ITERATION}; written last: the row's commit marker {NO_UNIT}"),
    "env_steps": MetricInfo("1", "simulation steps of the run so far, over all ranks"),
    "wall_s": MetricInfo("s", "wall-clock time of the run so far"),
    "mean_return": MetricInfo("min", "mean undiscounted return of an agent in this iteration's episodes"),
    "mean_travel_time": MetricInfo("s", "mean travel time of the agents that arrived"),
    "arrival_rate": MetricInfo("1", "share of agents that reached their destination"),
    "alpha_mean": MetricInfo("1", "mean HPO weight alpha = exp(-kappa * DTW) of the expert's demonstrations"),
    "dtw_mean": MetricInfo("1", "mean DTW distance between agent and expert routes, in units of the map's scale_m"),
    "rvi_max": MetricInfo(
        "1",
        "largest RVI of the iteration's LLM plans: bound on the return change of agents "
        "outside a subset, in units of r_max / (1 - gamma)",
    ),
    "pdi_max": MetricInfo("nat", "largest PDI of the iteration's LLM plans: max KL(expert || policy) of a subset"),
    "execution_rate": MetricInfo("1", "share of LLM programs that executed without error"),
    "llm_latency_s": MetricInfo("s", "LLM time of the iteration (the slowest rank)"),
}
METRIC_COLUMNS: tuple[str, ...] = tuple(METRIC_INFO)

# programs/: every LLM program.
# Strings: UTF-8 variable-length, made safe (reled_hpc.text.safe_text) before they are stored.
PROGRAM_COLUMNS: tuple[Column, ...] = (
    _c("iteration", np.int32, "", _ITERATION, fill=ITERATION_FILL),
    _c("rank", np.int16, "", "MPI rank whose expert ran the program (subset numbers are per rank)"),
    _c("cycle", np.int32, "", "SED refinement cycle"),
    _c("subset", np.int32, "", "agent subset the program plans for"),
    _c("round", np.int32, "", "refinement round within the cycle (1 = first answer)"),
    _c("text", VLEN_STR, "", "the program's source text", fill=""),
    _c("executed", np.bool_, "", "1 when the program ran without error"),
    _c("error", VLEN_STR, "", "the error the program raised, empty when none", fill=""),
    _c(
        "rvi",
        np.float64,
        "1",
        "RVI of the program's plan: bound on the return change of agents outside its "
        "subset, in units of r_max / (1 - gamma)",
        fill=np.nan,
    ),
    _c(
        "pdi",
        np.float64,
        "nat",
        "PDI of the program's plan: max KL(expert || policy) over its subset's demonstration states",
        fill=np.nan,
    ),
    _c("latency_s", np.float64, "s", "LLM time to answer", fill=np.nan),
    _c("prompt_tokens", np.int32, "1", "prompt tokens the LLM counted; -1 unknown", fill=-1),
    _c("completion_tokens", np.int32, "1", "completion tokens the LLM counted; -1 unknown", fill=-1),
    _c("answer_bytes", np.int64, "byte", "UTF-8 size of the LLM's answer before any cap; -1 unknown", fill=-1),
    _c(
        "routes_changed",
        np.uint8,
        BOOL_UNITS,
        "1 when a revision's routes differ from its subset's previous answer (a failed answer: 0); 0 in round 1 "
        "and in files of versions 1-2",
    ),
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
    "answer_bytes": -1,
    "routes_changed": 0,
}

ROW_COLUMN_BY_NAME = {c.name: c for c in ROW_COLUMNS}


# programs/ columns added by a schema version: older files lack them (the reader fills them in)
PROGRAM_COLUMNS_SINCE: dict[str, int] = {"rank": 2, "answer_bytes": 3, "routes_changed": 3}


def program_columns(version: int = SCHEMA_VERSION) -> tuple[Column, ...]:
    """programs/ datasets a file of schema `version` holds."""
    return tuple(c for c in PROGRAM_COLUMNS if PROGRAM_COLUMNS_SINCE.get(c.name, 1) <= version)


PROGRAM_COLUMN_BY_NAME = {c.name: c for c in PROGRAM_COLUMNS}


def metric_columns(extra_metrics: tuple[str, ...] | list[str] = ()) -> tuple[str, ...]:
    return (*METRIC_COLUMNS, *extra_metrics)


def candidate_names(a_max: int) -> tuple[str, ...]:
    """feature_names of action_mask: candidate j as `cand{j}`, as in EnvConfig.obs_features."""
    return tuple(f"cand{j}" for j in range(a_max))


def default_feature_names(obs_dim: int) -> tuple[str, ...]:
    """feature_names of obs when the writer's caller names none (and in files before version 3)."""
    return tuple(str(i) for i in range(obs_dim))

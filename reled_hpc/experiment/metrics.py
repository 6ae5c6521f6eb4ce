"""Metric and column names of a run, and how they are computed from one iteration's results.

Each rank computes a fixed vector of `RANK_METRICS` (its own episodes); the ranks' `rank_partials` are
reduced (SUM, MAX) onto rank 0, which makes the iteration's row of the dump's `metrics/` group
(`iteration_row`): the schema's columns (reled_hpc.io.schema.METRIC_COLUMNS) plus `EXTRA_METRICS`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..finite import finite_max
from ..io.schema import METRIC_INFO, ROW_COLUMNS, TRAINER_COLUMNS, MetricInfo
from ..learn.rollout import Batch
from .evaluation import EVAL_METRICS
from .probe import PROBE_METRICS

EXTRA_METRICS = (
    "policy_loss", "value_loss", "entropy", "approx_kl", "bc_nll", "decisions", "bg_mean_travel_time",
    "expert_travel_time", "expert_arrival_rate", "failed_rate", "update_s", "rollout_s", "expert_s",
    "mean_time_censored", "td_loss", "epsilon", "dtw_s", "comm_s", "comm_bytes", "write_s", "ranks", "rss_mb_max",
    "external_change_max", "sed_cycle", "llm_cache_hits", "probe_s", "rss_mb_rank0", "root_gather_bytes",
    *PROBE_METRICS, "eval_s", *EVAL_METRICS,
)  # fmt: skip

# units and description of every EXTRA_METRICS column (the writer stores them as dataset attributes;
# the schema's own columns are described in reled_hpc.io.schema.METRIC_INFO). A metric added above
# without an entry here fails tests/test_h5io.py and the trainer's writer.
_SED = "SED figure of the iteration's fresh expert episodes"
EXTRA_METRIC_INFO: dict[str, MetricInfo] = {
    "policy_loss": MetricInfo("1", "policy (actor) loss of the update, mean over minibatches"),
    "value_loss": MetricInfo("1", "critic loss of the update (squared error in reward units), mean over minibatches"),
    "entropy": MetricInfo("nat", "mean policy entropy over the update's samples"),
    "approx_kl": MetricInfo("nat", "approximate KL divergence between the old and the updated policy"),
    "bc_nll": MetricInfo("nat", "negative log-likelihood of the expert's actions under the policy (HPO term)"),
    "decisions": MetricInfo("1", "agent decisions of the iteration, over all ranks"),
    "bg_mean_travel_time": MetricInfo("s", "mean travel time of the background (non-agent) traffic"),
    "expert_travel_time": MetricInfo("s", "mean travel time of the agents in the expert's episodes"),
    "expert_arrival_rate": MetricInfo("1", "share of agents that arrived in the expert's episodes"),
    "failed_rate": MetricInfo("1", "share of agents that failed (teleported or at a dead end)"),
    "update_s": MetricInfo("s", "wall time of the learner's update"),
    "rollout_s": MetricInfo("s", "wall time of the rollouts (the slowest rank)"),
    "expert_s": MetricInfo("s", "wall time of the expert's episodes (the slowest rank)"),
    "mean_time_censored": MetricInfo("s", "mean time per agent, unfinished agents counted to the episode's end"),
    "td_loss": MetricInfo("1", "QMIX temporal-difference loss (squared error in reward units)"),
    "epsilon": MetricInfo("1", "QMIX exploration rate"),
    "dtw_s": MetricInfo("s", "wall time of the DTW computations (the slowest rank)"),
    "comm_s": MetricInfo("s", "wall time of the iteration's MPI communication on rank 0"),
    "comm_bytes": MetricInfo("byte", "bytes moved by MPI in the iteration"),
    "write_s": MetricInfo("s", "wall time of writing the iteration to this dump"),
    "ranks": MetricInfo("1", "MPI ranks of the run"),
    "rss_mb_max": MetricInfo("MiB", "largest peak resident memory of a rank"),
    "rss_mb_rank0": MetricInfo("MiB", "peak resident memory of rank 0 (the rank that commits the dump)"),
    "root_gather_bytes": MetricInfo(
        "byte", "bytes of per-rank data gathered to rank 0 in the iteration (Gather/Gatherv, not reductions)"
    ),
    "external_change_max": MetricInfo(
        "1", f"{_SED}: largest measured return change of agents outside a subset, in RVI's units r_max / (1 - gamma)"
    ),
    "sed_cycle": MetricInfo("1", "1: a SED cycle ran in this iteration, 0: demonstrations reused, NaN: no SED"),
    "llm_cache_hits": MetricInfo("1", "LLM answers served from the response cache in this iteration"),
    "probe_s": MetricInfo("s", "wall time of the probe episodes (the slowest rank)"),
    "probe_external_change": MetricInfo(
        "1", "probe: |return change| of the agents outside the switched subset, in RVI's units r_max / (1 - gamma)"
    ),
    "probe_external_tt_change": MetricInfo("1", "probe: the same change as a share of their mean travel time"),
    "route_churn": MetricInfo("1", "probe: share of agents whose greedy route changed since the previous probe"),
    "eval_s": MetricInfo("s", "wall time of the held-out evaluation episodes (the slowest rank)"),
    "eval_time_censored": MetricInfo(
        "s", "held-out evaluation, greedy policy: mean time per agent, unfinished agents counted to the episode's end"
    ),
    "eval_travel_time": MetricInfo("s", "held-out evaluation, greedy policy: mean travel time of the arrived agents"),
    "eval_arrival_rate": MetricInfo("1", "held-out evaluation, greedy policy: share of agents that arrived"),
    "eval_return": MetricInfo("1", "held-out evaluation, greedy policy: mean return per agent"),
}
# every metrics/ column of a training run's dump
ALL_METRIC_INFO: dict[str, MetricInfo] = {**METRIC_INFO, **EXTRA_METRIC_INFO}

# SED's figures of a rank's expert episodes in one iteration (sed_stats)
SED_KEYS = ("execution_rate", "rvi_max", "pdi_max", "llm_latency_s", "external_change_max", "sed_cycle",
            "llm_cache_hits")  # fmt: skip

# a rank's metrics vector, in this order (gathered as one float64 row per rank)
RANK_METRICS = ("mean_return", "mean_travel_time", "arrival_rate", "bg_mean_travel_time", "mean_time_censored",
                "failed_rate", "expert_travel_time", "expert_arrival_rate", "env_steps", "decisions", "rollout_s",
                "expert_s", "dtw_s", "rss_mb", "probe_s", "eval_s", *SED_KEYS, *PROBE_METRICS,
                *EVAL_METRICS)  # fmt: skip

# episode metrics (env.metrics()) averaged over a rank's episodes, then over ranks
EPISODE_MEANS = ("mean_return", "mean_travel_time", "arrival_rate", "bg_mean_travel_time", "mean_time_censored")
LEARNER_STATS = ("policy_loss", "value_loss", "entropy", "approx_kl", "bc_nll", "td_loss", "epsilon")
RANK_MEANS = ("expert_travel_time", "expert_arrival_rate", "failed_rate")  # means over ranks
# the slowest rank: the others wait for it
TIMING_MAX = ("rollout_s", "expert_s", "dtw_s", "probe_s", "eval_s")

# agent/ and expert/ row columns that come from a rollout batch (dump_rows adds iteration and rank)
DUMP_COLUMNS = tuple(c.name for c in ROW_COLUMNS if c.name not in TRAINER_COLUMNS)


def dump_rows(batch: Batch, iteration: int) -> dict[str, np.ndarray]:
    """A rollout batch as the HDF5 dump's agent/ or expert/ rows (rank 0 when the batch has none)."""
    n = len(batch["action"])
    rank = batch["rank"] if "rank" in batch else np.zeros(n, np.int16)
    return {"iteration": np.full(n, iteration, np.int32), "rank": rank, **{k: batch[k] for k in DUMP_COLUMNS}}


def program_rows(programs: Sequence[Mapping[str, Any]], rank: int) -> list[dict[str, Any]]:
    """An expert's program records as rows of the dump's programs/ group, marked with their rank
    (subset numbers are per rank)."""
    return [{**row, "rank": rank} for row in programs]


def _nanmean(values: Sequence[float]) -> float:
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def sed_stats(estats: list[dict[str, Any]], fresh: list[bool] | None = None) -> dict[str, float]:
    """SED figures of a rank's expert episodes: NaN for oracle experts, and NaN (with sed_cycle 0) in an
    iteration that reuses its scenario's demonstrations, so that means over iterations count each
    cycle once. `fresh[i]`: episode i's demonstration was computed in this iteration."""
    fresh = [True] * len(estats) if fresh is None else fresh
    if not estats or "execution_rate" not in estats[0]:
        return dict.fromkeys(SED_KEYS, float("nan"))
    now = [s for s, f in zip(estats, fresh, strict=True) if f]
    if not now:
        return {**dict.fromkeys(SED_KEYS, float("nan")), "sed_cycle": 0.0, "llm_cache_hits": 0.0}

    def vals(key: str) -> np.ndarray:
        return np.array([float(s.get(key, np.nan)) for s in now], np.float64)

    er = vals("execution_rate")
    return {
        "execution_rate": float(np.nanmean(er)) if np.isfinite(er).any() else float("nan"),
        "rvi_max": finite_max(vals("rvi_max")),
        "pdi_max": finite_max(vals("pdi_max")),
        "llm_latency_s": float(np.nansum(vals("llm_latency_s"))),
        # measured |mean return change| of agents outside a subset, in RVI's units (RVI bounds it)
        "external_change_max": finite_max(vals("measured_external_change")),
        "sed_cycle": 1.0,
        "llm_cache_hits": float(np.nansum(vals("cache_hits"))),
    }


def rank_metrics(episodes: list[dict[str, Any]], expert_stats: list[dict[str, Any]], fresh: list[bool],
                 timings: Mapping[str, float]) -> np.ndarray:  # fmt: skip
    """A rank's RANK_METRICS vector from its episodes' env.metrics(), its expert episodes' stats and
    `timings` (env_steps, decisions, rollout_s, expert_s, dtw_s, probe_s, eval_s, rss_mb, and the probe's
    and the held-out evaluation's metrics: NaN in an iteration without them)."""
    vec: dict[str, float] = {}
    for k in EPISODE_MEANS:
        vals = [m[k] for m in episodes if not np.isnan(m[k])]
        vec[k] = float(np.mean(vals)) if vals else float("nan")
    vec["failed_rate"] = float(np.mean([m["failed"] / max(m["agents"], 1) for m in episodes]))
    nan = float("nan")
    vec["expert_travel_time"] = (
        float(np.nanmean([s["expert_travel_time"] for s in expert_stats])) if expert_stats else nan
    )
    vec["expert_arrival_rate"] = float(np.mean([s["expert_arrival"] for s in expert_stats])) if expert_stats else nan
    vec.update(timings)
    vec.update(sed_stats(expert_stats, fresh))
    return np.array([vec[k] for k in RANK_METRICS], np.float64)


def rank_partials(vec: np.ndarray, alpha: np.ndarray | None, dtw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A rank's share of the iteration's metrics as two fixed-size vectors that combine across ranks by
    element-wise SUM and MAX (MPI Reduce: rank 0 receives the same bytes whatever the number of ranks).
    SUM part: the finite RANK_METRICS values (NaN as 0), their finite flags, then sum and count of
    alpha and of the finite DTW distances; MAX part: the RANK_METRICS values, NaN as -inf."""
    fin = np.isfinite(vec)
    a = np.zeros(0) if alpha is None else np.asarray(alpha, np.float64)
    d = np.asarray(dtw, np.float64)
    d = d[np.isfinite(d)]
    sums = np.concatenate([np.where(fin, vec, 0.0), fin.astype(np.float64), [a.sum(), a.size, d.sum(), d.size]])
    return sums, np.where(fin, vec, -np.inf)


def iteration_row(iteration: int, env_steps: int, sums: np.ndarray, maxes: np.ndarray, has_alpha: bool,
                  learner_stats: Mapping[str, float], timings: Mapping[str, float]) -> dict[str, float]:  # fmt: skip
    """The metrics row of an iteration from the ranks' `rank_partials` combined (`sums` summed, `maxes`
    maximised over ranks), whether an expert gave alphas, the update's stats and rank 0's `timings`
    (comm_s, comm_bytes, update_s, ranks, ...). env_steps: the run's total so far. Means over ranks count
    each rank whose value is finite once, as a mean of the ranks' means."""
    k = len(RANK_METRICS)
    total = dict(zip(RANK_METRICS, sums[:k], strict=True))
    count = dict(zip(RANK_METRICS, sums[k : 2 * k], strict=True))
    top = {m: float(v) if np.isfinite(v) else float("nan") for m, v in zip(RANK_METRICS, maxes, strict=True)}
    a_sum, a_n, d_sum, d_n = sums[2 * k :]

    def mean(m: str) -> float:
        return float(total[m] / count[m]) if count[m] else float("nan")

    return {
        "iteration": float(iteration),
        "env_steps": float(env_steps),
        **{m: mean(m) for m in EPISODE_MEANS},
        "alpha_mean": float(a_sum / a_n) if has_alpha and a_n else float("nan"),
        "dtw_mean": float(d_sum / d_n) if d_n else float("nan"),
        "rvi_max": top["rvi_max"],
        "pdi_max": top["pdi_max"],
        "execution_rate": mean("execution_rate"),
        "llm_latency_s": top["llm_latency_s"],  # ranks ask in parallel: the slowest
        "external_change_max": top["external_change_max"],
        "sed_cycle": top["sed_cycle"],  # 1: a SED cycle ran this iteration, 0: demonstrations reused
        "llm_cache_hits": float(total["llm_cache_hits"]) if count["llm_cache_hits"] else float("nan"),
        "decisions": float(total["decisions"]),
        **{m: mean(m) for m in (*RANK_MEANS, *PROBE_METRICS, *EVAL_METRICS)},
        **{m: top[m] for m in TIMING_MAX},
        **timings,
        "rss_mb_max": top["rss_mb"],
        **{m: learner_stats.get(m, float("nan")) for m in LEARNER_STATS},
    }


def rank_env_steps(sums: np.ndarray) -> int:
    """Simulation steps of an iteration over all ranks (from the summed `rank_partials`)."""
    return int(sums[RANK_METRICS.index("env_steps")])

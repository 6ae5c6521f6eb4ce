"""The run summary and the sweep comparison: the figures (dicts) and their text, Markdown, CSV and
HTML renderings."""

from __future__ import annotations

import csv
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from reled_hpc.errors import DumpError, ReledError
from reled_hpc.finite import finite_stat

from .load import Dump, Group, RunData, last_finite
from .robust import (
    BOOTSTRAP_REPS,
    BOOTSTRAP_SEED,
    EFFICIENCY_METRIC,
    TARGET_POLICY,
    Interval,
    Level,
    efficiency_level,
    iqm_interval,
    probability_of_improvement,
    steps_or_inf,
)
from .rows import returns_by_iteration, row_stats
from .stats import FINAL_WINDOW, mean_std, read_programs, seconds_per_iteration, sed_stats, time_to_threshold

FINAL_METRICS = ("mean_travel_time", "arrival_rate", "mean_return")
# the held-out greedy evaluation (reled_hpc.experiment.evaluation, with eval.every): a run's value is the
# one of its last evaluation; NaN at the iterations between evaluations, absent or all NaN without any
HELD_OUT_METRICS = ("eval_time_censored", "eval_arrival_rate")
# the references.json key of each: `reled-hpc references` names reference_eval's figures eval_<metric>
HELD_OUT_REFERENCE_KEYS = {"eval_time_censored": "eval_mean_time_censored", "eval_arrival_rate": "eval_arrival_rate"}
HELD_OUT_POI = "eval_time_censored"  # the held-out metric of the probability of improvement
# the direction of "better" per final metric, for the probability of improvement
LOWER_IS_BETTER = {"mean_travel_time": True, "arrival_rate": False, "mean_return": False,
                   "eval_time_censored": True, "eval_arrival_rate": False}  # fmt: skip
DEFAULT_FOCUS = "reled"  # the paper's method: the focus of the probability of improvement when present
# the interaction probe's metrics (reled_hpc.experiment.probe), averaged over a run's probes
PROBE_METRICS = ("route_churn", "probe_external_tt_change", "probe_external_change")


def probe_means(run: RunData) -> dict[str, float]:
    """Mean of each probe metric over the run's probes (NaN where the run never probed)."""
    return {k: finite_stat(run.metric(k), np.mean) for k in PROBE_METRICS}


# ---------------------------------------------------------------------------- number formatting
def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def fmt_num(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def fmt_s(v: Any) -> str:
    return f"{fmt_num(v, 1)} s" if _finite(v) else "-"


def fmt_pct(v: Any) -> str:
    return f"{100 * v:.1f} %" if _finite(v) else "-"


def fmt_pm(mean: float, std: float, digits: int = 1, scale: float = 1.0) -> str:
    """'mean ± std' ('mean' alone for one seed, '-' for none)."""
    if not math.isfinite(mean):
        return "-"
    text = f"{mean * scale:,.{digits}f}"
    return f"{text} ± {std * scale:,.{digits}f}" if math.isfinite(std) else text


# ---------------------------------------------------------------------------- summary
def run_summary(run: RunData, dump: Dump, rows: bool = True, window: int = FINAL_WINDOW) -> dict[str, Any]:
    """Everything `analyze summary` shows; reads the rows chunk-wise unless `rows` is False."""
    its = run.iterations
    configured = run.cfg("iterations")
    out: dict[str, Any] = {
        "file": str(run.path),
        "config": {
            "algorithm": run.algorithm,
            "map": run.cfg("env.map", "?"),
            "agents": run.total_agents,
            # with dist.total_agents the ranks split the total and env.n_agents is ignored
            "agents_per_rank": None if (run.cfg("dist.total_agents") or 0) > 0 else run.cfg("env.n_agents"),
            "traffic": run.cfg("env.traffic", "?"),
            "seed": run.seed,
            "ranks": run.ranks,
            "iterations_configured": configured,
            "episodes_per_iteration": run.cfg("episodes_per_iteration"),
            "hpo_expert": run.cfg("hpo.expert") if run.algorithm == "reled" else None,
        },
        "iterations": {
            "committed": run.n_iterations,
            "first": int(its[0]) if its.size else None,
            "last": int(its[-1]) if its.size else None,
        },
        "env_steps": last_finite(run.metrics.get("env_steps")),
        "wall_s": last_finite(run.metrics.get("wall_s")),
        "seconds_per_iteration": seconds_per_iteration(run),
        "final": {"window": min(window, run.n_iterations), **{k: run.final(k, window) for k in FINAL_METRICS}},
        "rows": {g: {"rows": run.rows[g]} for g in ("agent", "expert")} | {"programs": run.rows["programs"]},
        "sed": None,
        "interaction": None,
        "problems": list(run.problems),
    }
    probes = int(np.isfinite(run.metric("probe_external_change")).sum())
    if probes:
        out["interaction"] = {"probes": probes, **probe_means(run)}
    if rows:
        last = its[-window:].tolist()
        for g in ("agent", "expert"):
            if run.rows[g]:
                st = row_stats(dump, g)
                if st.pop("error"):
                    out["problems"].append(
                        f"{run.path}: {g}/ rows: a read error stopped the pass after {st['rows']} rows"
                    )
                try:
                    rets = returns_by_iteration(dump, g, last)
                    st["return_last"] = float(np.mean(list(rets.values()))) if rets else math.nan
                except DumpError as exc:  # a damaged chunk in the last iterations: say so, keep the rest
                    out["problems"].append(f"{run.path}: {g}/ returns of the last iterations unreadable: {exc}")
                    st["return_last"] = math.nan
                out["rows"][g].update(st)
    if run.has_sed:
        out["sed"] = sed_stats(run, read_programs(dump))
    return out


def summary_lines(s: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, value) rows of the summary table; '' as field continues a section."""
    c, it, fin = s["config"], s["iterations"], s["final"]
    agents = fmt_num(c["agents"]) if c["agents"] is not None else "?"
    if c["ranks"] > 1:
        per = c["agents_per_rank"]
        agents += f" ({per} per rank x {c['ranks']} ranks)" if per is not None else f" (split over {c['ranks']} ranks)"
    span = f" ({it['first']}-{it['last']})" if it["committed"] else ""
    of = f" of {c['iterations_configured']} configured" if c["iterations_configured"] is not None else ""
    algo = c["algorithm"] + (f" ({c['hpo_expert']} expert)" if c["hpo_expert"] else "")
    lines = [
        ("file", s["file"]),
        ("algorithm", algo),
        ("map", str(c["map"])),
        ("agents", agents),
        ("traffic", str(c["traffic"])),
        ("seed", str(c["seed"])),
        ("ranks", str(c["ranks"])),
        ("iterations", f"{it['committed']} committed{span}{of}"),
        ("env steps", fmt_num(int(s["env_steps"])) if _finite(s["env_steps"]) else "-"),
        ("wall time", f"{fmt_s(s['wall_s'])} ({fmt_s(s['seconds_per_iteration'])} per iteration, median)"),
        (f"final (mean of last {fin['window']} iterations)", ""),
        ("  mean travel time", fmt_s(fin["mean_travel_time"])),
        ("  arrival rate", fmt_pct(fin["arrival_rate"])),
        ("  mean return", fmt_num(fin["mean_return"])),
    ]
    for g in ("agent", "expert"):
        r = s["rows"][g]
        if "mean_reward" not in r:
            lines.append((f"{g} rows", fmt_num(r["rows"])))
            continue
        shares = ", ".join(f"{i}: {100 * x:.1f}%" for i, x in enumerate(r["action_share"]))
        lines += [
            (f"{g} rows", fmt_num(r["rows"])),
            ("  mean reward per decision", fmt_num(r["mean_reward"], 3)),
            (f"  return from rows (last {fin['window']})", fmt_num(r.get("return_last", math.nan))),
            ("  finished agent episodes", fmt_num(r["episodes_done"])),
            ("  actions taken", shares or "-"),
            ("  invalid actions", fmt_num(r["invalid_actions"])),
        ]
    inter = s.get("interaction")
    if inter:
        lines += [
            (f"interaction probe ({inter['probes']} probes, means)", ""),
            ("  route churn", fmt_pct(inter["route_churn"])),
            ("  others' travel time change", fmt_pct(inter["probe_external_tt_change"])),
            ("  others' return change (RVI units)", fmt_num(inter["probe_external_change"], 4)),
        ]
    sed = s["sed"]
    if sed:
        lines.append(("SED / HPO", ""))
        if sed["programs"]:
            ex = f"{sed['executed']:,} executed, {fmt_pct(sed['execution_rate'])}"
            if sed["answered"] != sed["programs"]:  # failed requests: the rate is of the answered programs
                ex = f"{sed['answered']:,} answered, {ex} of them"
            rounds = f"{sed['subset_cycles']:,} subset-cycles, {fmt_num(sed['rounds_mean'])} rounds each"

            def arrow(key: str, digits: int = 2) -> str:
                return f"{fmt_num(sed[key.format('before')], digits)} -> {fmt_num(sed[key.format('after')], digits)}"

            lines += [
                ("  programs", f"{sed['programs']:,} ({ex}), {rounds}"),
                (
                    "  revisions",
                    f"{sed['revisions']:,}, {sed['revisions_changed_routes']:,} changed the routes; "
                    f"{sed['improved_subset_cycles']:,} of {sed['revised_subset_cycles']:,} revised subset-cycles kept "
                    "new routes with a lower RVI or PDI than round 1",
                ),
                ("  RVI round 1 -> kept (mean)", arrow("rvi_{}_mean")),
                ("  RVI round 1 -> kept (max)", arrow("rvi_{}_max")),
                ("  PDI round 1 -> kept (mean)", arrow("pdi_{}_mean", 3) + " nats"),
                ("  PDI round 1 -> kept (max)", arrow("pdi_{}_max", 3) + " nats"),
                ("  LLM latency", f"{fmt_s(sed['llm_latency_mean_s'])} per request (mean)"),
                ("  tokens", f"{sed['prompt_tokens']:,} prompt, {sed['completion_tokens']:,} completion"),
            ]
        else:
            lines.append(("  programs", "0 (no LLM programs in the dump)"))
            if _finite(sed["execution_rate"]):
                lines.append(("  execution rate", fmt_pct(sed["execution_rate"])))
        optional = [
            ("  RVI max per iteration (mean)", fmt_num(sed["rvi_max_mean"])),
            ("  PDI max per iteration (mean)", fmt_num(sed["pdi_max_mean"], 3) + " nats"),
            ("  external return change (max)", fmt_num(sed["external_change_max"], 3)),
            ("  LLM latency per iteration (mean)", fmt_s(sed["llm_latency_per_iteration_s"])),
        ]
        lines += [(k, v) for k, v in optional if not v.startswith("-")]  # only what this run has
        lines += [
            ("  alpha (mean over iterations)", fmt_num(sed["alpha_mean"], 3)),
            ("  DTW (mean, map-scale units)", fmt_num(sed["dtw_mean"], 4)),
        ]
    return lines


def render_kv(lines: Sequence[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k.ljust(width)}  {v}".rstrip() for k, v in lines)


# ---------------------------------------------------------------------------- comparison
@dataclass(frozen=True)
class RobustOptions:
    """What the comparison's robust statistics need beyond the runs (`analyze compare` options)."""

    focus: str | None = None  # group label or algorithm; None: DEFAULT_FOCUS if the sweep has it
    fraction: float = 0.5  # sample efficiency: this fraction of the way from random to DUE travel time
    target: str = TARGET_POLICY
    metric: str = EFFICIENCY_METRIC  # the travel time of the sample-efficiency level
    reps: int = BOOTSTRAP_REPS
    seed: int = BOOTSTRAP_SEED


@dataclass
class Comparison:
    """The comparison table: rows (dicts, one per group then one per reference) and what the notes say."""

    rows: list[dict[str, Any]]
    threshold: float | None
    window: int
    options: RobustOptions
    focus: list[str]  # labels of the groups whose probability of improvement is tabulated
    level: Level | None  # the sample-efficiency travel-time level; None without references for it
    notes: list[str] = field(default_factory=list)


def resolve_focus(groups: Sequence[Group], focus: str | None) -> list[Group]:
    """The focus groups: the group labelled `focus`, else every group of algorithm `focus` (case-insensitive).
    No `focus`: DEFAULT_FOCUS's groups, or none. A `focus` given that matches nothing is an error."""
    name = (focus or DEFAULT_FOCUS).strip().lower()
    exact = [g for g in groups if g.label.lower() == name]
    found = exact or [g for g in groups if g.algorithm.lower() == name]
    if focus is not None and not found:
        labels = ", ".join(repr(g.label) for g in groups)
        raise ReledError(f"--focus {focus!r}: no group has that label or algorithm; the groups: {labels}")
    return found


def _put(row: dict[str, Any], key: str, iv: Interval) -> None:
    row[key], row[f"{key}_lo"], row[f"{key}_hi"] = iv.value, iv.lo, iv.hi


def compare(
    groups: Sequence[Group],
    references: dict[str, dict[str, float]],
    threshold: float | None,
    window: int = FINAL_WINDOW,
    options: RobustOptions | None = None,
) -> Comparison:
    """One row per experiment group (mean/std and IQM [CI] over seeds of the training finals and of the
    held-out evaluation, probability of improvement of the focus groups, sample efficiency) and one per
    reference policy."""
    opt = options or RobustOptions()
    boot = {"reps": opt.reps, "seed": opt.seed}
    focus = resolve_focus(groups, opt.focus)
    level, level_note = efficiency_level(references, opt.fraction, opt.target, metric=opt.metric)
    # one value per run: training finals over the last `window` iterations; held out, the run's last
    # evaluation (its final one: the iterations between evaluations are NaN), NaN if it never evaluated
    finals = {
        id(g): {k: [r.final(k, window) for r in g.runs] for k in FINAL_METRICS}
        | {k: [last_finite(r.metrics.get(k)) for r in g.runs] for k in HELD_OUT_METRICS}
        for g in groups
    }
    out: list[dict[str, Any]] = []
    for g in groups:
        row: dict[str, Any] = {"label": g.label, "algorithm": g.algorithm, "n_seeds": len(g.runs),
                               "seeds": " ".join(str(s) for s in g.seeds), "agents": g.runs[0].total_agents,
                               "reference": False}  # fmt: skip
        for k in (*FINAL_METRICS, *HELD_OUT_METRICS):
            row[f"{k}_mean"], row[f"{k}_std"], _ = mean_std(finals[id(g)][k])
            _put(row, f"{k}_iqm", iqm_interval([finals[id(g)][k]], **boot))
        row["poi"] = {
            f.label: {
                k: probability_of_improvement([finals[id(f)][k]], [finals[id(g)][k]], LOWER_IS_BETTER[k], **boot)
                for k in (*FINAL_METRICS, HELD_OUT_POI)
            }
            for f in focus
            if f is not g
        }
        if level is not None:
            steps = [steps_or_inf(time_to_threshold(r, level.value, window, level.metric)[0]) for r in g.runs]
            _put(row, "steps_to_level_iqm", iqm_interval([steps], **boot))
            row["level_reached"] = f"{sum(math.isfinite(s) for s in steps)}/{len(steps)}"
        row["iterations_mean"], _, _ = mean_std([float(r.n_iterations) for r in g.runs])
        row["env_steps_mean"], _, _ = mean_std([last_finite(r.metrics.get("env_steps")) for r in g.runs])
        row["wall_s_mean"], _, _ = mean_std([last_finite(r.metrics.get("wall_s")) for r in g.runs])
        row["s_per_iteration_mean"], _, _ = mean_std([seconds_per_iteration(r) for r in g.runs])
        for k in PROBE_METRICS:
            row[f"{k}_mean"], _, _ = mean_std([probe_means(r)[k] for r in g.runs])
        if threshold is not None:
            hits = [time_to_threshold(r, threshold, window) for r in g.runs]
            row["steps_to_threshold_mean"], row["steps_to_threshold_std"], n = mean_std([h[0] for h in hits])
            row["wall_to_threshold_mean"], row["wall_to_threshold_std"], _ = mean_std([h[1] for h in hits])
            row["reached"] = f"{n}/{len(g.runs)}"
        row["runs"] = ";".join(str(r.path) for r in g.runs)
        out.append(row)
    for policy, vals in references.items():
        row = {"label": f"{policy} (reference)", "algorithm": policy, "n_seeds": None, "reference": True}
        for k, ref_key in ({k: k for k in FINAL_METRICS} | HELD_OUT_REFERENCE_KEYS).items():
            row[f"{k}_mean"], row[f"{k}_std"] = vals.get(ref_key, math.nan), math.nan
            _put(row, f"{k}_iqm", Interval(vals.get(ref_key, math.nan), math.nan, math.nan, 1))
        out.append(row)
    notes = [level_note] if level_note else []
    return Comparison(out, threshold, window, opt, [f.label for f in focus], level, notes)


def fmt_ci(value: float, lo: float, hi: float, digits: int = 1, scale: float = 1.0) -> str:
    """'value [lo, hi]' ('value' alone without a CI, '-' for none); +inf as 'never' / '∞' (not reached)."""

    def one(v: float) -> str:
        return "∞" if v == math.inf else f"{v * scale:,.{digits}f}"

    if not _finite(value) and value != math.inf:
        return "-"
    text = "never" if value == math.inf else one(value)
    return text if math.isnan(lo) or math.isnan(hi) else f"{text} [{one(lo)}, {one(hi)}]"


def has_held_out(cmp: Comparison) -> bool:
    """Whether any row (group or reference) has a held-out evaluation value: else no such columns."""
    return any(_finite(r.get(f"{k}_iqm")) for r in cmp.rows for k in HELD_OUT_METRICS)


def _columns(cmp: Comparison) -> list[tuple[str, str]]:
    """(header, key) of the displayed columns."""
    cols = [
        ("run group", "label"),
        ("seeds", "n_seeds"),
        ("final travel time (s)", "mean_travel_time"),
        ("final return", "mean_return"),
        ("final arrival rate (%)", "arrival_rate"),
    ]
    cols += [(f"P({f} better): travel time", f"poi:{f}") for f in cmp.focus]
    if has_held_out(cmp):
        cols += [
            ("held-out travel time, greedy (s)", "eval_time_censored"),
            ("held-out arrival (%)", "eval_arrival_rate"),
        ]
        cols += [(f"P({f} better): held-out time", f"poi_eval:{f}") for f in cmp.focus]
    if cmp.level is not None:
        lv = cmp.level
        cols += [
            (f"env steps to {lv.label} ({_g1(lv.value)} s)", "steps_to_level_iqm"),
            (f"reached {_g1(lv.value)} s", "level_reached"),
        ]
    if cmp.threshold is not None:
        cols += [
            (f"env steps to {_g1(cmp.threshold)} s", "steps_to_threshold"),
            (f"wall time to {_g1(cmp.threshold)} s (s)", "wall_to_threshold"),
            ("reached", "reached"),
        ]
    cols += [("iterations", "iterations_mean"), ("env steps", "env_steps_mean"), ("wall time (s)", "wall_s_mean")]
    return cols


# (scale, digits) of the IQM [CI] cells
_IQM_FORMAT = {"mean_travel_time": (1.0, 1), "arrival_rate": (100.0, 1), "mean_return": (1.0, 2),
               "eval_time_censored": (1.0, 1), "eval_arrival_rate": (100.0, 1)}  # fmt: skip


def _cell(row: dict[str, Any], key: str) -> str:
    if key in _IQM_FORMAT:
        scale, digits = _IQM_FORMAT[key]
        k = f"{key}_iqm"
        return fmt_ci(row.get(k, math.nan), row.get(f"{k}_lo", math.nan), row.get(f"{k}_hi", math.nan), digits, scale)
    if key.startswith(("poi:", "poi_eval:")):
        kind, _, focus = key.partition(":")
        iv = row.get("poi", {}).get(focus, {}).get("mean_travel_time" if kind == "poi" else HELD_OUT_POI)
        return fmt_ci(iv.value, iv.lo, iv.hi, 2) if iv else "-"
    if key == "steps_to_level_iqm":
        return fmt_ci(row.get(key, math.nan), row.get(f"{key}_lo", math.nan), row.get(f"{key}_hi", math.nan), 0)
    if key in ("steps_to_threshold", "wall_to_threshold"):
        return fmt_pm(row.get(f"{key}_mean", math.nan), row.get(f"{key}_std", math.nan), 0)
    v = row.get(key)
    if key in ("env_steps_mean", "iterations_mean", "wall_s_mean"):
        return fmt_num(v, 0 if key != "wall_s_mean" else 1)
    return "-" if v is None or v == "" else str(v)


def _g1(v: float) -> str:
    """Seconds to 0.1 s, without trailing zeros (540, 498.9)."""
    return f"{round(v, 1):g}"


_METRIC_WORDS = {
    "mean_time_censored": "travel time with every agent counted (an unfinished one until the horizon)",
    "mean_travel_time": "travel time of the agents that arrived",
}


def compare_notes(cmp: Comparison) -> list[str]:
    """What each number of the table is (the same text under the Markdown table and in the report)."""
    o, w = cmp.options, cmp.window
    ci = f"95% percentile-bootstrap CI over seeds ({o.reps} resamples, seed {o.seed})"
    notes = [
        f"Final travel time, return, arrival rate: each run's mean over its last {w} iterations, then the IQM "
        "over the group's seeds (interquartile mean: the mean after dropping floor(n/4) seeds at each end, "
        f"so the plain mean below 4 seeds) [{ci}; no CI for one seed]. Mean and sample std are in the CSV."
    ]
    if cmp.focus:
        notes.append(
            "P(X better): probability that a seed of group X beats a seed of the row's group on final travel "
            "time (lower is better): the share of all (X seed, row seed) pairs where X's is lower, ties counting "
            f"1/2 [{ci}, both groups resampled]; 0.5 = no difference. The CSV adds return and arrival rate "
            "(higher is better)."
        )
    else:
        notes.append("No probability of improvement: no group is --focus (default: the reled groups).")
    if has_held_out(cmp):
        poi = (
            " 'P(X better): held-out time': as above, on this held-out time (CSV: p_better[X]_eval_time_censored)."
            if cmp.focus
            else ""
        )
        notes.append(
            "Held-out travel time and arrival (greedy): the greedy policy at the run's last evaluation (every "
            "eval.every iterations and at the last iteration) on the held-out scenarios: seeds training never saw, "
            "for a given run seed the same for every algorithm and for the reference rows (the reference policies "
            "on those scenarios, from references.json). The travel time counts every agent, an unfinished one "
            "until the horizon (losing agents does not make a policy look fast); arrival: the share of agents "
            f"that arrived. IQM [{ci}] over the seeds that evaluated ('-': none did).{poi}"
        )
    lv = cmp.level
    if lv is not None:
        notes.append(
            f"Sample efficiency: env steps at which a run's trailing {w}-iteration mean {_METRIC_WORDS[lv.metric]} "
            f"first is <= {_g1(lv.value)} s, {lv.fraction:g} of the way from {lv.start} ({_g1(lv.start_value)} s) to "
            f"{lv.target} ({_g1(lv.target_value)} s) (the references' same metric on the runs' scenarios); "
            f"({lv.target_value:g} s); IQM [{ci}]. A run that never gets there counts as infinitely many steps "
            "(worst), so it can only make its group look slower: the IQM reads 'never' when a seed it keeps "
            "never got there (below 4 seeds: any seed), a CI bound '∞' when resamples do. "
            f"'reached {_g1(lv.value)} s': runs that got there / runs."
        )
    if cmp.threshold is not None:
        notes.append(f"Threshold: trailing {w}-iteration mean travel time <= {_g1(cmp.threshold)} s "
                     "(mean ± std over the seeds that reached it).")  # fmt: skip
    return notes + cmp.notes


def to_markdown(cmp: Comparison, bad: Sequence[str] = ()) -> str:
    cols = _columns(cmp)
    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    for r in cmp.rows:
        lines.append("| " + " | ".join(_cell(r, k).replace("|", "\\|") for _, k in cols) + " |")
    notes = compare_notes(cmp) + [f"Skipped (unreadable): {b}" for b in bad]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


CSV_FIELDS = [
    *("label", "algorithm", "reference", "n_seeds", "seeds", "agents"),
    *(f"{k}_{s}" for k in (*FINAL_METRICS, *HELD_OUT_METRICS) for s in ("mean", "std", "iqm", "iqm_lo", "iqm_hi")),
    *("steps_to_level_iqm", "steps_to_level_iqm_lo", "steps_to_level_iqm_hi", "level_reached"),
    *(f"{k}_to_threshold_{s}" for k in ("steps", "wall") for s in ("mean", "std")),
    *("reached", "iterations_mean", "env_steps_mean", "wall_s_mean", "s_per_iteration_mean"),
    *(f"{k}_mean" for k in PROBE_METRICS),
]


def _csv_value(v: Any) -> Any:
    if isinstance(v, float) and v == math.inf:
        return "inf"  # never reached: not the same as missing
    return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def to_csv(cmp: Comparison) -> str:
    """Raw numbers; the probability of improvement as p_better[FOCUS]_METRIC (+ _lo, _hi) per focus group."""
    poi_fields = [
        f"p_better[{f}]_{k}{s}" for f in cmp.focus for k in (*FINAL_METRICS, HELD_OUT_POI) for s in ("", "_lo", "_hi")
    ]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[*CSV_FIELDS, *poi_fields, "runs"], extrasaction="ignore",
                       lineterminator="\n")  # fmt: skip
    w.writeheader()
    for r in cmp.rows:
        flat = dict(r)
        for f, by_metric in r.get("poi", {}).items():
            for k, iv in by_metric.items():
                flat |= {f"p_better[{f}]_{k}": iv.value, f"p_better[{f}]_{k}_lo": iv.lo, f"p_better[{f}]_{k}_hi": iv.hi}
        w.writerow({k: _csv_value(v) for k, v in flat.items()})
    return buf.getvalue()


def to_html(cmp: Comparison) -> str:
    """The table and its notes."""
    cols = _columns(cmp)
    head = "".join(f"<th>{html.escape(h)}</th>" for h, _ in cols)
    body = []
    for r in cmp.rows:
        cls = ' class="ref"' if r.get("reference") else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(_cell(r, k))}</td>" for _, k in cols) + "</tr>")
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in compare_notes(cmp))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table><ul>{notes}</ul>"

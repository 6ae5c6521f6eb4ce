"""`reled-hpc analyze summary | curves | compare | sed | scaling | report`."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reled_hpc.errors import ReledError

if TYPE_CHECKING:
    from .tables import RobustOptions

X_CHOICES = ("env_steps", "wall_s", "iteration")


def _warn(messages: list[str]) -> None:
    """Damaged or skipped files: named on stderr; the analysis goes on with what is readable."""
    for m in messages:
        print(f"reled-hpc: warning: {m}", file=sys.stderr)


def _jsonable(v: Any) -> Any:
    """NaN/inf as null: json.dumps would write NaN, which is not JSON."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    return v


def _dump_paths(items: list[str]) -> list[Path]:
    """Dump files, run folders (their trajectories.h5) or sweep folders (every dump under them)."""
    from reled_hpc.experiment.run_dir import dump_path

    from .load import find_runs

    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir() and not dump_path(p).is_file():
            out += find_runs(p)
        else:
            out.append(p)
    return out


def _references(args: argparse.Namespace, near: list[Path], levels: int) -> dict[str, dict[str, float]]:
    from .load import find_references, merge_references, parse_ref_args, read_references

    path = Path(args.references) if args.references else find_references(near, levels=levels)
    from_file = read_references(path) if path else {}
    return merge_references(from_file, parse_ref_args(getattr(args, "ref", []) or []))


# ---------------------------------------------------------------------------- commands
def cmd_summary(args: argparse.Namespace) -> int:
    from .load import open_dump, run_data
    from .tables import render_kv, run_summary, summary_lines

    with open_dump(args.run) as d:
        s = run_summary(run_data(d), d, rows=not args.no_rows)
    _warn(s["problems"])
    if args.json:
        print(json.dumps(_jsonable(s), indent=2))
    else:
        print(render_kv(summary_lines(s)))
    return 0


def cmd_curves(args: argparse.Namespace) -> int:
    from .load import group_runs, load_runs
    from .plots import check_output, plot_curves, save

    out = check_output(args.output)
    paths = _dump_paths(args.runs)
    runs, bad = load_runs(paths)
    _warn(bad + [p for r in runs for p in r.problems])
    if not runs:
        raise ReledError("no readable dump among: " + ", ".join(map(str, paths)))
    refs = _references(args, paths, levels=3)
    metrics = args.metric or ["mean_return", "mean_travel_time", "arrival_rate"]
    known = {k for r in runs for k in r.metrics}
    unknown = [m for m in metrics if m not in known]
    if unknown:
        raise ReledError(f"no metric {unknown} in these dumps; they have: {', '.join(sorted(known))}")
    groups = group_runs(runs)
    save(plot_curves(groups, metrics, args.x, refs, args.title), out)
    print(f"wrote {out}: {len(runs)} runs in {len(groups)} groups ({', '.join(g.label for g in groups)})")
    return 0


def _robust_options(args: argparse.Namespace) -> RobustOptions:
    from .tables import RobustOptions

    return RobustOptions(focus=args.focus, fraction=args.efficiency_fraction, target=args.efficiency_target,
                         metric=args.efficiency_metric, reps=args.bootstrap_reps,
                         seed=args.bootstrap_seed)  # fmt: skip


def cmd_compare(args: argparse.Namespace) -> int:
    from .load import default_threshold, group_runs, load_sweep
    from .tables import compare, to_csv, to_markdown

    sweep = load_sweep(args.sweep, args.references)
    _warn(sweep.bad + [p for r in sweep.runs for p in r.problems])
    threshold = default_threshold(sweep.references, args.threshold_travel_time)
    cmp = compare(group_runs(sweep.runs), sweep.references, threshold, args.window, _robust_options(args))
    md = to_markdown(cmp, sweep.bad)
    print(md, end="")
    for path, text in ((args.output, md), (args.csv, to_csv(cmp) if args.csv else "")):
        if path:
            _write(path, text)
    return 0


def _write(path: str, text: str) -> None:
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    except OSError as exc:
        raise ReledError(f"{path}: cannot write ({exc})") from exc
    print(f"wrote {path}", file=sys.stderr)


def cmd_sed(args: argparse.Namespace) -> int:
    from .load import open_dump, run_data
    from .plots import check_output, plot_sed, save
    from .rows import recompute_hpo
    from .stats import read_programs

    out = check_output(args.output)
    with open_dump(args.run) as d:
        run = run_data(d)
        if not run.has_sed and not run.rows["expert"]:
            _warn(run.problems)
            raise ReledError(
                f"{run.path}: no SED/HPO data (algorithm {run.algorithm}: no programs, alpha, DTW, RVI, PDI or "
                "execution rate, no expert rows)"
            )
        recomputed, notes = recompute_hpo(d, run, force=args.recompute_dtw)
        progs = read_programs(d)
    _warn(run.problems + notes)
    save(plot_sed(run, progs, recomputed, args.title), out)
    what = f", alpha/DTW of {len(recomputed['iteration'])} iterations recomputed from the rows" if recomputed else ""
    print(f"wrote {out}: {run.n_iterations} iterations, {len(progs['iteration'])} programs{what}")
    return 0


def cmd_scaling(args: argparse.Namespace) -> int:
    from .load import group_runs, load_sweep
    from .plots import check_output, plot_scaling, save

    out = check_output(args.output)
    sweep = load_sweep(args.sweep)
    _warn(sweep.bad + [p for r in sweep.runs for p in r.problems])
    groups = group_runs(sweep.runs, ignore=("agents", "ranks"))
    counts = sorted({r.total_agents for r in sweep.runs if r.total_agents is not None})
    if len(counts) < 2:
        _warn([f"{sweep.root}: only one agent count ({counts}); the scaling plot has one point per group"])
    save(plot_scaling(groups, args.title), out)
    print(f"wrote {out}: agent counts {counts}, {len(groups)} groups")
    if args.table or args.csv:
        from .scaling import scaling_csv, scaling_markdown, scaling_rows

        rows, notes = scaling_rows(groups, args.efficiency_fraction)
        md = scaling_markdown(rows, notes)
        print(md, end="")
        for path, text in ((args.table, md), (args.csv, scaling_csv(rows) if args.csv else "")):
            if path:
                _write(path, text)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .load import default_threshold, load_sweep
    from .report import build_report, write_report

    if Path(args.output).suffix.lower() not in (".html", ".htm"):
        raise ReledError(f"{args.output}: the report is HTML; name it *.html")
    sweep = load_sweep(args.sweep, args.references)
    threshold = default_threshold(sweep.references, args.threshold_travel_time)
    page, problems = build_report(sweep, threshold, max_sed=args.max_sed_plots, options=_robust_options(args))
    _warn(problems)
    out = write_report(page, args.output)
    print(f"wrote {out} ({len(page) / 1e6:.1f} MB): {len(sweep.runs)} runs")
    return 0


# ---------------------------------------------------------------------------- parser
def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _fraction(text: str) -> float:
    v = float(text)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {v}")
    return v


def _add_robust_options(p: argparse.ArgumentParser) -> None:
    """The options of the robust statistics, shared by compare and report."""
    p.add_argument("--focus", metavar="ALGO|LABEL",
                   help="group(s) whose probability of improvement over each other group is tabulated: a group "
                   "label, or an algorithm (all its groups); default: the reled groups, if any")  # fmt: skip
    p.add_argument("--efficiency-fraction", type=_fraction, default=0.5, metavar="F",
                   help="sample efficiency: env steps to a travel time F of the way from the random reference "
                   "to the DUE reference (default 0.5)")  # fmt: skip
    p.add_argument("--efficiency-target", default="due", metavar="POLICY",
                   help="the reference the sample-efficiency level heads to (default due; without it in the "
                   "references: shortest_path, fastest_path or free_flow, said in the notes)")  # fmt: skip
    p.add_argument("--efficiency-metric", choices=("mean_time_censored", "mean_travel_time"),
                   default="mean_time_censored",
                   help="the travel time of the sample-efficiency level (default mean_time_censored: every agent "
                   "counted, unfinished ones until the horizon; mean_travel_time: arrived agents only)")  # fmt: skip
    p.add_argument("--bootstrap-reps", type=_positive_int, default=2000, metavar="N",
                   help="bootstrap resamples of the 95%% CIs (default 2000)")  # fmt: skip
    p.add_argument(
        "--bootstrap-seed", type=int, default=0, metavar="SEED", help="bootstrap seed (default 0): same seed, same CIs"
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `analyze` subcommand to the main parser."""
    a = sub.add_parser(
        "analyze",
        help="offline analysis of HDF5 dumps: summary, curves, compare, sed, scaling, report",
        description="Offline analysis of runs' trajectories.h5 dumps (docs/analysis.md). Reads lazily: "
        "per-iteration metrics in full, decision rows chunk by chunk. A truncated or damaged dump is "
        "named on stderr and its readable part analysed.",
    )
    asub = a.add_subparsers(dest="analyze_command", required=True, metavar="COMMAND")

    s = asub.add_parser(
        "summary",
        help="config, progress, final metrics and SED statistics of one run",
        description="Config (algorithm, map, agents, traffic, seed, ranks), committed iterations, env steps, "
        "wall time, final metrics (mean of the last 5 iterations), row statistics (streamed) and SED "
        "statistics (programs, execution rate, RVI/PDI before and after refinement, LLM latency, tokens).",
    )
    s.add_argument("run", metavar="RUN.h5", help="a trajectories.h5, or a run folder holding one")
    s.add_argument("--json", action="store_true", help="print JSON (NaN as null) instead of a table")
    s.add_argument("--no-rows", action="store_true", help="skip the pass over the decision rows (faster on big dumps)")
    s.set_defaults(func=cmd_summary)

    c = asub.add_parser(
        "curves",
        help="learning curves over seeds (mean and 95%% CI) with reference lines",
        description="Learning curves of one or more runs, grouped by config minus the seed (label: algorithm "
        "and the keys that differ), mean and 95%% t confidence band over seeds on a common x grid. "
        "Reference lines from --ref or a references.json next to the runs (or up to 3 folders above).",
    )
    c.add_argument("runs", nargs="+", metavar="RUN.h5", help="dumps, run folders or sweep folders")
    c.add_argument("-o", "--output", required=True, metavar="OUT.png|svg|pdf", help="figure file")
    c.add_argument("--x", choices=X_CHOICES, default="env_steps", help="x axis (default env_steps)")
    c.add_argument(
        "--metric",
        action="append",
        metavar="NAME",
        help="metrics column to plot, repeatable (default: mean_return, mean_travel_time, arrival_rate)",
    )
    c.add_argument(
        "--ref",
        action="append",
        default=[],
        metavar="POLICY[.METRIC]=VALUE",
        help="reference line, e.g. shortest_path=299.9 (travel time, s) or random.arrival_rate=0.4; "
        "overrides references.json",
    )
    c.add_argument("--references", metavar="JSON", help="references file (default: a references.json near the runs)")
    c.add_argument("--title", help="figure title")
    c.set_defaults(func=cmd_curves)

    m = asub.add_parser(
        "compare",
        help="table of a sweep: final metrics over seeds (IQM, bootstrap CI), probability of improvement, "
        "sample efficiency, time to a travel-time threshold",
        description="Find every trajectories.h5 under SWEEP_DIR, group the runs by config minus the seed, and "
        "tabulate final travel time, return and arrival rate (IQM over seeds with a 95%% bootstrap CI; mean ± "
        "std in the CSV), the probability that the --focus group beats each other group, the env steps to a "
        "travel time between the random and DUE references (sample efficiency), and the env steps and wall "
        "time to first reach the travel-time threshold (default: the shortest_path reference of "
        "SWEEP_DIR/references.json). Markdown on stdout; unreadable runs are named and skipped.",
    )
    m.add_argument("sweep", metavar="SWEEP_DIR")
    m.add_argument("-o", "--output", metavar="table.md", help="also write the Markdown table here")
    m.add_argument("--csv", metavar="table.csv", help="also write the table as CSV (raw numbers)")
    m.add_argument("--threshold-travel-time", type=float, metavar="S", help="travel-time threshold (s)")
    m.add_argument("--references", metavar="JSON", help="references file (default: SWEEP_DIR/references.json)")
    m.add_argument("--window", type=_positive_int, default=5, help="iterations averaged for final values (default 5)")
    _add_robust_options(m)
    m.set_defaults(func=cmd_compare)

    d = asub.add_parser(
        "sed",
        help="RVI, PDI, alpha, DTW and execution rate over iterations; external change vs RVI bound",
        description="SED/HPO figure of one run: RVI and PDI of the kept plans and of round 1 with their "
        "thresholds, program execution rate, alpha and DTW, and the measured external return change against "
        "the RVI bound (y = x line). alpha/DTW missing from the metrics are recomputed from the rows, one "
        "iteration at a time.",
    )
    d.add_argument("run", metavar="RUN.h5", help="a trajectories.h5, or a run folder holding one")
    d.add_argument("-o", "--output", required=True, metavar="OUT.png|svg|pdf", help="figure file")
    d.add_argument(
        "--recompute-dtw",
        action="store_true",
        help="recompute alpha/DTW from the rows for every iteration (to check the metrics)",
    )
    d.add_argument("--title", help="figure title")
    d.set_defaults(func=cmd_sed)

    k = asub.add_parser(
        "scaling",
        help="final travel time and seconds per iteration against the total agent count",
        description="For the runs under SWEEP_DIR, grouped by config minus seed, agent count and ranks: final "
        "travel time and median seconds per iteration against the total agent count (dist.total_agents if "
        "> 0, else env.n_agents x ranks).",
    )
    k.add_argument("sweep", metavar="SWEEP_DIR")
    k.add_argument("-o", "--output", required=True, metavar="OUT.png|svg|pdf", help="figure file")
    k.add_argument("--title", help="figure title")
    k.add_argument("--table", metavar="OUT.md", help="also write the scaling table (analysis/scaling.py) as Markdown")
    k.add_argument("--csv", metavar="OUT.csv", help="also write the scaling table as CSV")
    k.add_argument("--efficiency-fraction", type=_fraction, default=0.5, metavar="F",
                   help="table: env steps to F of the way from the untrained policy to the best final travel "
                   "time of the same agent count (default 0.5)")  # fmt: skip
    k.set_defaults(func=cmd_scaling)

    r = asub.add_parser(
        "report",
        help="one self-contained HTML page: comparison, curves, SED plots, scaling",
        description="Write one HTML file with everything inline (figures as base64 PNG): the comparison table, "
        "learning curves vs env steps and wall time, scaling when there are several agent counts, the SED "
        "figure of each run with SED/HPO data, and the problems met.",
    )
    r.add_argument("sweep", metavar="SWEEP_DIR")
    r.add_argument("-o", "--output", required=True, metavar="report.html")
    r.add_argument("--threshold-travel-time", type=float, metavar="S", help="travel-time threshold (s)")
    r.add_argument("--references", metavar="JSON", help="references file (default: SWEEP_DIR/references.json)")
    r.add_argument("--max-sed-plots", type=_positive_int, default=12, help="at most this many SED figures")
    _add_robust_options(r)
    r.set_defaults(func=cmd_report)

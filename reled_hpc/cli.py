"""`reled-hpc` command line. Every subcommand has --help."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import ReledError

log = logging.getLogger("reled_hpc")


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _print_table(rows: list[dict[str, Any]], keys: list[str]) -> None:
    widths = {k: max(len(k), *(len(_fmt(r.get(k, ""))) for r in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        print("  ".join(_fmt(r.get(k, "")).ljust(widths[k]) for k in keys))


# ---- map -----------------------------------------------------------------------------------------
def cmd_map_build(args: argparse.Namespace) -> int:
    from .sim.maps import build_from_osm, build_grid, build_map
    from .sim.osm import download_place

    out = Path(args.out) if args.out else None
    t0 = time.perf_counter()
    if args.grid:
        bundle = build_grid(number=args.grid, length=args.grid_length, out=out)
    elif args.place:
        from .sim.maps import cache_dir

        xml = cache_dir() / "downloads" / (args.place.replace("/", "_").replace(" ", "_") + ".osm")
        if not xml.exists():
            log.info("downloading %r with osmnx (needs internet)", args.place)
            download_place(args.place, xml)
        bundle = build_from_osm(xml, out=out, name=args.name)
    elif args.source:
        bundle = build_map(args.source, out=out, name=args.name, scc_only=args.scc_only)
    else:
        raise ReledError("map build needs an OSM file, a SUMO network (.net.xml, .edg.xml, folder), --place or --grid")
    m = bundle.manifest
    state = "cached (no work done)" if bundle.cached else f"built in {time.perf_counter() - t0:.1f} s"
    print(f"map {m['name']}: {state}\n  folder: {bundle.folder}")
    kept = "keeping the largest strongly connected component"
    if not m.get("strongly_connected", True):
        kept += f" ({m['core_edges']} edges) and the edges into and out of it"
    print(
        f"  SUMO edges: {m['sumo_edges']} (of {m['sumo_edges_raw']} before {kept}), "
        f"lane-km: {m['lane_km']}, scale: {m['scale_m']} m"
    )
    if "dropped" in m:
        _print_dropped(m["dropped"])
    return 0


def _print_dropped(d: dict[str, Any]) -> None:
    """What netconvert left out of a SUMO input (manifest `dropped`)."""
    print(f"  netconvert: {d['netconvert']}" + (f" ({' '.join(d['options'])})" if d.get("options") else ""))
    lost = [f"file {f}" for f in d["files"]]
    for kind in ("edges", "connections", "traffic_lights"):
        n, ids = d[kind]["count"], d[kind]["ids"]
        if n:
            more = f", ... ({n - 5} more)" if n > 5 else ""
            lost.append(f"{kind.replace('_', ' ')}: {n} ({', '.join(ids[:5])}{more})")
    print("  dropped from the input: " + ("; ".join(lost) if lost else "nothing"))
    if d["messages"]:
        print("  netconvert said (why a strict build failed, what was tolerated or dropped):")
    for line in d["messages"][:5]:
        print(f"    {line}")
    if len(d["messages"]) > 5:
        print(f"    ... {len(d['messages']) - 5} more in manifest.json")


def cmd_map_info(args: argparse.Namespace) -> int:
    from .sim.maps import resolve_map

    bundle = resolve_map(args.map)
    print(json.dumps({"folder": str(bundle.folder), **bundle.manifest}, indent=2))
    return 0


# ---- reference policies ----------------------------------------------------------------------------
def _progress(env_horizon: float, label: str):
    """A tqdm bar over simulated time on a terminal; log lines every 10% otherwise."""
    from tqdm import tqdm

    if sys.stderr.isatty():
        bar = tqdm(total=int(env_horizon), desc=label, unit="sim-s", leave=False)

        def update(env) -> None:
            bar.n = int(env.time)
            bar.set_postfix(arrived=sum(s.status == "arrived" for s in env.agents_state.values()), refresh=False)
            bar.refresh()

        update.close = bar.close  # type: ignore[attr-defined]
        return update
    marks = {"next": 0.1}

    def update_plain(env) -> None:
        if env.time >= marks["next"] * env_horizon:
            log.info(
                "%s: %.0f%% of the horizon (t=%.0f s), %d agents active",
                label,
                100 * marks["next"],
                env.time,
                len(env.agents),
            )
            marks["next"] += 0.1

    update_plain.close = lambda: None  # type: ignore[attr-defined]
    return update_plain


def evaluate_policies(
    policies: list[str], map_name: str, agents: int, traffic: str, horizon: float, seed: int, episodes: int
) -> list[dict[str, Any]]:
    from .sim.env import EnvConfig, NavigationEnv
    from .sim.maps import resolve_map
    from .sim.policies import make_policy, run_episode

    bundle = resolve_map(map_name)
    cfg = EnvConfig(map=map_name, n_agents=agents, traffic=traffic, horizon_s=horizon, seed=seed)  # type: ignore[arg-type]
    rows = []
    with NavigationEnv(cfg, bundle) as env:
        for name in policies:
            for ep in range(episodes):
                progress = _progress(horizon, f"{name} ep{ep}")
                t0 = time.perf_counter()
                m = run_episode(env, make_policy(name, env, seed), seed=seed + ep, progress=progress)
                progress.close()  # type: ignore[attr-defined]
                rows.append({"policy": name, "episode": ep, "wall_s": round(time.perf_counter() - t0, 2), **m})
    return rows


ROW_KEYS = [
    "policy",
    "episode",
    "agents",
    "arrival_rate",
    "mean_travel_time",
    "mean_return",
    "arrived",
    "failed",
    "truncated",
    "bg_mean_travel_time",
    "bg_teleports",
    "wall_s",
]


def cmd_run_policy(args: argparse.Namespace) -> int:
    rows = evaluate_policies(args.policy, args.map, args.agents, args.traffic, args.horizon, args.seed, args.episodes)
    if args.json:
        print(json.dumps(rows))
    else:
        _print_table(rows, ROW_KEYS)
    return 0


def _launch_ranks(args: argparse.Namespace) -> int:
    """`train --ranks R` outside MPI: run this same command under mpiexec with R ranks."""
    from .dist.comm import mpiexec_command, run_ranks

    argv, rest = [], iter(sys.argv[1:])
    for a in rest:  # the same command line without --ranks R / --ranks=R
        if a == "--ranks":
            next(rest, None)
        elif not a.startswith("--ranks="):
            argv.append(a)
    cmd = mpiexec_command(args.ranks, argv)
    log.info("launching %d ranks: %s", args.ranks, " ".join(cmd))
    return run_ranks(cmd)  # signals reach the ranks; returns once they checkpointed and exited


def _print_config_help() -> int:
    """`train --help-config`: every config key with its type, default and docstring, by section."""
    from .config import format_config_help
    from .experiment.config import TrainConfig
    from .launch.spec import SlurmSpec  # `slurm:` is a free-form mapping there, checked as SlurmSpec

    print("Config keys of `reled-hpc train` (set in CONFIG.yaml, or with --set KEY=VALUE), with their defaults.\n")
    print("\n".join(format_config_help(TrainConfig, sections={"slurm": SlurmSpec})))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if args.help_config:
        return _print_config_help()
    from .dist.comm import launched_with_mpi
    from .experiment.config import parse_overrides
    from .experiment.train import train

    if args.ranks > 1 and not launched_with_mpi():
        return _launch_ranks(args)
    overrides = parse_overrides(args.set)
    if args.name:
        overrides["name"] = args.name
    if args.resume:
        run_dir, last = train(None, resume=Path(args.resume), overrides=overrides)  # type: ignore[arg-type]
    elif args.config:
        run_dir, last = train(args.config, overrides=overrides)
    else:
        raise ReledError("train needs a CONFIG.yaml or --resume RUN_DIR")
    if last is None:  # not the learner rank: rank 0 reports
        return 0
    print(f"run folder: {run_dir}")
    if last:
        print(
            f"last iteration {int(last['iteration'])}: mean travel time {last['mean_travel_time']:.1f} s, "
            f"arrival rate {last['arrival_rate']:.1%}, mean return {last['mean_return']:.2f}"
        )
    return 0


def cmd_demo_policies(args: argparse.Namespace) -> int:
    print(
        f"reled-hpc {__version__} demo: reference policies on the shipped map of central Helsinki "
        f"(© OpenStreetMap contributors), {args.agents} agents, {args.traffic} traffic"
    )
    rows = evaluate_policies(
        ["shortest_path", "random"], "helsinki", args.agents, args.traffic, args.horizon, args.seed, 1
    )
    _print_table(rows, ROW_KEYS)
    sp = rows[0]
    print(f"\nshortest_path: mean travel time {sp['mean_travel_time']:.1f} s, arrival rate {sp['arrival_rate']:.1%}")
    return 0


# ---- export ----------------------------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    """`export RUN`: committed rows of a dump's groups as Parquet or CSV files (reled_hpc/io/export.py)."""
    import warnings

    from .errors import DumpError
    from .experiment.run_dir import DUMP_FILE, dump_path
    from .io import TrajectoryReader, cut_short
    from .io import schema as S
    from .io.export import default_output, export_group

    given = Path(args.run)
    if not given.exists():
        raise DumpError(f"{given}: no such run folder or dump file")
    dump = dump_path(given)
    if not dump.is_file():
        raise DumpError(f"{given}: a folder without {DUMP_FILE}; give a run folder or its dump file")
    short = cut_short(dump)
    if short:  # TrajectoryReader's SWMR open would retry every read past the cut for minutes
        raise DumpError(f"{dump}: {short}; export reads intact dumps only (`reled-hpc analyze summary` "
                        "reads the readable part)")  # fmt: skip
    if args.chunk_rows < 1:
        raise ReledError(f"--chunk-rows must be >= 1, got {args.chunk_rows}")
    groups = [args.group] if args.group else list(S.ALL_GROUPS)
    folder = dump.parent / "export"
    if args.out and not args.group:
        folder = Path(args.out)
        if folder.exists() and not folder.is_dir():
            raise ReledError(f"{folder}: not a folder; without --group, --out names the folder of the files")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        reader = TrajectoryReader(dump)
    for w in caught:  # rows of an unfinished iteration (a live or killed run): not exported, said so
        print(f"reled-hpc: note: {w.message}", file=sys.stderr)
    with reader:
        for group in groups:
            out = Path(args.out) if args.out and args.group else default_output(folder, group, args.format)
            res = export_group(reader, group, args.format, out, chunk_rows=args.chunk_rows)
            side = f" (units: {res.units_path})" if res.units_path else " (units in the field metadata)"
            print(f"wrote {res.path}: {res.rows} rows x {res.columns} columns{side}")
    return 0


# ---- parser ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reled-hpc", description="RELED multi-agent navigation on SUMO city networks.")
    p.add_argument("--version", action="version", version=f"reled-hpc {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    pm = sub.add_parser("map", help="build and inspect maps").add_subparsers(dest="map_command", required=True)
    b = pm.add_parser(
        "build",
        help="build a map folder (SUMO net + routing graph) from OSM, a SUMO network or a grid",
        description="Build a map folder. Cached by content: building the same input twice does no work. "
        "A folder holding both a .net.xml and plain XML is built from the .net.xml (docs/maps.md).",
    )
    b.add_argument(
        "source",
        nargs="?",
        help="OSM extract (.osm, .osm.pbf), SUMO network (.net.xml[.gz]), plain-XML edges (.edg.xml, with its "
        ".nod/.con/.tll/.typ.xml siblings) or a folder holding a SUMO network",
    )
    b.add_argument("--place", help="download a place's drive network with osmnx (needs internet)")
    b.add_argument("--grid", type=int, metavar="N", help="a SUMO netgenerate grid of N x N junctions")
    b.add_argument("--grid-length", type=float, default=200.0, help="grid street length (m)")
    b.add_argument("--out", help="output folder (default: the cache, $RELED_HPC_CACHE or ~/.cache/reled_hpc)")
    b.add_argument("--name", help="map name (default: from the file name)")
    b.add_argument(
        "--scc-only",
        action="store_true",
        help="SUMO input: keep only the largest strongly connected component, dropping the entry and exit "
        "edges around it (OSM maps always are)",
    )
    b.set_defaults(func=cmd_map_build)
    i = pm.add_parser("info", help="print a map's manifest")
    i.add_argument("map", help="'helsinki', 'grid', 'ingolstadt', a map folder, an OSM file or SUMO input")
    i.set_defaults(func=cmd_map_info)

    r = sub.add_parser(
        "run-policy", help="run reference policies (random, shortest_path, fastest_path, free_flow, due)"
    )
    r.add_argument(
        "--policy",
        nargs="+",
        default=["shortest_path"],
        choices=["random", "shortest_path", "fastest_path", "free_flow", "due"],
    )
    r.add_argument("--map", default="helsinki")
    r.add_argument("--agents", type=int, default=100)
    r.add_argument("--traffic", default="light", choices=["none", "light", "medium", "heavy"])
    r.add_argument("--horizon", type=float, default=1200.0, help="episode horizon (simulated s)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--episodes", type=int, default=1)
    r.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    r.set_defaults(func=cmd_run_policy)

    t = sub.add_parser(
        "train",
        help="train from a YAML config (ippo, mappo, qmix, reled)",
        description="Train from CONFIG.yaml into runs/<name>/ (HDF5 dump, checkpoints, TensorBoard, "
        "log). SIGTERM/SIGINT checkpoint and exit; --resume continues the run.",
    )
    t.add_argument("config", nargs="?", help="experiment config (see configs/)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR (its config.yaml)")
    t.add_argument("--name", help="run name (folder under runs_dir)")
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, dotted (repeatable): --set env.n_agents=50 --set iterations=10",
    )
    t.add_argument(
        "--ranks",
        type=int,
        default=1,
        help="local MPI ranks: relaunch under mpiexec -n R (under mpiexec/srun the ranks are given)",
    )
    t.add_argument(
        "--help-config", action="store_true", help="print every config key with its type, default and meaning, and exit"
    )
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("demo", help="the main job on the embedded default (what `make demo` runs)")
    d.add_argument("--config", default="configs/quickstart.yaml", help="training config of the demo")
    d.add_argument("--ranks", type=int, default=2, help="local MPI ranks of the training job (1: no MPI)")
    d.add_argument("--policies-only", action="store_true", help="only run the reference policies")
    d.add_argument("--agents", type=int, default=100, help="agents for --policies-only")
    d.add_argument("--traffic", default="light", choices=["none", "light", "medium", "heavy"])
    d.add_argument("--horizon", type=float, default=1200.0)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser(
        "serve-llm",
        help="serve an LLM (embedded llama.cpp on CPU, or vLLM on a GPU node) and write its endpoint file",
        description="Start an OpenAI-compatible LLM server as a child, wait until it answers, write "
        "RUN_DIR/endpoint.json for the training job, and run until SIGTERM/SIGINT (then stop it).",
    )
    from .llm.server import add_server_arguments  # the flags come from ServerConfig's fields

    add_server_arguments(s)
    s.set_defaults(func=cmd_serve_llm)

    x = sub.add_parser(
        "export",
        help="write a dump's groups as Parquet or CSV (obs spread into one column per feature, with units)",
        description="Export the committed rows of a run's HDF5 dump as flat tables for pandas, Arrow or a "
        "spreadsheet: obs and action_mask become one column per feature (obs.<feature>, action_mask.cand<j>), "
        "strings are text, booleans booleans. Units and descriptions go into the Parquet field metadata, or "
        "for CSV into a sidecar <name>.units.json. Rows are streamed, so dumps larger than memory export "
        "(docs/hdf5_schema.md, 'Export').",
    )
    x.add_argument("run", help="a run folder (holding trajectories.h5) or a dump file")
    x.add_argument("--format", required=True, choices=["parquet", "csv"], help="output format")
    x.add_argument(
        "--group",
        choices=["agent", "expert", "metrics", "programs"],
        help="export only this group (default: all four, one file each)",
    )
    x.add_argument(
        "--out",
        help="with --group: the output file; without: the folder of the files (default: RUN/export/, "
        "files named <group>.<format>)",
    )
    x.add_argument("--chunk-rows", type=int, default=65536, help="rows read and written at a time (memory bound)")
    x.set_defaults(func=cmd_export)

    from .launch.cli import register as register_launch  # submit, sweep, status (SLURM via submitit)

    register_launch(sub)
    from analysis.cli import register as register_analysis  # offline analysis of HDF5 dumps

    register_analysis(sub)
    return p


def cmd_serve_llm(args: argparse.Namespace) -> int:
    from .llm.server import serve, server_config_from_args

    return serve(server_config_from_args(args))


def cmd_demo(args: argparse.Namespace) -> int:
    """Train the demo config (RELED with SED's LLM expert on the embedded CPU server) on the shipped
    Helsinki map; print the travel-time trend against the shortest-path and random references on the
    same scenarios, then what SED did (programs, execution rate, RVI/PDI, LLM latency) from the dump."""
    if args.policies_only:
        return cmd_demo_policies(args)
    from .experiment.config import agent_counts, load_config
    from .experiment.references import reference_travel_time
    from .experiment.run_dir import RunDir
    from .experiment.train import train

    t_start = time.perf_counter()
    cfg = load_config(args.config)
    cfg.name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    from .experiment.algorithms import get_algorithm

    if not get_algorithm(cfg.algorithm).uses_expert or cfg.hpo.expert == "none":
        expert = "no expert"
    elif cfg.uses_llm:
        where = cfg.llm.endpoint or "the embedded llama.cpp server on CPU"
        expert = (
            f"LLM expert {cfg.llm.model} on {where}: SED {cfg.sed.mode} mode, m={cfg.sed.m} subsets, up to "
            f"{cfg.sed.r_max_rounds} rounds, a new scenario and refinement cycle every "
            f"{cfg.hpo.scenario_period} iterations"
        )
    else:
        expert = f"{cfg.hpo.oracle_policy} oracle expert"
    print(
        f"reled-hpc {__version__} demo: training {cfg.algorithm} ({expert}) on {cfg.env.map} "
        f"(© OpenStreetMap contributors), {sum(agent_counts(cfg, args.ranks))} agents, "
        f"{cfg.env.traffic} traffic, "
        f"{cfg.iterations} iterations -> {cfg.runs_dir}/{cfg.name}"
    )
    refs = {p: reference_travel_time(cfg, p, ranks=args.ranks) for p in ("shortest_path", "random")}
    if args.ranks > 1:
        from .dist.comm import launched_with_mpi, mpiexec_command, run_ranks

        if launched_with_mpi():
            raise ReledError("run the demo itself without mpiexec: it starts its ranks with --ranks")
        cmd = mpiexec_command(args.ranks, ["train", args.config, "--name", cfg.name])
        print(f"{args.ranks} local MPI ranks: {' '.join(cmd)}")
        if run_ranks(cmd) != 0:
            raise ReledError("the demo's training job failed (see the messages above)")
        run = RunDir(Path(cfg.runs_dir) / cfg.name)
    else:
        run = RunDir(train(cfg)[0])
    from .io import TrajectoryReader

    with TrajectoryReader(run.dump) as reader:
        m = reader.metrics()
    tt, ar = m["mean_travel_time"], m["arrival_rate"]
    k = max(1, len(tt) // 5)
    print("\ntravel-time trend (mean of each fifth of the run):")
    for i in range(0, len(tt), k):
        sl = slice(i, i + k)
        print(
            f"  iterations {int(m['iteration'][sl][0]):3d}-{int(m['iteration'][sl][-1]):3d}: "
            f"{np.nanmean(tt[sl]):7.1f} s, arrival {np.nanmean(ar[sl]):.1%}"
        )
    print("references on the scenarios of the last 5 iterations:")
    for p, r in refs.items():
        print(f"  {p:14s}: {r['mean_travel_time']:7.1f} s, arrival {r['arrival_rate']:.1%}")
    last5 = slice(max(len(tt) - 5, 0), len(tt))
    print(
        f"  {cfg.algorithm} (last 5 iterations, sampling policy): {np.nanmean(tt[last5]):7.1f} s, "
        f"arrival {np.nanmean(ar[last5]):.1%}"
    )
    if cfg.uses_llm:
        from .expert.summary import format_sed_summary, summarise_sed

        print()
        print("\n".join(format_sed_summary(summarise_sed(run.dump), cfg.sed)))
    print(f"run folder: {run}  (HDF5 dump, checkpoints, TensorBoard: tensorboard --logdir {run.tensorboard})")
    print(f"demo wall time: {time.perf_counter() - t_start:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S"
    )
    try:
        return int(args.func(args) or 0)
    except ReledError as exc:
        print(f"reled-hpc: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

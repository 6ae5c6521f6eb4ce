"""`reled-hpc submit | sweep | status`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

RESOURCE_FLAGS = (  # flag, SlurmSpec field, type, help
    ("--cluster", "cluster", str, "slurm (default), local (subprocesses here) or debug (in this process)"),
    ("--nodes", "nodes", int, "nodes"),
    ("--ntasks-per-node", "ntasks_per_node", int, "MPI ranks per node"),
    ("--cpus-per-task", "cpus_per_task", int, "CPUs per rank"),
    ("--mem-gb", "mem_gb", float, "memory per node (GB)"),
    ("--time", "time_min", int, "wall limit in minutes (the job checkpoints and requeues at the limit)"),
    ("--partition", "partition", str, "partition"),
    ("--account", "account", str, "account"),
    ("--qos", "qos", str, "quality of service"),
    ("--gres", "gres", str, "generic resources, e.g. gpu:1"),
    ("--mpi", "mpi", str, "srun --mpi plugin (default pmi2; see `srun --mpi=list`)"),
    ("--signal-delay", "signal_delay_s", int, "seconds before the limit when the job is told to checkpoint"),
    ("--array-parallelism", "array_parallelism", int, "sweeps: tasks running at once"),
)


def _add_resources(p: argparse.ArgumentParser, prefix: str = "") -> None:
    g = p.add_argument_group("resources" if not prefix else "LLM server job resources")
    for flag, dest, tp, help_ in RESOURCE_FLAGS:
        if prefix and dest in ("cluster", "mpi", "array_parallelism", "signal_delay_s", "nodes"):
            continue
        kw: dict[str, Any] = {"type": tp, "dest": prefix + dest, "help": help_ + " (default: config's slurm:)"}
        if dest == "cluster":
            kw["choices"] = ["slurm", "local", "debug"]
        g.add_argument("--" + prefix.replace("_", "-") + flag[2:], **kw)


def _resources(args: argparse.Namespace, prefix: str = "") -> dict[str, Any]:
    return {dest: getattr(args, prefix + dest, None) for _, dest, _, _ in RESOURCE_FLAGS}


def _wait(job: Any) -> None:
    print(f"waiting for job {job.job_id} ...", flush=True)
    result = job.result()
    print(f"job {job.job_id} done: {result}")


def cmd_submit(args: argparse.Namespace) -> int:
    from ..experiment.config import parse_overrides
    from ..experiment.run_dir import RunDir
    from .submit import submit

    if not args.config and not args.resume:
        from ..errors import ReledError

        raise ReledError("submit needs a CONFIG.yaml or --resume RUN_DIR")
    llm_res = _resources(args, "llm_")
    if args.cluster and not llm_res.get("cluster"):
        llm_res["cluster"] = args.cluster
    t0 = time.perf_counter()
    s = submit(
        args.config,
        name=args.name,
        overrides=parse_overrides(args.set),
        resume=Path(args.resume) if args.resume else None,
        resources=_resources(args),
        llm=args.llm,
        llm_model=args.llm_model,
        llm_resources=llm_res,
        llm_args=args.llm_arg,
    )
    if s.server_job_id:
        print(f"LLM server job {s.server_job_id} ({args.llm}): endpoint file {RunDir(s.run_dir).llm / 'endpoint.json'}")
    print(f"training job {s.job_id} submitted in {time.perf_counter() - t0:.1f} s: run folder {s.run_dir}")
    print(f"  follow it: reled-hpc status {s.run_dir}   logs: {s.run_dir / 'submitit'}")
    if args.wait:
        _wait(s.job)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import dump_plan, submit_sweep

    rec = submit_sweep(
        args.sweep, out=args.out, resources=_resources(args), dry_run=args.dry_run, plan_only=args.plan_only
    )
    n = len(rec["tasks"])
    if args.plan_only:
        tasks = Path(rec["sweep_dir"]) / "tasks.txt"
        print(f"sweep {rec['name']}: {n} task configs in {rec['sweep_dir']}/configs, listed in {tasks}; to submit:")
        print(
            f"  sbatch --array=0-{n - 1}%{rec['spec']['array_parallelism']} --export=ALL,SWEEP_DIR={rec['sweep_dir']} "
            "slurm/sweep_array.sbatch"
        )
        return 0
    if args.dry_run:
        print(f"sweep {rec['name']}: {n} tasks -> {rec['sweep_dir']} (dry run, nothing submitted)")
        print(dump_plan(rec), end="")
        return 0
    print(f"sweep {rec['name']}: {n} tasks as job array {rec['array_id']} -> {rec['sweep_dir']}")
    print(f"  follow it: reled-hpc status {rec['sweep_dir']}")
    if args.wait:
        failed = 0
        for job in rec["jobs"]:
            try:
                job.result()
            except Exception as exc:  # report every task, then fail
                failed += 1
                print(f"task {job.job_id} failed: {str(exc).strip().splitlines()[-1]}")
        print(f"{n - failed}/{n} tasks completed")
        return 1 if failed else 0
    return 0


def cmd_references(args: argparse.Namespace) -> int:
    from .references import REFERENCES_FILE, sweep_references

    out = sweep_references(args.sweep_dir, tuple(args.policy), last=args.last)
    for p in args.policy:
        m = out[p]
        tt, ar, ret = m["mean_travel_time"], m["arrival_rate"], m["mean_return"]
        print(f"{p:14s} travel {tt:7.1f} s  arrival {ar:.1%}  return {ret:.2f}")
    print(f"-> {Path(args.sweep_dir) / REFERENCES_FILE}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .status import collect, format_status

    while True:
        st = collect(args.path)
        print(json.dumps(st, indent=1, default=str) if args.json else format_status(st), flush=True)
        active = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING"}
        if not args.watch or not active & set(st["counts"]):
            return 0
        time.sleep(args.watch)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the launch subcommands to the main parser."""
    from .references import POLICIES  # plain data: light to import

    s = sub.add_parser(
        "submit",
        help="submit a training run to SLURM (submitit), optionally with an LLM server job",
        description="Validate the config and the resources (sbatch --test-only), then submit the "
        "training job: srun starts one rank per task. Resources come from the config's slurm: section, "
        "overridden by the flags. The job checkpoints and requeues itself at its time limit.",
    )
    s.add_argument("config", nargs="?", help="experiment config (see configs/)")
    s.add_argument("--name", help="run name (folder under runs_dir)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (dotted)")
    s.add_argument("--resume", metavar="RUN_DIR", help="submit the continuation of an existing run folder")
    _add_resources(s)
    s.add_argument(
        "--llm",
        choices=["vllm", "embedded"],
        help="first submit an LLM server job (serve-llm) and point SED at it; vllm needs a GPU (--llm-gres)",
    )
    s.add_argument("--llm-model", help="server model (vllm: HF id or path; embedded: registry name or GGUF)")
    s.add_argument("--llm-arg", action="append", default=[], help="extra serve-llm argument, repeatable")
    _add_resources(s, "llm_")
    s.add_argument("--wait", action="store_true", help="wait for the job and print its result")
    s.set_defaults(func=cmd_submit)

    w = sub.add_parser(
        "sweep",
        help="submit a grid of runs (algorithm x seed x agents ...) as one job array",
        description="Expand SWEEP.yaml (base config, grid, set, slurm), validate every task, write the "
        "sweep folder and submit one job array. See reled_hpc/launch/sweep.py for the file format.",
    )
    w.add_argument("sweep", help="sweep file (YAML)")
    w.add_argument("--out", help="parent of the sweep folder (default: the file's `out`, else sweeps/)")
    w.add_argument("--dry-run", action="store_true", help="validate and list the tasks; submit nothing")
    w.add_argument("--plan-only", action="store_true", help="write the sweep folder for slurm/sweep_array.sbatch")
    w.add_argument("--wait", action="store_true", help="wait for every task")
    _add_resources(w)
    w.set_defaults(func=cmd_sweep)

    rf = sub.add_parser(
        "references",
        help="reference policies on a sweep's scenarios -> SWEEP_DIR/references.json (for analyze)",
    )
    rf.add_argument("sweep_dir")
    rf.add_argument("--policy", nargs="+", default=list(POLICIES), help="reference policies (default: %(default)s)")
    rf.add_argument("--last", type=int, default=5, help="scenarios of the runs' last N iterations")
    rf.set_defaults(func=cmd_references)

    st = sub.add_parser("status", help="states, progress and failures of a submitted run or sweep")
    st.add_argument("path", help="a sweep folder or a submitted run folder")
    st.add_argument("--json", action="store_true")
    st.add_argument("--watch", type=float, metavar="S", help="repeat every S seconds while jobs are active")
    st.set_defaults(func=cmd_status)

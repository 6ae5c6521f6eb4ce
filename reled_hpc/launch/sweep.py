"""`reled-hpc sweep SWEEP.yaml`: a grid of runs (algorithm x seed x agent count x traffic ...) as
ONE job array. Each task trains in its own run folder under one sweep folder:

    SWEEP_DIR/sweep.yaml      the sweep file as given       SWEEP_DIR/configs/<task>.yaml  each task's config
    SWEEP_DIR/sweep.json      tasks, job ids, resources     SWEEP_DIR/runs/<task>/         each task's run folder
    SWEEP_DIR/tasks.txt       one config per line (for slurm/sweep_array.sbatch)

The sweep file:

    name: cmp20                   # folder under `out`
    base: ../reled.yaml           # base config, relative to this file
    out: sweeps                   # default: sweeps
    set: {iterations: 40}         # overrides for every task (dotted keys)
    grid:                         # the product of these lists
      algorithm: [ippo, mappo, qmix, reled]
      seed: [0, 1, 2]
      dist.total_agents: [20, 100]
      # variant: named override sets, for settings that only make sense together, e.g.
      # - {name: reled-llm, algorithm: reled, hpo.expert: llm}
      # - {name: reled-nofeedback, algorithm: reled, hpo.expert: llm, sed.feedback: false}
    slurm: {ntasks_per_node: 1, time_min: 60, array_parallelism: 4}
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import from_dict, load_yaml, require
from ..errors import ConfigError, ReledError
from .records import SWEEP_FILE
from .spec import SlurmSpec, check_feasible, spec_from
from .submit import check_config, make_executor

VARIANT = "variant"  # grid key whose values are named override sets


@dataclass
class SweepFile:
    name: str
    base: str
    grid: dict[str, list[Any]]
    out: str = "sweeps"
    set: dict[str, Any] = field(default_factory=dict)
    slurm: dict[str, Any] = field(default_factory=dict)

    def validate(self, where: str = "sweep") -> None:
        require(bool(re.fullmatch(r"[\w.+-]+", self.name)), f"{where}.name", "letters, digits, . _ + - only")
        require(bool(self.grid), f"{where}.grid", "needs at least one key with a list of values")
        for k, v in self.grid.items():
            require(isinstance(v, list) and len(v) >= 1, f"{where}.grid.{k}", "must be a non-empty list")
            require(len(set(map(repr, v))) == len(v), f"{where}.grid.{k}", f"repeats a value: {v}")
        require(not set(self.grid) & set(self.set), f"{where}", "a key is in both grid and set")
        for i, v in enumerate(self.grid.get(VARIANT, [])):
            require(
                isinstance(v, dict) and isinstance(v.get("name"), str) and len(v) >= 2,
                f"{where}.grid.{VARIANT}[{i}]",
                "must be a mapping with a `name` and at least one dotted key",
            )


@dataclass
class Task:
    index: int
    name: str
    values: dict[str, Any]
    cfg: Any  # TrainConfig
    run_dir: Path


def _short(key: str, value: Any) -> str:
    if key == VARIANT:
        return re.sub(r"[^\w.+-]+", "_", value["name"])
    leaf = key.rsplit(".", 1)[-1]
    text = f"{value}" if leaf == "algorithm" else f"{leaf}{value}"
    return re.sub(r"[^\w.+-]+", "_", text)


def plan(path: Path | str, out: Path | str | None = None) -> tuple[SweepFile, Path, list[Task]]:
    """Expand and validate every task's config (nothing is written)."""
    from ..experiment.config import load_config

    path = Path(path)
    sw = from_dict(SweepFile, load_yaml(path), str(path))
    base = (path.parent / sw.base).resolve()
    if not base.exists():
        raise ConfigError(f"{path}: base config {base} does not exist")
    sweep_dir = (Path(out) if out else Path(sw.out)).resolve() / sw.name
    keys = list(sw.grid)
    tasks = []
    for i, combo in enumerate(itertools.product(*(sw.grid[k] for k in keys))):
        values = dict(zip(keys, combo, strict=True))
        name = "-".join(_short(k, v) for k, v in values.items())
        sets = {k: v for k, v in values.items() if k != VARIANT}
        if VARIANT in values:
            sets.update({k: v for k, v in values[VARIANT].items() if k != "name"})
        try:
            cfg = load_config(base, {**sw.set, **sets})
        except ConfigError as exc:
            raise ConfigError(f"{path}: task {name}: {exc}") from exc
        cfg.name = name
        cfg.runs_dir = str(sweep_dir / "runs")
        cfg.validate(f"{path}: task {name}")
        tasks.append(Task(i, name, values, cfg, sweep_dir / "runs" / name))
    return sw, sweep_dir, tasks


def submit_sweep(
    path: Path | str,
    *,
    out: Path | str | None = None,
    resources: dict[str, Any] | None = None,
    dry_run: bool = False,
    plan_only: bool = False,
) -> dict[str, Any]:
    """Plan, validate (configs and resources), write the sweep folder, submit one job array.
    `dry_run`: validate only; `plan_only`: also write the folder (for slurm/sweep_array.sbatch)."""
    from ..experiment.config import config_yaml
    from .jobs import TrainJob

    sw, sweep_dir, tasks = plan(path, out)
    spec: SlurmSpec = spec_from(sw.slurm, f"{path}: slurm", **(resources or {}))
    for t in tasks:
        check_config(t.cfg, spec, f"{path}: task {t.name}")
    if (sweep_dir / SWEEP_FILE).exists() and not dry_run:
        raise ReledError(f"sweep folder {sweep_dir} already holds a sweep: give the sweep another name or --out")
    if not plan_only:
        check_feasible(spec, array=len(tasks))
    record: dict[str, Any] = {
        "kind": "sweep",
        "name": sw.name,
        "sweep_dir": str(sweep_dir),
        "cluster": spec.cluster,
        "spec": dataclasses.asdict(spec),
        "tasks": [
            {
                "index": t.index,
                "name": t.name,
                "values": t.values,
                "run_dir": str(t.run_dir),
                "iterations": t.cfg.iterations,
            }
            for t in tasks
        ],
    }
    if dry_run:
        return record
    (sweep_dir / "configs").mkdir(parents=True, exist_ok=True)
    (sweep_dir / "sweep.yaml").write_text(Path(path).read_text())
    for t in tasks:
        (sweep_dir / "configs" / f"{t.name}.yaml").write_text(config_yaml(t.cfg))
    (sweep_dir / "tasks.txt").write_text("".join(f"{sweep_dir / 'configs' / t.name}.yaml\n" for t in tasks))
    if plan_only:
        (sweep_dir / "plan.json").write_text(json.dumps(record, indent=1))
        return record
    ex = make_executor(sweep_dir / "submitit", spec)
    with ex.batch():  # one job array, at most array_parallelism tasks at once
        jobs = [ex.submit(TrainJob(t.cfg, str(t.run_dir), max_requeues=spec.max_requeues)) for t in tasks]
    for rec, job in zip(record["tasks"], jobs, strict=True):
        rec["job_id"] = str(job.job_id)
    record["array_id"] = str(jobs[0].job_id).split("_")[0]
    record["submitted"] = time.time()
    (sweep_dir / SWEEP_FILE).write_text(json.dumps(record, indent=1))
    record["jobs"] = jobs
    return record


def dump_plan(record: dict[str, Any]) -> str:
    rows = [{"task": t["name"], **t["values"]} for t in record["tasks"]]
    return yaml.safe_dump(rows, sort_keys=False)

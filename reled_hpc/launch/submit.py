"""`reled-hpc submit`: one training run as a SLURM job through submitit (optionally with an LLM
server job in front of it). Everything is validated before anything is queued."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from ..errors import ConfigError, ReledError
from .records import SUBMIT_FILE
from .spec import SlurmSpec, check_feasible, spec_from

if TYPE_CHECKING:
    from ..experiment.run_dir import RunDir
    from ..llm.server import ServerConfig

log = logging.getLogger("reled_hpc.launch")

LLM_SECTION = "llm_server"  # slurm.llm_server: resources of the LLM server job


@dataclass
class Submitted:
    run_dir: Path
    job_id: str
    server_job_id: str | None
    job: Any  # submitit Job (result(), state, cancel())


def make_executor(folder: Path, spec: SlurmSpec) -> Any:
    import submitit

    folder.mkdir(parents=True, exist_ok=True)
    ex = submitit.AutoExecutor(folder=folder, cluster=spec.cluster)
    ex.update_parameters(**spec.executor_parameters())
    return ex


def check_config(cfg: Any, spec: SlurmSpec, where: str) -> None:
    """What would only fail once the job runs, refused now."""
    from ..experiment.config import agent_counts
    from ..sim.maps import BUILTIN_MAPS

    try:
        agent_counts(cfg, spec.ntasks)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    m = cfg.env.map
    if m not in BUILTIN_MAPS and not Path(m).expanduser().exists():
        raise ConfigError(f"{where}: env.map {m!r} is neither a built-in map ({', '.join(BUILTIN_MAPS)}) nor a path")


def llm_server_spec(cfg: Any, where: str, **overrides: Any) -> SlurmSpec:
    section = dict(cfg.slurm.get(LLM_SECTION) or {})
    base = {k: v for k, v in cfg.slurm.items() if k in ("cluster", "account", "qos", "setup")}
    spec = spec_from({**base, "job_name": "reled-llm", **section}, f"{where}: slurm.{LLM_SECTION}", **overrides)
    return spec


class _RefusingParser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting: submit reports it as a ConfigError."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


# set by submit itself: the backend by --llm (the GPU check depends on it), the run folder and a live
# server by the training job that waits for the endpoint file
_SUBMIT_OWNS = ("backend", "run_dir", "dry_run")


def server_config(
    backend: str, model: str | None, llm_dir: Path, spec: SlurmSpec, extra: list[str], where: str
) -> ServerConfig:
    """The server job's serve-llm options: the backend, the model, the run's llm folder and, for vLLM,
    one pipeline stage per node of the job; then the --llm-arg extras ("--max-num-seqs=8", or "--port",
    "9000"), parsed by serve-llm's own (generated) parser, so a bad one is refused before queueing."""
    from ..llm.server import ServerConfig, add_server_arguments, server_config_from_args

    base = ServerConfig(
        backend=backend, model=model, run_dir=str(llm_dir), nodes=spec.nodes if backend == "vllm" else 1
    )
    parser = add_server_arguments(_RefusingParser(prog="serve-llm", add_help=False))
    parser.set_defaults(**dataclasses.asdict(base))
    try:
        cfg = server_config_from_args(parser.parse_args(extra))
    except ConfigError as exc:
        raise ConfigError(f"{where}: --llm-arg {shlex.join(extra)}: {exc} (see reled-hpc serve-llm --help)") from None
    owned = [f"--{k.replace('_', '-')}" for k in _SUBMIT_OWNS if getattr(cfg, k) != getattr(base, k)]
    if owned:
        raise ConfigError(f"{where}: --llm-arg may not set {', '.join(owned)}: submit sets it (--llm, the run folder)")
    return cfg


def submit(
    config: str | Path,
    *,
    name: str | None = None,
    overrides: dict[str, Any] | None = None,
    resume: Path | None = None,
    resources: dict[str, Any] | None = None,
    llm: str | None = None,
    llm_model: str | None = None,
    llm_resources: dict[str, Any] | None = None,
    llm_args: list[str] | None = None,
) -> Submitted:
    """Validate, then submit. `resources` are SlurmSpec fields from the command line (None = from
    the config's `slurm:` section or the default); `llm` is None, "vllm" or "embedded"."""
    from ..experiment.config import TrainConfig, load_config
    from ..experiment.run_dir import RunDir

    where = str(config)
    if resume is not None:
        run = RunDir(Path(resume).resolve()).require_run()
        run_dir = run.path
        cfg: TrainConfig = load_config(run.config)
        where = str(run.config)
    else:
        cfg = load_config(config, overrides)
        if name:
            cfg.name = name
            cfg.validate()
        run = RunDir((Path(cfg.runs_dir) / cfg.name).resolve())
        run_dir = run.path
        if run.is_run() or run.has_dump():
            _check_replaceable(run)
    section = {k: v for k, v in cfg.slurm.items() if k != LLM_SECTION}
    spec = spec_from(section, f"{where}: slurm", **(resources or {}))
    check_config(cfg, spec, where)
    server_spec: SlurmSpec | None = None
    server_cfg: ServerConfig | None = None
    if llm:
        if not cfg.uses_llm:
            raise ConfigError(f"{where}: --llm needs algorithm reled with hpo.expert llm (the SED expert)")
        server_spec = llm_server_spec(cfg, where, **(llm_resources or {}))
        if llm == "vllm" and server_spec.cluster == "slurm" and not server_spec.gres:
            raise ConfigError(f"{where}: the vLLM server job needs a GPU: set slurm.{LLM_SECTION}.gres or --llm-gres")
        server_cfg = server_config(llm, llm_model, run.llm, server_spec, list(llm_args or []), where)
        check_feasible(server_spec)
    check_feasible(spec)

    # nothing was queued until here
    run_dir.mkdir(parents=True, exist_ok=True)
    server_id = None
    if server_spec is not None and server_cfg is not None:
        llm_dir = run.llm
        # a stale endpoint file from an earlier server must not be mistaken for the new one
        (llm_dir / "endpoint.json").unlink(missing_ok=True)
        from .jobs import ServerJob

        sjob = make_executor(run_dir / "submitit-llm", server_spec).submit(ServerJob(server_cfg))
        server_id = str(sjob.job_id)
        log.info("LLM server job %s (%s): serve-llm %s", server_id, llm, shlex.join(server_cfg.to_argv()))
        cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, endpoint=str(llm_dir)))
        if llm_model and llm == "vllm":
            cfg.llm.model = llm_model
    from .jobs import TrainJob

    try:
        job = make_executor(run_dir / "submitit", spec).submit(
            TrainJob(cfg, str(run_dir), max_requeues=spec.max_requeues, server_job=server_id)
        )
    except Exception:
        if server_id:
            from .jobs import cancel_job

            cancel_job(server_id)
        raise
    record = {
        "kind": "run",
        "run_dir": str(run_dir),
        "job_id": str(job.job_id),
        "server_job_id": server_id,
        "cluster": spec.cluster,
        "iterations": cfg.iterations,
        "spec": dataclasses.asdict(spec),
        "submitted": time.time(),
        "argv": sys.argv,
    }
    jobs = json.loads((run_dir / SUBMIT_FILE).read_text()) if (run_dir / SUBMIT_FILE).exists() else []
    (run_dir / SUBMIT_FILE).write_text(json.dumps([*jobs, record], indent=1))
    return Submitted(run_dir, str(job.job_id), server_id, job)


# states of a job that may still start or is running: its folder is not free yet
_ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "UNKNOWN")


def _check_replaceable(run: RunDir) -> None:
    """A folder holding a run may take a new submission only when that run committed nothing (it
    failed in iteration 0) and no job of it may still run; the new job's `train` then moves the old
    files into replaced-<time>/. Otherwise ReledError saying why and what to do."""
    why = run.committed()
    if why:
        raise ReledError(
            f"run folder {run.path} already holds a run ({why}): pass --resume {run.path} or another --name"
        )
    if (run.path / SUBMIT_FILE).exists():
        from .status import collect

        last = collect(run.path)["runs"][0]
        if last["state"].split()[0] in _ACTIVE_STATES:
            raise ReledError(
                f"run folder {run.path}: its job {last['job']} is {last['state']} and may still write there; "
                f"wait for it or cancel it (scancel {last['job']}), or pass another --name"
            )
    log.info("run folder %s holds a run that committed nothing: the new job moves its files into replaced-*/", run.path)

"""SLURM resources of a job: from a config's `slurm:` section, a sweep file and the command line.

Everything is checked before anything is queued: types and ranges here, and what the cluster can
actually give (partition, nodes, CPUs, GPUs, time) with `sbatch --test-only`, which asks the real
scheduler without creating a job.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any, Literal

from ..config import from_dict, require
from ..errors import ConfigError, ReledError

CLUSTERS = ("slurm", "local", "debug")


@dataclass
class SlurmSpec:
    """Resources and scheduling of one job (or of every task of a job array)."""

    cluster: Literal["slurm", "local", "debug"] = "slurm"  # submitit: local = subprocess, debug = in-process
    nodes: int = 1
    ntasks_per_node: int = 1  # MPI ranks per node
    cpus_per_task: int = 1
    mem_gb: float = 0.0  # per node; 0 = the partition's default
    time_min: int = 60  # wall limit; jobs checkpoint and requeue when it runs out
    partition: str = ""
    account: str = ""
    qos: str = ""
    gres: str = ""  # e.g. gpu:1 (the vLLM server job)
    mpi: str = "pmi2"  # srun --mpi=... (`srun --mpi=list` shows what the cluster offers)
    signal_delay_s: int = 120  # the timeout signal comes this long before the limit: one iteration must fit
    max_requeues: int = 5  # timeouts/preemptions after which the job stops requeueing
    array_parallelism: int = 16  # sweeps: tasks running at once
    job_name: str = "reled"
    setup: list[str] = field(default_factory=list)  # shell lines run before the job (module load ...)
    extra: dict[str, Any] = field(default_factory=dict)  # further sbatch options, e.g. {constraint: a100}

    def validate(self, where: str = "slurm") -> None:
        require(self.cluster in CLUSTERS, f"{where}.cluster", f"must be one of {', '.join(CLUSTERS)}")
        for key in ("nodes", "ntasks_per_node", "cpus_per_task", "time_min", "array_parallelism"):
            require(getattr(self, key) >= 1, f"{where}.{key}", f"must be >= 1, got {getattr(self, key)}")
        require(self.mem_gb >= 0, f"{where}.mem_gb", "must be >= 0")
        require(self.max_requeues >= 0, f"{where}.max_requeues", "must be >= 0")
        require(
            0 <= self.signal_delay_s < self.time_min * 60,
            f"{where}.signal_delay_s",
            f"must be in [0, time_min*60={self.time_min * 60}), got {self.signal_delay_s}",
        )
        require(bool(re.fullmatch(r"[\w.+-]+", self.job_name)), f"{where}.job_name", "letters, digits, . _ + - only")
        require(bool(re.fullmatch(r"[\w-]+", self.mpi)), f"{where}.mpi", f"not an srun --mpi value: {self.mpi!r}")

    @property
    def ntasks(self) -> int:
        return self.nodes * self.ntasks_per_node

    def with_overrides(self, **kw: Any) -> SlurmSpec:
        """A copy with the given non-None fields replaced, validated."""
        data = dataclasses.asdict(self)
        data.update({k: v for k, v in kw.items() if v is not None})
        return from_dict(SlurmSpec, data, "slurm")

    # ---- submitit --------------------------------------------------------------------------------
    def executor_parameters(self) -> dict[str, Any]:
        """Parameters for submitit's AutoExecutor.update_parameters (cluster-independent names where
        submitit has them, slurm_* otherwise)."""
        p: dict[str, Any] = {
            "name": self.job_name,
            "nodes": self.nodes,
            "tasks_per_node": self.ntasks_per_node,
            "cpus_per_task": self.cpus_per_task,
            "timeout_min": self.time_min,
        }
        if self.mem_gb:
            p["mem_gb"] = self.mem_gb
        if self.cluster != "slurm":
            return p
        p["slurm_signal_delay_s"] = self.signal_delay_s
        p["slurm_srun_args"] = [f"--mpi={self.mpi}"]
        p["slurm_array_parallelism"] = self.array_parallelism
        if self.partition:
            p["slurm_partition"] = self.partition
        if self.setup:
            p["slurm_setup"] = list(self.setup)
        extra = {k.replace("_", "-"): v for k, v in self.extra.items()}
        for key in ("account", "qos", "gres"):
            if getattr(self, key):
                extra[key] = getattr(self, key)
        extra.setdefault("requeue", True)
        p["slurm_additional_parameters"] = extra
        return p

    def sbatch_flags(self) -> list[str]:
        """The same request as sbatch flags (for `sbatch --test-only` and the templates)."""
        flags = [
            f"--job-name={self.job_name}",
            f"--nodes={self.nodes}",
            f"--ntasks-per-node={self.ntasks_per_node}",
            f"--cpus-per-task={self.cpus_per_task}",
            f"--time={self.time_min}",
        ]
        if self.mem_gb:
            flags.append(f"--mem={int(self.mem_gb * 1024)}M")
        for key in ("partition", "account", "qos", "gres"):
            if getattr(self, key):
                flags.append(f"--{key}={getattr(self, key)}")
        for k, v in self.extra.items():
            k = k.replace("_", "-")
            flags.append(f"--{k}" if v is True else f"--{k}={v}")
        return flags


def spec_from(section: dict[str, Any] | None, where: str, **overrides: Any) -> SlurmSpec:
    """A validated SlurmSpec from a config section plus command-line overrides (None = not given)."""
    spec = from_dict(SlurmSpec, dict(section or {}), where)
    return spec.with_overrides(**overrides) if any(v is not None for v in overrides.values()) else spec


def check_feasible(spec: SlurmSpec, array: int = 0) -> None:
    """Ask the scheduler whether it could ever run this request (`sbatch --test-only`): a missing
    partition, too many nodes/CPUs/GPUs or a time over the partition limit fail here, before any
    job is queued. Nothing to check for the local and debug executors."""
    if spec.cluster != "slurm":
        return
    if shutil.which("sbatch") is None:
        raise ReledError(
            "cluster 'slurm' needs the SLURM client tools (sbatch not found on PATH); "
            "use --cluster local to run here, or slurm/local/start.sh for a single-node SLURM"
        )
    cmd = ["sbatch", "--test-only", *spec.sbatch_flags()]
    if array:
        cmd.append(f"--array=0-{array - 1}%{min(array, spec.array_parallelism)}")
    cmd += ["--wrap", "true"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as exc:
        raise ReledError("sbatch --test-only did not answer in 60 s: is slurmctld up?") from exc
    text = (out.stderr + out.stdout).strip()
    # success prints "sbatch: Job N to start at ..." on stderr with exit 0
    if out.returncode != 0 or "error" in text.lower():
        msg = text.replace("sbatch: error: ", "").splitlines()
        raise ConfigError(
            f"the cluster refuses this request ({' '.join(spec.sbatch_flags())}): {'; '.join(msg) or 'no reason given'}"
        )

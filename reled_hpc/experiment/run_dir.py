"""The run folder: where a training run keeps its config, dump, checkpoints and logs.

RUN_DIR/config.yaml          the run's config (written at start; `--resume` reads it)
RUN_DIR/trajectories.h5      the HDF5 dump (docs/hdf5_schema.md)
RUN_DIR/checkpoints/         ckpt_<iteration>.pt, the last `keep_checkpoints`
RUN_DIR/expert_cache/        the current scenario's policy-dependent expert demonstrations
RUN_DIR/tb/                  TensorBoard scalars
RUN_DIR/train.log            the log of rank 0
RUN_DIR/llm_server.log       the embedded LLM server's log, when training started one
RUN_DIR/llm/                 a submitted LLM server job's endpoint.json and log
RUN_DIR/submitit*/           SLURM job files, submit.json, requeues.json (reled_hpc.launch)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ReledError

CONFIG_FILE = "config.yaml"
DUMP_FILE = "trajectories.h5"
CHECKPOINT_DIR = "checkpoints"
EXPERT_CACHE_DIR = "expert_cache"
TENSORBOARD_DIR = "tb"
LOG_FILE = "train.log"
LLM_SERVER_LOG = "llm_server.log"
LLM_DIR = "llm"


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def dump(self) -> Path:
        return self.path / DUMP_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINT_DIR

    @property
    def expert_cache(self) -> Path:
        return self.path / EXPERT_CACHE_DIR

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD_DIR

    @property
    def log(self) -> Path:
        return self.path / LOG_FILE

    @property
    def llm_server_log(self) -> Path:
        return self.path / LLM_SERVER_LOG

    @property
    def llm(self) -> Path:
        return self.path / LLM_DIR

    def is_run(self) -> bool:
        """A run was started here (its config was written)."""
        return self.config.is_file()

    def has_dump(self) -> bool:
        return self.dump.is_file()

    def require_run(self) -> RunDir:
        """Self, or ReledError when the folder holds no run (for --resume)."""
        if not self.is_run():
            raise ReledError(f"{self.path} is not a run folder (no {CONFIG_FILE})")
        return self

    def __str__(self) -> str:
        return str(self.path)


def dump_path(path: str | Path) -> Path:
    """A dump file as given, or the dump of a run folder."""
    p = Path(path)
    return p / DUMP_FILE if p.is_dir() else p

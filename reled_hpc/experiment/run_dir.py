"""The run folder: where a training run keeps its config, dump, checkpoints and logs.

RUN_DIR/config.yaml          the run's config (written at start; `--resume` reads it)
RUN_DIR/trajectories.h5      the HDF5 dump (docs/hdf5_schema.md); with several ranks (dist.dump sharded) the
                             master of virtual datasets over trajectories.rank<NNNNN>.h5, one shard per rank
RUN_DIR/checkpoints/         ckpt_<iteration>.pt, the last `keep_checkpoints`
RUN_DIR/expert_cache/        the current scenario's policy-dependent expert demonstrations
RUN_DIR/tb/                  TensorBoard scalars
RUN_DIR/train.log            the log of rank 0
RUN_DIR/failed.rank<NNNNN>.log  a rank's error and traceback when it took an MPI job down (appended)
RUN_DIR/llm_server.log       the embedded LLM server's log, when training started one
RUN_DIR/llm/                 a submitted LLM server job's endpoint.json and log
RUN_DIR/submitit*/           SLURM job files, submit.json, requeues.json (reled_hpc.launch)
RUN_DIR/.lock                the writer's lock (`RunDir.lock`): holder host, pid, SLURM job id, start time
RUN_DIR/replaced-<time>/     the files of a run that failed before committing an iteration, set aside by a new one
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ReledError

CONFIG_FILE = "config.yaml"
DUMP_FILE = "trajectories.h5"
CHECKPOINT_DIR = "checkpoints"
EXPERT_CACHE_DIR = "expert_cache"
TENSORBOARD_DIR = "tb"
LOG_FILE = "train.log"
LLM_SERVER_LOG = "llm_server.log"
LLM_DIR = "llm"
LOCK_FILE = ".lock"
FAILURE_LOG = "failed.rank{rank:05d}.log"  # one per rank that took an MPI job down
REPLACED_PREFIX = "replaced-"
# what `train` itself writes: set aside together when a run that never committed is replaced (submitit/, llm/
# and the requeue history belong to the job that submitted the run and stay)
RUN_FILES = (CONFIG_FILE, DUMP_FILE, CHECKPOINT_DIR, EXPERT_CACHE_DIR, TENSORBOARD_DIR, LOG_FILE, LLM_SERVER_LOG)

log = logging.getLogger("reled_hpc.run_dir")


class RunLockError(ReledError):
    """Another process holds the run folder's lock."""


def _holder_info() -> dict[str, Any]:
    job = os.environ.get("SLURM_JOB_ID")
    if job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ.get('SLURM_ARRAY_JOB_ID', job)}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": job,
            "start": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "start_unix": time.time()}  # fmt: skip


def _describe_holder(text: str) -> str:
    try:
        h = json.loads(text)
        return (f"host {h.get('host')}, pid {h.get('pid')}, SLURM job {h.get('slurm_job_id') or 'none'}, "
                f"since {h.get('start')}")  # fmt: skip
    except (ValueError, AttributeError):
        return "a process that has not written its details yet"


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

    def failure_log(self, rank: int) -> Path:
        """Where rank `rank` records the error that made it abort an MPI job: the launcher may drop the
        last lines of a rank's stderr when it kills the job, this file keeps them."""
        return self.path / FAILURE_LOG.format(rank=rank)

    @property
    def llm_server_log(self) -> Path:
        return self.path / LLM_SERVER_LOG

    @property
    def llm(self) -> Path:
        return self.path / LLM_DIR

    def is_run(self) -> bool:
        """A run was started here (its config was written)."""
        return self.config.is_file()

    @property
    def commit_dump(self) -> Path:
        """The file whose metrics rows commit iterations: rank 0's shard in a sharded run, else the dump."""
        from ..io.master import shard_path

        shard0 = shard_path(self.dump, 0)
        return shard0 if shard0.is_file() else self.dump

    def has_dump(self) -> bool:
        return self.commit_dump.is_file()

    def dump_files(self) -> list[Path]:
        """The dump's files: the dump or master, the shards and a master being replaced."""
        d = self.dump
        extra = [*sorted(self.path.glob(f"{d.stem}.rank*{d.suffix}")), d.with_name(d.name + ".tmp")]
        return [p for p in (d, *extra) if p.exists()]

    def committed(self) -> str | None:
        """Why the folder holds committed work (a checkpoint, or a dump with a committed iteration), or
        None when nothing was committed and a new run may replace it. A dump that cannot be read counts
        as committed: it may hold iterations."""
        ckpts = checkpoint_files(self.checkpoints)
        if ckpts:
            return f"checkpoint {ckpts[-1].name}"
        if not self.has_dump():
            return None
        from ..io import TrajectoryReader

        try:
            with TrajectoryReader(self.commit_dump) as r:
                n = len(r.iterations())
        except Exception as exc:  # any unreadable dump is kept: it may hold iterations
            return f"a dump that cannot be read ({exc})"
        return f"{n} committed iterations in {self.commit_dump.name}" if n else None

    def set_aside(self) -> Path | None:
        """Move the files `train` writes into RUN_DIR/replaced-<time>/ (never deleted); that folder, or
        None when there were none. Call with the lock held."""
        present = [self.path / name for name in RUN_FILES if (self.path / name).exists()]
        present += [p for p in self.dump_files() if p not in present]
        present += sorted(self.path.glob(FAILURE_LOG.replace("{rank:05d}", "*")))
        if not present:
            return None
        stamp = time.strftime("%Y%m%dT%H%M%S")
        dest = self.path / f"{REPLACED_PREFIX}{stamp}"
        k = 1
        while dest.exists():
            k += 1
            dest = self.path / f"{REPLACED_PREFIX}{stamp}-{k}"
        dest.mkdir()
        for p in present:
            os.replace(p, dest / p.name)  # same filesystem: a rename, nothing copied or lost
        return dest

    @contextmanager
    def lock(self) -> Iterator[dict[str, Any] | None]:
        """Hold the folder's exclusive writer lock: `flock(LOCK_EX | LOCK_NB)` on RUN_DIR/.lock, made if
        needed (with the folder). Yields the holder info written into the file (host, pid, SLURM job id,
        start time). RunLockError naming the folder and the holder when another process holds it; the
        folder's other files are not touched then. The kernel drops the lock when the process dies, so a
        killed run never leaves a stale lock; the file itself stays (unlinking it would let two
        processes lock two different files).

        flock must be coherent across nodes for this to stop a writer on another node: local disks,
        NFSv4 and NFSv3 with lockd (NLM) are; NFS mounted with `nolock` (or without lockd) and Lustre
        mounted with `-o localflock` (locks per node only) are not; Lustre with `-o flock` is. Where
        flock fails outright (ENOLCK, EOPNOTSUPP: Lustre `-o noflock`, some FUSE mounts) a warning is
        logged and the run goes on without the lock (None is yielded)."""
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.path / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                err = None
            except OSError as exc:
                err = exc
            if err is not None and err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                log.warning("cannot lock %s (%s): this filesystem does not support flock; nothing stops a second "
                            "writer of %s", path, err, self.path)  # fmt: skip
                yield None
                return
            if err is not None:
                text = ""
                for _ in range(20):  # the holder writes its details right after locking
                    text = os.pread(fd, 4096, 0).decode(errors="replace")
                    if text.strip().endswith("}"):
                        break
                    time.sleep(0.05)
                raise RunLockError(f"run folder {self.path} is in use by another training process "
                                   f"({_describe_holder(text)}); lock file {path}")  # fmt: skip
            info = _holder_info()
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            os.fsync(fd)
            yield info
        finally:
            os.close(fd)  # releases the lock

    def require_run(self) -> RunDir:
        """Self, or ReledError when the folder holds no run (for --resume)."""
        if not self.is_run():
            raise ReledError(f"{self.path} is not a run folder (no {CONFIG_FILE})")
        return self

    def __str__(self) -> str:
        return str(self.path)


def checkpoint_files(folder: Path) -> list[Path]:
    """The checkpoints in a run's checkpoint folder, oldest first (ckpt_<iteration>.pt sort by iteration)."""
    return sorted(folder.glob("ckpt_*.pt")) if folder.is_dir() else []


def checkpoint_file(folder: Path, iteration: int) -> Path:
    return folder / f"ckpt_{iteration:06d}.pt"


def dump_path(path: str | Path) -> Path:
    """A dump file as given, or the dump of a run folder."""
    p = Path(path)
    return p / DUMP_FILE if p.is_dir() else p

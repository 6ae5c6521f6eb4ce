"""What runs inside a submitted job: the training ranks and the LLM server.

`TrainJob` is a submitit `Checkpointable`. Every rank of the job calls it (srun starts one task
per rank). On the timeout signal (USR2, `signal_delay_s` before the limit) or a preemption
(SIGTERM) the training loop finishes its iteration, checkpoints and returns; rank 0 then requeues
the job itself (`scontrol requeue`) and the requeued job calls the same object again, which
resumes the same run folder and HDF5 dump: iterations stay contiguous, none lost or repeated.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import submitit

from ..errors import ReledError
from .records import REQUEUE_FILE

if TYPE_CHECKING:
    from ..llm.server import ServerConfig

log = logging.getLogger("reled_hpc.launch")


def _job_id() -> str | None:
    """This job's id as scontrol wants it (array tasks as ARRAYID_TASKID)."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def committed_iterations(run_dir: Path) -> int:
    """Iterations the run's dump holds (0 when there is none yet)."""
    from ..experiment.run_dir import RunDir
    from ..io import TrajectoryReader

    run = RunDir(run_dir)
    if not run.has_dump():
        return 0
    with TrajectoryReader(run.commit_dump) as r:
        return len(r.iterations())


def cancel_job(job_id: str) -> None:
    r = subprocess.run(["scancel", job_id], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        log.warning("scancel %s failed: %s", job_id, r.stderr.strip())


class TrainJob(submitit.helpers.Checkpointable):
    """Train `cfg` in `run_dir`, resuming whatever the folder already holds."""

    def __init__(self, cfg: Any, run_dir: str, max_requeues: int = 5, server_job: str | None = None) -> None:
        self.cfg = cfg
        self.run_dir = str(run_dir)
        self.max_requeues = max_requeues
        self.server_job = server_job  # the LLM server job to cancel once training is over

    def __call__(self) -> dict[str, Any]:
        from ..dist.comm import get_comm
        from ..experiment.run_dir import RunDir
        from ..experiment.train import train

        run_dir = Path(self.run_dir)
        comm = get_comm()
        timed_out = {"flag": False}

        def on_timeout(signum: int, frame: Any) -> None:
            # the training loop stops on SIGTERM at the end of the iteration and checkpoints
            timed_out["flag"] = True
            signal.raise_signal(signal.SIGTERM)

        signal.signal(signal.SIGUSR2, on_timeout)
        # every rank sees the same folder state: rank 0 creates files only after train()'s first barrier.
        # Resume what committed work; a folder that committed nothing (a run that failed in iteration 0,
        # or this job requeued before its first iteration) starts this job's config, and train() moves
        # the old files aside.
        resume = RunDir(run_dir).committed() is not None
        if comm.rank == 0:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
            log.info("job %s: %s %s (%d ranks)", _job_id(), "resuming" if resume else "starting", run_dir, comm.size)
        finished = False
        try:
            train(None if resume else self.cfg, resume=run_dir if resume else None, run_dir=run_dir, comm=comm)
            done = committed_iterations(run_dir) if comm.rank == 0 else 0
            finished = done >= self.cfg.iterations
        except BaseException:
            if comm.rank == 0 and self.server_job:
                cancel_job(self.server_job)
            raise
        if comm.rank != 0:
            return {"run_dir": self.run_dir, "rank": comm.rank}
        if not finished:
            if timed_out["flag"] and _job_id():  # a plain SIGTERM is scancel's (or SLURM's own requeue)
                self._requeue(run_dir, done)
            raise ReledError(f"{run_dir}: stopped after {done}/{self.cfg.iterations} iterations (signal)")
        if self.server_job:
            cancel_job(self.server_job)
        return {"run_dir": self.run_dir, "iterations": done, "finished": True}

    def _requeue(self, run_dir: Path, done: int) -> None:
        """Requeue this job (rank 0 only). Leaves through SystemExit, as submitit does, so that no
        result file marks the job as finished."""
        path = run_dir / REQUEUE_FILE
        history = json.loads(path.read_text()) if path.exists() else []
        if len(history) >= self.max_requeues:
            raise ReledError(f"{run_dir}: not requeued again, already requeued {len(history)} times (max_requeues)")
        job = _job_id()
        history.append({"job": job, "iterations_done": done, "time": time.time()})
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(history, indent=1))
        os.replace(tmp, path)
        log.info("requeueing job %s after %d iterations (timeout signal)", job, done)
        sys.stdout.flush()
        subprocess.check_call(["scontrol", "requeue", str(job)], timeout=60)
        sys.exit(-1)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # Only reached if submitit's own handler fires (a signal before __call__ installed ours): the
        # run folder holds every checkpoint, so calling the same job again resumes it.
        return submitit.helpers.DelayedSubmission(self)


class ServerJob:
    """`reled-hpc serve-llm` inside a job: it writes RUN_DIR/llm/endpoint.json and serves until the
    training job cancels it (SIGTERM). Holds the ServerConfig itself (submitit pickles it) and calls
    the server directly, so the launch layer does not import the command line."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg

    def __call__(self) -> int:
        from ..llm.server import serve

        # as `reled-hpc serve-llm` would: the server's progress lines go to the job's log
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
        return serve(self.cfg)

"""A small communicator facade over mpi4py with buffer collectives only on the hot path.

`get_comm()` returns MPI.COMM_WORLD when the process was started by mpiexec/srun with more than
one rank, and a serial stand-in otherwise, so R = 1 runs without initialising MPI at all.
Trajectory batches move as typed numpy buffers: `Gatherv` of each column after a `Gather` of
the row counts (never pickles); weights move as one float32 `Bcast`; the data-parallel learner sums
gradients and a few scalars with `Allreduce` on flat buffers.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

# launcher variables that say "this process is one of several ranks"
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMIX_SIZE")


def launched_with_mpi() -> bool:
    for var in _SIZE_VARS:
        if int(os.environ.get(var, "1") or 1) > 1:
            return True
    return int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in os.environ


class SerialComm:
    """The single-process stand-in: rank 0 of 1; collectives are copies."""

    rank = 0
    size = 1
    is_mpi = False

    def bcast_array(self, arr: np.ndarray, root: int = 0) -> np.ndarray:
        return arr

    def bcast_obj(self, obj: Any, root: int = 0) -> Any:
        return obj

    def gather_columns(
        self, cols: dict[str, np.ndarray], root: int = 0
    ) -> tuple[dict[str, np.ndarray] | None, np.ndarray]:
        return cols, np.array([len(next(iter(cols.values())))], np.int64)

    def gather_fixed(self, arr: np.ndarray, root: int = 0) -> np.ndarray | None:
        return arr[None]

    def gather_obj(self, obj: Any, root: int = 0) -> list[Any] | None:
        return [obj]

    def allreduce_sum(self, buf: np.ndarray) -> np.ndarray:
        return buf

    def reduce(self, buf: np.ndarray, op: str, root: int = 0) -> np.ndarray | None:
        return buf

    def bytes_gathered_to_root(self) -> int:
        return 0

    def barrier(self) -> None:
        pass

    def abort(self, code: int = 1) -> None:
        os._exit(code)

    def bytes_moved(self) -> int:
        return 0

    def seconds_in_allreduce(self) -> float:
        return 0.0


class MPIComm:
    """mpi4py COMM_WORLD with the few collectives the runtime uses; counts bytes it moves."""

    is_mpi = True

    def __init__(self) -> None:
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self._bytes = 0
        self._root_bytes = 0  # per-rank data other ranks sent to rank 0 in gathers (rank 0's count)
        self._allreduce_s = 0.0

    def bytes_gathered_to_root(self) -> int:
        """On the root: bytes of the other ranks' data it received in gathers so far (0 elsewhere)."""
        return self._root_bytes

    def reduce(self, buf: np.ndarray, op: str, root: int = 0) -> np.ndarray | None:
        """Element-wise 'sum' or 'max' over the ranks of one contiguous buffer, result on root (None elsewhere).
        The root receives a fixed-size buffer whatever the number of ranks."""
        send = np.ascontiguousarray(buf)
        recv = np.empty_like(send) if self.rank == root else None
        self.comm.Reduce(send, recv, op={"sum": self.MPI.SUM, "max": self.MPI.MAX}[op], root=root)
        self._bytes += send.nbytes
        return recv

    def bytes_moved(self) -> int:
        return self._bytes

    def seconds_in_allreduce(self) -> float:
        """Wall time spent inside `allreduce_sum` so far (transfer plus waiting for the slowest rank)."""
        return self._allreduce_s

    def allreduce_sum(self, buf: np.ndarray) -> np.ndarray:
        """Element-wise sum over the ranks of one contiguous numeric buffer, result on every rank (a new
        array; `buf` is untouched). Counts what a ring allreduce sends per rank: 2 (R - 1) / R of the buffer."""
        send = np.ascontiguousarray(buf)
        out = np.empty_like(send)
        t0 = time.perf_counter()
        self.comm.Allreduce(send, out, op=self.MPI.SUM)
        self._allreduce_s += time.perf_counter() - t0
        self._bytes += 2 * send.nbytes * (self.size - 1) // self.size
        return out

    def bcast_array(self, arr: np.ndarray, root: int = 0) -> np.ndarray:
        """Bcast a buffer whose shape and dtype every rank already knows (e.g. the flat weights)."""
        buf = np.ascontiguousarray(arr)
        self.comm.Bcast(buf, root=root)
        self._bytes += buf.nbytes * (self.size - 1)
        return buf

    def bcast_obj(self, obj: Any, root: int = 0) -> Any:
        """Small control messages only (stop flags, configs): pickled."""
        return self.comm.bcast(obj, root=root)

    def gather_obj(self, obj: Any, root: int = 0) -> list[Any] | None:
        """Small, irregular records (LLM programs) only: pickled."""
        out = self.comm.gather(obj, root=root)
        if out is not None:
            import pickle

            self._root_bytes += sum(len(pickle.dumps(o)) for i, o in enumerate(out) if i != root)
        return out

    def gather_fixed(self, arr: np.ndarray, root: int = 0) -> np.ndarray | None:
        """Gather one equally shaped array per rank -> (size, *shape) on root."""
        send = np.ascontiguousarray(arr)
        recv = np.empty((self.size, *send.shape), send.dtype) if self.rank == root else None
        self.comm.Gather(send, recv, root=root)
        self._bytes += send.nbytes
        if self.rank == root:
            self._root_bytes += send.nbytes * (self.size - 1)
        return recv

    def gather_columns(
        self, cols: dict[str, np.ndarray], root: int = 0
    ) -> tuple[dict[str, np.ndarray] | None, np.ndarray]:
        """Gatherv each column (same names, dtypes and trailing shapes on every rank) to root.
        Returns (columns concatenated in rank order, rows per rank) on root, (None, counts) elsewhere."""
        n_local = len(next(iter(cols.values())))
        counts = self.gather_fixed(np.array([n_local], np.int64), root)
        counts = self.comm.bcast(None if counts is None else counts.ravel(), root=root)
        out: dict[str, np.ndarray] | None = {} if self.rank == root else None
        for name, arr in cols.items():
            send = np.ascontiguousarray(arr)
            row = int(np.prod(send.shape[1:], dtype=np.int64)) if send.ndim > 1 else 1
            if out is not None:
                recv = np.empty((int(counts.sum()), *send.shape[1:]), send.dtype)
                rbuf = [recv, counts * row, None, self.MPI._typedict[send.dtype.char]]
            else:
                rbuf = None
            self.comm.Gatherv(send, rbuf, root=root)
            self._bytes += send.nbytes
            if out is not None:
                out[name] = recv
                self._root_bytes += recv.nbytes - send.nbytes
        return out, counts

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, code: int = 1) -> None:
        self.comm.Abort(code)


def same_on_all_ranks(comm: SerialComm | MPIComm, arrays: list[np.ndarray]) -> bool:
    """True on every rank when `arrays` are bitwise equal on all ranks (CRC-32 of their bytes, one
    small allreduce): a cheap check that data-parallel replicas have not drifted apart."""
    import zlib

    crc = 0
    for a in arrays:
        crc = zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1).data, crc)
    slots = np.zeros(comm.size, np.float64)  # one slot per rank: after the sum every rank sees every CRC
    slots[comm.rank] = float(crc)
    return bool(np.all(comm.allreduce_sum(slots) == float(crc)))


def mpiexec_command(ranks: int, cli_args: list[str]) -> list[str]:
    """`mpiexec -n R <this python> -m reled_hpc.cli ARGS`: the venv's mpiexec (mpich from pip) if
    present, else the one on PATH (a cluster's MPI module)."""
    import shutil
    import sys
    from pathlib import Path

    from ..errors import SetupError

    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        found = shutil.which("mpiexec")
        if not found:
            raise SetupError("local MPI ranks need mpiexec (pip install mpich, or load your cluster's MPI module)")
        mpiexec = Path(found)
    return [str(mpiexec), "-n", str(ranks), sys.executable, "-m", "reled_hpc.cli", *cli_args]


def get_comm() -> SerialComm | MPIComm:
    return MPIComm() if launched_with_mpi() else SerialComm()


# signals the launcher passes on to its ranks; mpich's hydra forwards SIGINT/SIGTERM itself but dies of
# SIGUSR2 (the pip build does not forward it), and the ranks stop gracefully on SIGTERM only, so a
# SIGUSR2 (e.g. SLURM's `--signal=USR2@T` warning) is passed on as SIGTERM
_FORWARD = {"SIGTERM": "SIGTERM", "SIGINT": "SIGINT", "SIGUSR2": "SIGTERM"}


def _die_with_parent(launcher: int) -> None:
    """preexec_fn of mpiexec: a SIGKILLed launcher cannot forward, so the kernel sends mpiexec SIGTERM
    (which hydra forwards to the ranks: they checkpoint and stop) when the launcher dies."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG = 1
    if os.getppid() != launcher:  # the launcher died before prctl took effect
        os._exit(1)


def run_ranks(cmd: list[str]) -> int:
    """Run an mpiexec command line, forwarding SIGTERM/SIGINT/SIGUSR2 to it and waiting for the ranks
    (they finish the iteration and checkpoint). Returns their exit status (128 + signal if killed).

    mpiexec runs in its own session so that a terminal's Ctrl-C reaches it once, through here: hydra
    takes a second SIGINT as "force abort"."""
    import functools
    import signal
    import subprocess

    proc = subprocess.Popen(cmd, env=os.environ.copy(), stdin=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=functools.partial(_die_with_parent, os.getpid()))  # fmt: skip

    def forward(signum: int, frame: Any) -> None:
        name = _FORWARD[signal.Signals(signum).name]
        if proc.poll() is None:
            proc.send_signal(getattr(signal, name))

    old = {sig: signal.signal(getattr(signal, sig), forward) for sig in _FORWARD}
    try:
        rc = proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(getattr(signal, sig), handler)
    return 128 - rc if rc < 0 else rc

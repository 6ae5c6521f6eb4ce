"""Reading what is left of a damaged dump: one cut short (a copy of a running job's file, a full disk)
or one whose chunks TrajectoryReader cannot read.

`SalvageReader` is a TrajectoryReader of the readable part: only rows whose chunks lie wholly inside
the file are used, cut to whole committed iterations. HDF5 reads missing bytes as zeros, which for
uncompressed data (`metrics/`) would otherwise come back as iterations full of 0. It reads the file
through `PaddedFile`, never through SWMR (see there).
"""

from __future__ import annotations

import io
import mmap
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from . import schema as S
from .heap import GCOL_HEADER_BYTES, GCOL_SIGNATURE, heap_problem
from .reader import Superblock, TrajectoryReader, first_row_after, metrics_as_read, written_iterations

__all__ = ["PaddedFile", "SalvageReader", "cut_short", "global_heap_problems"]


def cut_short(path: str | Path) -> str | None:
    """Why the file at `path` is shorter than its superblock records, None if it is not (or has no
    v2/v3 superblock). Read such a file with SalvageReader: TrajectoryReader may open it in SWMR mode
    (a killed writer's flags), where every metadata read past the end is retried ~100 times with sleeps."""
    try:
        with open(path, "rb") as fh:
            sb = Superblock.parse(fh.read(64))
            size = os.fstat(fh.fileno()).st_size
    except OSError:
        return None
    end = sb.expected_size if sb is not None else 0
    if size >= end:
        return None
    return f"the file is {size:,} bytes, its superblock records {end:,} (cut short, or its writer was killed)"


def global_heap_problems(view: PaddedFile, real_size: int, virtual_size: int) -> list[tuple[int, int, str]]:
    """(start, stop, why) of every global heap collection in the file that HDF5 could not parse in bounded
    time; `view` shows the file as HDF5 will see it, the collections are found by signature in its first
    `real_size` bytes. One whose recorded size does not fit the file is refused by its header alone (every
    read of a collection starts there), so that damage does not spread to the metadata after it."""
    if real_size == 0:
        return []
    bad: list[tuple[int, int, str]] = []
    with mmap.mmap(view.fileno(), real_size, access=mmap.ACCESS_READ) as mm:
        at = mm.find(GCOL_SIGNATURE)
        while at >= 0:
            view.seek(at)
            head = view.read(GCOL_HEADER_BYTES) or b""
            size = int.from_bytes(head[8:16], "little") if len(head) == GCOL_HEADER_BYTES else 0
            if size < 2 * GCOL_HEADER_BYTES or at + size > virtual_size:
                bad.append((at, at + GCOL_HEADER_BYTES, f"its recorded size {size:,} does not fit the file"))
            else:
                view.seek(at)
                why = heap_problem(view.read(size) or b"")
                if why:
                    bad.append((at, at + size, why))
            at = mm.find(GCOL_SIGNATURE, at + 1)
    return bad


class PaddedFile(io.RawIOBase):
    """A read-only view of a cut file as long as its superblock says it should be, zeros past the end.

    HDF5 refuses a file shorter than its recorded end of address ("truncated file"). Its SWMR read
    mode skips that check but retries every failed metadata read ~100 times with sleeps, so reading
    anything past the cut hangs for minutes; through this view a plain read-only open sees the
    missing bytes as zeros and fails at once (checksums, filters). A killed writer's "open for
    write" superblock flags are shown cleared, as h5clear would, without touching the file.

    The one metadata HDF5 reads without a checksum, the global heap (variable-length strings: the
    file attributes, program texts), can make it loop forever on zeros; every collection is checked
    when the view opens and reading a bad one raises OSError (h5py hands it on) instead.
    """

    def __init__(self, path: str | Path) -> None:
        self._fh = open(path, "rb")  # noqa: SIM115 - closed by close()
        self.size = os.fstat(self._fh.fileno()).st_size
        self._pos = 0
        self._head = b""
        sb = Superblock.parse(self._fh.read(64))
        self.virtual_size = max(self.size, sb.expected_size if sb else 0)
        if sb is not None and sb.flags:
            self._head = sb.rewritten(flags=0, eoa=sb.eoa)
        self._bad: list[tuple[int, int, str]] = []
        self._bad = global_heap_problems(self, self.size, self.virtual_size)

    def fileno(self) -> int:
        return self._fh.fileno()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.virtual_size}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        n = max(0, min(len(view), self.virtual_size - self._pos))
        for start, stop, why in self._bad:
            if self._pos < stop and self._pos + n > start:
                raise OSError(f"the global heap collection at byte {start:,} is damaged: {why}")
        self._fh.seek(self._pos)
        got = self._fh.readinto(view[:n]) or 0
        view[got:n] = bytes(n - got)  # past the cut: zeros
        if self._head and self._pos < len(self._head):
            k = min(n, len(self._head) - self._pos)
            view[:k] = self._head[self._pos : self._pos + k]
        self._pos += n
        return n

    def close(self) -> None:
        self._fh.close()
        super().close()


def _readable_rows(ds: h5py.Dataset, eof: int) -> int:
    """Leading rows of `ds` whose chunks lie wholly inside the first `eof` bytes of the file.

    The chunk index itself may be cut: chunks listed before the index became unreadable still count.
    """
    n = int(ds.shape[0])
    if n == 0:
        return 0
    try:
        if ds.chunks is None:
            off = ds.id.get_offset()
            return n if off is not None and off + ds.id.get_storage_size() <= eof else 0
    except (OSError, RuntimeError, ValueError):
        return 0
    inside: set[int] = set()
    outside = [n]

    def visit(info: Any) -> None:
        start = int(info.chunk_offset[0])
        if info.byte_offset is None or info.byte_offset + info.size > eof:
            outside.append(start)
        else:
            inside.add(start)

    try:
        if hasattr(ds.id, "chunk_iter"):  # one pass over the chunk index (HDF5 >= 1.12.3)
            ds.id.chunk_iter(visit)
        else:
            for i in range(ds.id.get_num_chunks()):
                visit(ds.id.get_chunk_info(i))
    except (OSError, RuntimeError, ValueError, KeyError):  # the index is cut: keep the run of listed chunks
        k, step = 0, int(ds.chunks[0])
        while k < n and k in inside:
            k += step
        outside.append(k)
    return min(min(outside), n)


class SalvageReader(TrajectoryReader):
    """The committed iterations of a dump TrajectoryReader refuses (truncated, damaged) that are readable.

    The reader's commit rule is kept (leading written `metrics/iteration` cells, here also strictly
    increasing), applied to the part of every metrics column that lies inside the file; rows are cut
    to whole iterations. Everything else (iter_chunks, schema-1 programs, ...) is TrajectoryReader's.
    `recovered` says what was kept; `uncommitted_rows` is empty (the rows left out are told there).
    """

    _unreadable = "cannot recover anything readable ({})"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._raw = PaddedFile(self.path)
        try:
            self._f = h5py.File(self._raw, "r")
        except OSError as exc:
            self._raw.close()
            raise self._err(f"cannot open the file even to recover its readable part ({exc})") from exc
        try:
            self._validate()
        except BaseException:
            self.close()
            raise

    def _validate(self) -> None:
        try:
            super()._validate()
        except RuntimeError as exc:  # h5py's error on damaged metadata (checksums); TrajectoryReader lets it through
            raise self._err(self._unreadable.format(f"{type(exc).__name__}: {exc}")) from exc

    def _count_committed(self) -> None:
        if self.schema_version == S.MASTER_VERSION:
            raise self._err(
                "a sharded dump's master holds no rows of its own: salvage its shard files "
                "(trajectories.rankNNNNN.h5), rebuild it with reled_hpc.io.master.rebuild_master"
            )
        f, eof = self._f, self._raw.size
        mg = f[S.METRICS_GROUP]
        written = int(mg["iteration"].shape[0])
        cols: dict[str, np.ndarray] = {}
        for name in S.metric_columns(self.extra_metrics):
            try:
                cols[name] = mg[name][: _readable_rows(mg[name], eof)]
            except (OSError, RuntimeError):
                cols[name] = np.empty(0)
        k = min(len(a) for a in cols.values())
        it = cols["iteration"][:k]
        ok = written_iterations(it)
        ok[1:] &= np.diff(it) > 0  # iterations strictly increase; anything else is not data
        bad = np.flatnonzero(~ok)
        self._n_metrics = int(bad[0]) if bad.size else k
        self._metrics = metrics_as_read({name: a[: self._n_metrics] for name, a in cols.items()})
        self._iterations = it[: self._n_metrics].astype(np.int64)
        last = int(self._iterations[-1]) if self._n_metrics else -1
        self._n: dict[str, int] = {}
        self._blocks: dict[str, list[tuple[int, int]]] = {}
        self.uncommitted_rows: dict[str, int] = {}
        notes = []
        for g in (*S.ROW_GROUPS, S.PROGRAMS_GROUP):
            grp = f[g]
            numeric = [grp[c] for c in grp if h5py.check_string_dtype(grp[c].dtype) is None]
            n_total = min(int(ds.shape[0]) for ds in grp.values())
            readable = min([_readable_rows(ds, eof) for ds in numeric] + [n_total])
            n = first_row_after(grp["iteration"], last, readable)
            if readable < n_total and n == readable and n > 0:
                # the readable prefix ends inside committed rows: its last iteration may be partial
                n = first_row_after(grp["iteration"], int(grp["iteration"][n - 1]) - 1, n)
            self._n[g] = n
            self._blocks[g] = [(0, n)] if n else []
            if readable < n_total:
                upto = f"iterations <= {int(grp['iteration'][n - 1])}" if n else "none"
                notes.append(f"{g}/ keeps {n} of {n_total} rows ({upto})")
        lost = f"; rows past the damage are left out: {', '.join(notes)}" if notes else ""
        self.recovered = f"{self._n_metrics} committed iterations (of {written} metrics rows written){lost}"

    def metrics(self) -> dict[str, np.ndarray]:
        """metrics/ columns as read while opening: only their part inside the file was ever read."""
        return {name: a.copy() for name, a in self._metrics.items()}

    def close(self) -> None:
        try:
            super().close()  # before the file object under it: HDF5 still talks to it while closing
        finally:
            self._raw.close()

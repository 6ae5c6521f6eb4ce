"""Every read of a damaged dump ends in bounded time with a named DumpError: cuts at every 1,000 bytes,
cuts inside the global heap (where HDF5 itself loops on zeros), random bytes in chunks, a sweep holding one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import VENV_BIN
from test_analysis import A_MAX, EXTRA, OBS_DIM, config, decision_rows, write_dump

from analysis.load import open_dump
from reled_hpc.errors import DumpError
from reled_hpc.io import TrajectoryWriter
from reled_hpc.io.heap import GCOL_SIGNATURE

LIMIT_S = 30.0


@pytest.fixture(scope="module")
def dump(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("damaged")
    (d / "map").mkdir()
    (d / "map" / "manifest.json").write_text('{"name": "fake", "scale_m": 1000.0}')
    return write_dump(d / "full.h5", config(d / "map", "reled", 0), iterations=3, steps=5, sed=True)


def analyze(*args: str | Path) -> tuple[int | None, str, float]:
    """(exit code or None on a hang, stderr, seconds) of `reled-hpc analyze ...` in its own process."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run([str(VENV_BIN / "reled-hpc"), "analyze", *map(str, args)], capture_output=True,
                           text=True, timeout=LIMIT_S)  # fmt: skip
    except subprocess.TimeoutExpired:
        return None, "", time.perf_counter() - t0
    return p.returncode, p.stderr, time.perf_counter() - t0


def assert_ends_clearly(path: Path, rc: int | None, err: str, secs: float) -> None:
    assert rc is not None, f"{path.name}: analyze did not end within {LIMIT_S:.0f} s (HDF5 loops?)"
    assert secs < LIMIT_S
    assert "Traceback" not in err, f"{path.name}: {err}"
    if rc != 0:
        assert rc == 2 and f"reled-hpc: error: {path}" in err, f"{path.name}: rc {rc}: {err}"


# One process analyses the cut files one after another (one start-up instead of dozens); a hang stops it
# at the file it hangs on, which the test then names.
SUMMARIES = """
import contextlib, io, json, sys, time
from reled_hpc.cli import main
for path in sys.argv[1:]:
    err, t0 = io.StringIO(), time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["analyze", "summary", path])
    print(json.dumps({"path": path, "rc": rc, "err": err.getvalue(), "s": time.perf_counter() - t0}), flush=True)
"""


def summarise_each_ends_clearly(paths: list[Path], limit_s: float) -> list[dict]:
    """`analyze summary` on each file in one child process; each must end clearly, all within `limit_s`."""
    proc = subprocess.Popen([sys.executable, "-c", SUMMARIES, *map(str, paths)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    done = [json.loads(line) for line in out.splitlines()]
    assert proc.returncode == 0 and len(done) == len(paths), (
        f"no end within {limit_s:.0f} s on {paths[len(done)].name} (HDF5 loops?); stderr: {err[-2000:]}"
    )
    for path, r in zip(paths, done, strict=True):
        assert_ends_clearly(path, r["rc"], r["err"], r["s"])
    return done


def test_cut_anywhere_ends_in_bounded_time(dump, tmp_path):
    data = dump.read_bytes()
    heaps = [i for i in range(len(data)) if data.startswith(GCOL_SIGNATURE, i)]
    assert heaps, "the dump holds no global heap collection: the test would miss HDF5's loop"
    offsets = set(range(1000, 20_001, 1000)) | {len(data) - k for k in (1, 8, 100, 1000)}
    offsets |= {h + k for h in heaps for k in (20, 64, 200, 400)}  # inside a collection: zeros where objects were
    cuts = []
    for off in sorted(o for o in offsets if 0 < o < len(data)):
        cut = tmp_path / f"cut{off}.h5"
        cut.write_bytes(data[:off])
        cuts.append(cut)
    summarise_each_ends_clearly(cuts, LIMIT_S)


OPEN = """
import sys
from analysis.load import open_dump
from reled_hpc.errors import DumpError
from reled_hpc.io import SalvageReader
for opener in (SalvageReader, open_dump):
    try:
        opener(sys.argv[1]).close()
    except DumpError as exc:
        print(exc)
"""


def test_cut_inside_the_attribute_heap_is_a_named_error(dump, tmp_path):
    """The view refuses the collection HDF5 would loop on and the DumpError names the file (in a child
    process: HDF5's loop holds the GIL, nothing in-process could stop it)."""
    data = dump.read_bytes()
    heap = data.find(GCOL_SIGNATURE)
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data[: heap + 64])
    try:
        p = subprocess.run([sys.executable, "-c", OPEN, str(cut)], capture_output=True, text=True, timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"opening {cut.name} did not end within {LIMIT_S:.0f} s (HDF5 loops?)")
    lines = p.stdout.splitlines()
    assert p.returncode == 0 and len(lines) == 2, p.stdout + p.stderr
    for line in lines:
        assert line.startswith(f"{cut}: ") and "file attributes" in line, line
        assert f"global heap collection at byte {heap:,}" in line, line


def test_heap_damaged_in_place_in_a_full_size_dump_ends_in_bounded_time(dump, tmp_path):
    """Not a cut: the file keeps its size, but bytes inside a global heap collection are overwritten.
    Zeros where an object record was made HDF5 loop forever on the file attributes; each damaged copy
    must end (summary, in one child process) with a result or a named DumpError."""
    data = dump.read_bytes()
    heaps = [i for i in range(len(data)) if data.startswith(GCOL_SIGNATURE, i)]
    fills = [(16, b"\x00" * 64), (8, b"\x00" * 8), (24, b"\xff" * 16), (40, b"\x00" * 256), (100, b"\x13" * 32)]
    copies = []
    for h in heaps:
        for off, fill in fills:
            b = bytearray(data)
            b[h + off : h + off + len(fill)] = fill
            copies.append(tmp_path / f"heap{h}_{off}.h5")
            copies[-1].write_bytes(bytes(b))
    done = summarise_each_ends_clearly(copies, LIMIT_S * 2)
    first = next(r for c, r in zip(copies, done, strict=True) if c.name == f"heap{heaps[0]}_16.h5")
    assert first["rc"] == 2 and f"global heap collection at byte {heaps[0]:,} is damaged" in first["err"], first


def chunk_spans(path: Path) -> list[tuple[str, int, int]]:
    """(dataset, byte offset, size) of the first chunk of every chunked numeric row column."""
    out = []
    with h5py.File(path, "r") as f:
        for g in ("agent", "expert"):
            for name, ds in f[g].items():
                if ds.chunks is not None and ds.id.get_num_chunks():
                    info = ds.id.get_chunk_info(0)
                    out.append((f"{g}/{name}", info.byte_offset, info.size))
    return out


def corrupt(src: Path, dst: Path, which) -> Path:
    """A copy of `src` with random bytes over the first chunk of the row columns `which(name)` picks."""
    rng = np.random.default_rng(0)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)
    with open(dst, "r+b") as fh:
        for name, at, size in chunk_spans(dst):
            if which(name):
                fh.seek(at)
                fh.write(rng.bytes(size))
    return dst


def test_random_bytes_in_chunks_are_named_dump_errors(dump, tmp_path):
    bad = corrupt(dump, tmp_path / "run" / "trajectories.h5", lambda name: not name.endswith("/iteration"))
    with open_dump(bad) as d:
        for g in ("agent", "expert"):
            for col in ("reward", "x", "obs", "action_mask"):
                with pytest.raises(DumpError, match=rf"{bad}: {g}/ unreadable"):
                    list(d.iter_chunks(g, [col]))
    for args in (("summary", bad), ("sed", bad, "-o", tmp_path / "sed.png")):
        rc, err, secs = analyze(*args)
        assert_ends_clearly(bad, rc, err, secs)
    # the iteration column locates every row: damaged, the dump is refused whole, by name
    worse = corrupt(dump, tmp_path / "worse.h5", lambda name: name == "agent/iteration")
    with pytest.raises(DumpError, match=rf"{worse}: .*filter returned failure"):
        open_dump(worse)
    assert_ends_clearly(worse, *analyze("summary", worse))


def test_compare_over_a_sweep_holding_a_cut_dump(dump, tmp_path):
    root = tmp_path / "sweep"
    (root / "good").mkdir(parents=True)
    shutil.copy(dump, root / "good" / "trajectories.h5")
    data = dump.read_bytes()
    (root / "cut").mkdir()
    cut = root / "cut" / "trajectories.h5"
    cut.write_bytes(data[: data.find(GCOL_SIGNATURE) + 64])
    rc, err, secs = analyze("compare", root)
    assert rc == 0 and secs < LIMIT_S, err
    assert f"{cut}:" in err and "global heap" in err


def test_killed_writer_cut_in_its_heap(tmp_path):
    """A killed SWMR writer's file (flags set) cut inside the attribute heap: the salvage view, no SWMR retries."""
    path = tmp_path / "k.h5"
    w = TrajectoryWriter(path, config_yaml="algorithm: ippo\n", obs_dim=OBS_DIM, a_max=A_MAX, extra_metrics=EXTRA)
    w.append_rows("agent", decision_rows(0, 4, 5))
    w.end_iteration({"mean_travel_time": 100.0})
    w.close()
    data = path.read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data[: data.find(GCOL_SIGNATURE) + 64])
    rc, err, secs = analyze("summary", cut)
    assert_ends_clearly(cut, rc, err, secs)
    assert rc == 2 and "global heap" in err

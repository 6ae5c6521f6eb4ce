"""A run is never lost: signals reach every rank, damaged checkpoints are skipped, a dump and checkpoints
that disagree are refused, and a full disk ends with a clear error that keeps every committed iteration."""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from helpers.local_http import LocalHTTPServer, send_json

from reled_hpc.errors import ReledError
from reled_hpc.experiment.train import Trainer, train
from reled_hpc.io import TrajectoryReader

VENV_BIN = Path(sys.executable).parent
GRID_ENV = {"map": "grid", "n_agents": 10, "traffic": "light", "horizon_s": 600.0, "depart_window_s": 20.0,
            "min_trip_m": 400.0}  # fmt: skip


def _cfg(tmp_path: Path, name: str, runs: Path | None = None, **kw) -> Path:
    d = {"name": name, "algorithm": "ippo", "seed": 3, "iterations": 3, "episodes_per_iteration": 1,
         "checkpoint_every": 1, "runs_dir": str(runs or tmp_path / "runs"), "tensorboard": False}  # fmt: skip
    d["env"] = dict(GRID_ENV)
    d.update(kw)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def _committed(h5: Path) -> list[int]:
    with TrajectoryReader(h5) as r:
        return [int(i) for i in r.iterations()]


def _wait_committed(h5: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()[0]
        if h5.exists():
            try:
                if len(_committed(h5)) >= n:
                    return
            except (ReledError, OSError):
                pass  # the file is being created
        time.sleep(0.1)
    raise AssertionError(f"{h5} did not reach {n} iterations in {timeout} s")


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd:
                found.append(f"{d.name}: {cmd}")
    return found


def _launch(args: list[str]) -> subprocess.Popen:
    cmd = [str(VENV_BIN / "reled-hpc"), "train", *args, "--ranks", "2"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# ---- 1. signals reach every rank -------------------------------------------------------------------------
def test_sigterm_to_the_launcher_checkpoints_every_rank_and_resume_continues(tmp_path, grid):
    cfg = _cfg(tmp_path, "sig", iterations=100000, checkpoint_every=100000)
    run = tmp_path / "runs" / "sig"
    proc = _launch([str(cfg)])
    _wait_committed(run / "trajectories.h5", 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    # the launcher waited for the ranks' graceful stop and returns their status
    assert proc.returncode == 0, out
    assert "stopped by SIGTERM" in out, out
    deadline = time.time() + 10
    while _processes_mentioning(str(cfg)) and time.time() < deadline:
        time.sleep(0.2)
    assert not _processes_mentioning(str(cfg)), "a rank outlived its launcher"
    ckpts = sorted((run / "checkpoints").glob("ckpt_*.pt"))
    assert ckpts, "SIGTERM must leave a checkpoint"
    stopped = int(ckpts[-1].stem.split("_")[1])
    assert _committed(run / "trajectories.h5") == list(range(stopped + 1))
    proc = _launch(["--resume", str(run), "--set", f"iterations={stopped + 3}"])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert _committed(run / "trajectories.h5") == list(range(stopped + 3))


# ---- 2. damaged checkpoints, dump and checkpoints that disagree -------------------------------------------
DAMAGE = {
    "truncated": lambda b: b[: len(b) // 2],
    "empty": lambda b: b"",
    "text": lambda b: b"this is not a checkpoint\n" * 20,
    "random": lambda b: os.urandom(len(b)),
}


def test_damaged_checkpoint_is_named_and_an_older_good_one_is_used(tmp_path, grid, caplog):
    run = train(_cfg(tmp_path, "dmg"))[0]
    folder = run / "checkpoints"
    ckpts = sorted(folder.glob("ckpt_*.pt"))
    assert [p.name for p in ckpts] == ["ckpt_000000.pt", "ckpt_000001.pt", "ckpt_000002.pt"]
    assert all(p.with_name(p.name + ".sha256").exists() for p in ckpts)
    newest, good = ckpts[-1], ckpts[-1].read_bytes()
    for kind, damage in DAMAGE.items():
        for sidecar in (True, False):  # also a checkpoint whose sidecar never got written
            newest.write_bytes(damage(good))
            side = newest.with_name(newest.name + ".sha256")
            side_text = side.read_text()
            if not sidecar:
                side.unlink()
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="reled_hpc"):
                path, state = Trainer.good_checkpoint(folder)
            assert path == ckpts[1] and state["iteration"] == 1, kind
            assert newest.name in caplog.text, kind
            side.write_text(side_text)
    # none good: one clear error naming every file
    for p in ckpts:
        p.write_bytes(b"")
    with pytest.raises(ReledError, match="no usable checkpoint") as err:
        Trainer.good_checkpoint(folder)
    assert all(p.name in str(err.value) for p in ckpts)
    # end to end: the newest damaged, resume redoes iteration 2 from ckpt 1 without a gap
    run = train(_cfg(tmp_path, "dmg2"))[0]
    newest = sorted((run / "checkpoints").glob("ckpt_*.pt"))[-1]
    newest.write_bytes(newest.read_bytes()[:100])
    train(None, resume=run, overrides={"iterations": 5})  # type: ignore[arg-type]
    assert _committed(run / "trajectories.h5") == [0, 1, 2, 3, 4]
    assert "ckpt_000002.pt" in (run / "train.log").read_text()


def test_resume_refuses_a_dump_that_disagrees_with_the_checkpoints(tmp_path, grid):
    run = train(_cfg(tmp_path, "gap"))[0]
    dump = run / "trajectories.h5"
    dump.rename(tmp_path / "aside.h5")  # checkpoints without their dump: resuming would leave a gap
    with pytest.raises(ReledError, match=r"dump .* is missing or holds no committed iteration"):
        train(None, resume=run, overrides={"iterations": 5})  # type: ignore[arg-type]
    assert not dump.exists()
    (tmp_path / "aside.h5").rename(dump)
    for p in (run / "checkpoints").iterdir():
        p.unlink()  # committed iterations without a checkpoint: resuming would start over and drop them
    with pytest.raises(ReledError, match=r"committed iterations 0\.\.2 but there is no checkpoint"):
        train(None, resume=run, overrides={"iterations": 5})  # type: ignore[arg-type]
    assert _committed(dump) == [0, 1, 2]


# ---- 3. disk full ----------------------------------------------------------------------------------------
DISK_FULL = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from reled_hpc.errors import ReledError
    from reled_hpc.experiment.train import Trainer, train
    from reled_hpc.io import TrajectoryReader
    d, cfg = Path(sys.argv[1]), sys.argv[2]
    res = {}
    try:  # a checkpoint bigger than the room left
        Trainer.write_checkpoint(d / "ckpt_000007.pt", {"w": torch.rand(1_000_000)})
    except ReledError as exc:
        res["ckpt_error"] = str(exc)
    res["ckpt_files"] = sorted(p.name for p in d.iterdir() if p.is_file())
    try:  # train until the dump fills the disk
        train(cfg)
    except ReledError as exc:
        res["train_error"] = str(exc)
    run = d / "runs" / "full"
    with TrajectoryReader(run / "trajectories.h5") as r:
        res["committed"] = [int(i) for i in r.iterations()]
    try:  # no checkpoint yet: resume must not start over over the committed iterations
        train(None, resume=run)
    except ReledError as exc:
        res["resume_error"] = str(exc)
    print("RESULT " + json.dumps(res))
""")


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_500_000, 1_500_000))


def test_disk_full_gives_a_clear_error_and_keeps_committed_iterations(tmp_path, grid):
    d = tmp_path / "small"
    d.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(d)], capture_output=True,
                             text=True)  # fmt: skip
    preexec = None
    if mounted.returncode != 0:  # not root: a file size limit stands in for a full disk (EFBIG, not ENOSPC)
        preexec = _limit_file_size
        probe = subprocess.run([sys.executable, "-c", "open('/dev/null')"], preexec_fn=preexec)
        assert probe.returncode == 0, f"neither a tmpfs ({mounted.stderr.strip()}) nor RLIMIT_FSIZE works here"
    try:
        cfg = _cfg(tmp_path, "full", runs=d / "runs", iterations=100000, checkpoint_every=100000)
        res = subprocess.run([sys.executable, "-c", DISK_FULL, str(d), str(cfg)], capture_output=True, text=True,
                             timeout=240, preexec_fn=preexec)  # fmt: skip
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
        assert res.returncode == 0 and lines, res.stdout[-3000:] + res.stderr[-3000:]
        out = json.loads(lines[0][len("RESULT ") :])
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", str(d)], check=False)
    assert "ckpt_000007.pt" in out["ckpt_error"] and "bytes" in out["ckpt_error"], out
    assert "free" in out["ckpt_error"] or "limit" in out["ckpt_error"], out
    assert not [f for f in out["ckpt_files"] if f.endswith(".tmp")], out  # no half-written file left
    assert "trajectories.h5" in out["train_error"] and "bytes" in out["train_error"], out
    assert out["committed"] and out["committed"] == list(range(len(out["committed"]))), out
    assert "no checkpoint" in out["resume_error"] and "start over" in out["resume_error"], out


def test_disk_full_at_two_ranks_ends_every_rank_with_the_error_and_keeps_the_dump(tmp_path, grid):
    """The same full disk under `--ranks 2`: rank 0's clear error ends the whole MPI job (no rank left
    training, no segfault), and every committed iteration stays readable."""
    d = tmp_path / "small2"
    d.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(d)], capture_output=True,
                             text=True)  # fmt: skip
    assert mounted.returncode == 0, f"this test mounts a tmpfs (it runs as root in CI): {mounted.stderr}"
    try:
        cfg = _cfg(tmp_path, "full2", runs=d / "runs", iterations=100000, checkpoint_every=100000)
        res = subprocess.run([str(VENV_BIN / "reled-hpc"), "train", str(cfg), "--ranks", "2"], capture_output=True,
                             text=True, timeout=400)  # fmt: skip
        run = d / "runs" / "full2"
        committed = _committed(run / "trajectories.h5")
        in_shard = _committed(run / "trajectories.rank00000.h5")
    finally:
        subprocess.run(["umount", str(d)], check=False)
    assert res.returncode not in (0, 139, -11), res.returncode  # ended, and not by a segfault
    # rank 0's "reled-hpc: rank 0/2 failed: ..." (its CLI's "reled-hpc: error: ..." may be cut by the MPI
    # abort), in any order with mpich's "Abort(1) on node 0"
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("reled-hpc: ") and "bytes free" in ln]
    assert errors, res.stderr[-3000:]
    # the rank whose shard (or rank 0's master) hit the full disk names its file and what is kept
    # (the CLI's own "reled-hpc: error: ..." line, without the rank, may come last)
    found = [re.search(r"rank (\d)/2 failed: .*trajectories(\.rank0000(\d))?\.h5\b", ln) for ln in errors]
    m = next((x for x in found if x), None)
    assert m and (m.group(3) is None or m.group(3) == m.group(1)), errors
    assert committed and committed == list(range(len(committed))), committed
    # the master shows every committed iteration, or one less if the disk filled while it was replaced
    assert in_shard[: len(committed)] == committed and len(in_shard) - len(committed) in (0, 1), (in_shard, committed)
    if m.group(1) == "0" and m.group(3) == "0":
        assert f"iterations up to {in_shard[-1]} are committed" in m.string, m.string
    assert not _processes_mentioning(str(cfg)), "a rank outlived the failed job"


class _LateLLM(LocalHTTPServer):
    """An OpenAI-style server that answers GET /v1/models (readiness) and counts chat requests; its
    reply holds no program, so each request shows up as one rejected program in the dump."""

    def __init__(self) -> None:
        import http.server

        self.posts = 0
        late = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                send_json(self, {"data": [{"id": "late"}]})

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                late.posts += 1
                msg = {"role": "assistant", "content": "no program today"}
                send_json(self, {"choices": [{"message": msg, "finish_reason": "stop"}],
                            "usage": {"prompt_tokens": 3, "completion_tokens": 3}})  # fmt: skip

        super().__init__(Handler)


def _llm_cfg(tmp_path: Path, name: str, endpoint: Path, **llm) -> Path:
    return _cfg(tmp_path, name, algorithm="reled", iterations=3, hpo={"expert": "llm"},
                llm={"endpoint": str(endpoint), "model": "late", "wait_s": 1.0, "cache": False, **llm},
                sed={"m": 1, "r_max_rounds": 1, "measure_external": False})  # fmt: skip


def test_missing_endpoint_file_falls_back_like_a_dead_server_then_is_picked_up(tmp_path, grid, caplog):
    from reled_hpc.llm.server import Endpoint, write_endpoint_file

    srv, ep_dir = _LateLLM(), tmp_path / "llm"
    ep_dir.mkdir()

    class StartServerOnFallback(logging.Handler):  # the server job turns up after the first cycle fell back
        def emit(self, record: logging.LogRecord) -> None:
            msg, there = record.getMessage(), (ep_dir / "endpoint.json").exists()
            if msg.startswith("SED cycle") and "fallback demonstration" in msg and not there:
                write_endpoint_file(ep_dir, Endpoint(srv.url, "late", "embedded"))

    hook = StartServerOnFallback()
    logging.getLogger("reled_hpc").addHandler(hook)
    caplog.set_level(logging.INFO, logger="reled_hpc")
    try:
        t0 = time.monotonic()
        run, _ = train(_llm_cfg(tmp_path, "late", ep_dir))
        elapsed = time.monotonic() - t0
    finally:
        logging.getLogger("reled_hpc").removeHandler(hook)
        srv.close()
    assert _committed(run / "trajectories.h5") == [0, 1, 2]  # nothing waited 900 s, nothing failed
    assert elapsed < 120, elapsed
    assert "llm.on_unavailable=fallback" in caplog.text and "answers now" in caplog.text, caplog.text
    assert srv.posts == 2  # iterations 1 and 2 asked the late server, one subset, one round each
    with TrajectoryReader(run / "trajectories.h5") as r:
        assert sorted(set(r.programs()["iteration"].tolist())) == [1, 2]


def test_missing_endpoint_file_stops_the_run_when_on_unavailable_is_error(tmp_path, grid):
    missing = tmp_path / "nowhere"
    t0 = time.monotonic()
    with pytest.raises(ReledError, match="nowhere"):
        train(_llm_cfg(tmp_path, "strict", missing, on_unavailable="error"))
    assert time.monotonic() - t0 < 60
    run = tmp_path / "runs" / "strict"
    assert not (run / "checkpoints").exists() or not list((run / "checkpoints").glob("*.pt"))

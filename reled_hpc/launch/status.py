"""`reled-hpc status SWEEP_OR_RUN`: job states from the scheduler (sacct) or from submitit's
result files (local executor), progress from each run's HDF5 dump, failures from the job logs."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import ReledError
from ..experiment.run_dir import RunDir
from .records import REQUEUE_FILE, SUBMIT_FILE, SWEEP_FILE

SACCT_FIELDS = ("JobID", "State", "ExitCode", "Submit", "Start", "End", "Elapsed")


def _time(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text)
    except ValueError:  # Unknown / None
        return None


def sacct(job_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Allocation-level accounting rows per job id (array tasks as ARRAY_TASK)."""
    if not job_ids:
        return {}
    cmd = ["sacct", "-n", "-P", "-X", "-j", ",".join(sorted({j.split("_")[0] for j in job_ids}))]
    cmd.append("--format=" + ",".join(SACCT_FIELDS))
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError as exc:
        raise ReledError("sacct not found: status of SLURM jobs needs the SLURM client tools") from exc
    if out.returncode != 0:
        raise ReledError(f"sacct failed (is accounting, slurmdbd, running?): {out.stderr.strip()}")
    rows: dict[str, dict[str, Any]] = {}
    for line in out.stdout.splitlines():
        parts = line.split("|")
        if len(parts) != len(SACCT_FIELDS):
            continue
        row = dict(zip(SACCT_FIELDS, parts, strict=True))
        row["State"] = row["State"].split()[0]  # "CANCELLED by 0" -> CANCELLED
        jid = row["JobID"]
        if "_[" in jid:  # pending array tasks, e.g. 12_[2-3%2]
            base, rng = jid.split("_[", 1)
            for part in rng.split("%")[0].rstrip("]").split(","):
                lo, _, hi = part.partition("-")
                for k in range(int(lo), int(hi or lo) + 1):
                    rows[f"{base}_{k}"] = {**row, "JobID": f"{base}_{k}"}
        else:
            rows[jid] = row
    return rows


def _local_state(folder: Path, job_id: str) -> str:
    """A submitit local job: its result file says how it ended; without one, its pid is alive or not."""
    for res in sorted(folder.glob(f"{job_id}_*result.pkl")):
        with open(res, "rb") as f:
            outcome = pickle.load(f)[0]
        return "COMPLETED" if outcome == "success" else "FAILED"
    try:
        os.kill(int(job_id), 0)
        return "RUNNING"
    except (ProcessLookupError, ValueError):
        return "LOST"  # no result and no process: killed from outside
    except PermissionError:
        return "RUNNING"


def _failure(folder: Path, job_id: str) -> str:
    """The last error line of a job's logs."""
    for log in sorted(folder.glob(f"{job_id}_*log.err"), reverse=True):
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        for ln in reversed(lines):
            if "Error" in ln or "error" in ln:
                return ln.strip()[:300]
        if lines:
            return lines[-1].strip()[:300]
    return ""


def _progress(run_dir: Path, iterations_total: int | None) -> dict[str, Any]:
    from ..io import TrajectoryReader

    out: dict[str, Any] = {"iterations": 0, "of": iterations_total, "travel_time": None}
    h5 = RunDir(run_dir).commit_dump
    if h5.exists():
        try:
            with warnings.catch_warnings():
                # a live run always has an unfinished iteration: the reader's warning is expected here
                warnings.simplefilter("ignore", RuntimeWarning)
                r = TrajectoryReader(h5)
            with r:
                m = r.metrics()
                out["iterations"] = len(m["iteration"])
                if out["of"] is None:
                    out["of"] = int((r.config() or {}).get("iterations", 0)) or None
                if len(m["iteration"]):
                    out["travel_time"] = float(m["mean_travel_time"][-1])
        except ReledError as exc:
            # the writer holds an exclusive lock while it creates the file (before SWMR): not an error
            out["error" if "unable to lock file" not in str(exc) else "note"] = str(exc)
    rq = run_dir / REQUEUE_FILE
    out["requeues"] = len(json.loads(rq.read_text())) if rq.exists() else 0
    return out


def collect(path: Path | str) -> dict[str, Any]:
    """Rows (one per run) describing a sweep folder or a submitted run folder."""
    path = Path(path)
    if (path / SWEEP_FILE).exists():
        rec = json.loads((path / SWEEP_FILE).read_text())
        folder = path / "submitit"
        items = [(t["name"], str(t["job_id"]), Path(t["run_dir"]), t.get("iterations")) for t in rec["tasks"]]
    elif (path / SUBMIT_FILE).exists():
        recs = json.loads((path / SUBMIT_FILE).read_text())
        rec = recs[-1]  # the latest submission of this run
        folder = path / "submitit"
        items = [(path.name, str(rec["job_id"]), path, rec.get("iterations"))]
    else:
        raise ReledError(f"{path} is neither a sweep folder ({SWEEP_FILE}) nor a submitted run folder ({SUBMIT_FILE})")
    slurm = rec["cluster"] == "slurm"
    acct = sacct([j for _, j, _, _ in items]) if slurm else {}
    rows = []
    for name, jid, run_dir, planned in items:
        a = acct.get(jid)
        # sacct lists pending array tasks as a range; a task that is in neither form was cancelled
        # (or removed) before it ever started
        missing = "NEVER_RAN" if "_" in jid else "UNKNOWN"  # a fresh plain job may lag in sacct
        state = (a["State"] if a else missing) if slurm else _local_state(folder, jid)
        its = planned
        cfg = RunDir(run_dir).config
        if cfg.exists():
            import yaml

            its = (yaml.safe_load(cfg.read_text()) or {}).get("iterations", its)
        row: dict[str, Any] = {"run": name, "job": jid, "state": state, **_progress(run_dir, its)}
        if a:
            sub, start = _time(a["Submit"]), _time(a["Start"])
            row["elapsed"] = a["Elapsed"]
            row["wait_s"] = (start - sub).total_seconds() if sub and start else None
            row["exit"] = a["ExitCode"]
        if state in ("FAILED", "LOST", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"):
            row["failure"] = _failure(folder, jid)
        rows.append(row)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    return {"path": str(path), "kind": rec["kind"], "cluster": rec["cluster"], "counts": counts, "runs": rows}


def format_status(st: dict[str, Any]) -> str:
    lines = [f"{st['kind']} {st['path']} ({st['cluster']}): " + ", ".join(f"{v} {k}" for k, v in st["counts"].items())]
    w = max(len(r["run"]) for r in st["runs"])
    for r in st["runs"]:
        prog = f"{r['iterations']}/{r['of'] if r['of'] is not None else '?'} it"
        t = r.get("travel_time")
        tt = f"travel {t:.1f} s" if t is not None and t == t else ""  # t != t: NaN, nobody arrived yet
        extra = f"requeued {r['requeues']}x" if r.get("requeues") else ""
        lines.append(f"  {r['run'].ljust(w)}  {r['job']:>10}  {r['state']:<10} {prog:>10}  {tt:<18} {extra}".rstrip())
        if r.get("failure"):
            lines.append(f"      failure: {r['failure']}")
        if r.get("error"):
            lines.append(f"      dump: {r['error']}")
    return "\n".join(lines)

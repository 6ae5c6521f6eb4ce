"""The local single-node SLURM (slurm/local/start.sh) really runs jobs: sbatch, MPI via srun, scancel, submitit."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slurm

# the Debian SLURM 22.05 has mpi/pmi2 (works with the pip mpich wheel), none, pmix (no PMIx library: fails)
MPI_FLAG = "--mpi=pmi2"


def test_sbatch_wrap_completes(slurm_cluster, tmp_path):
    out = tmp_path / "hello.txt"
    job = slurm_cluster.sbatch(
        "-D", str(tmp_path), "-o", str(tmp_path / "slurm-%j.out"), "--wrap", f"echo hello > {out}"
    )
    assert slurm_cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=30) == "COMPLETED"
    assert out.read_text().strip() == "hello"


def test_srun_mpi_two_ranks(slurm_cluster, tmp_path):
    script = tmp_path / "mpi.sh"
    code = "from mpi4py import MPI; c = MPI.COMM_WORLD; print(c.Get_rank(), c.Get_size(), flush=True)"
    script.write_text(f"#!/bin/bash\nset -e\nsrun {MPI_FLAG} {sys.executable} -c '{code}'\n")
    log = tmp_path / "mpi.out"
    job = slurm_cluster.sbatch("-n", "2", "-D", str(tmp_path), "-o", str(log), str(script))
    state = slurm_cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=45)
    text = log.read_text()
    assert state == "COMPLETED", text
    lines = sorted(ln.strip() for ln in text.splitlines() if ln.strip() and ln.strip()[0].isdigit())
    assert lines == ["0 2", "1 2"], text


def test_scancel_reported_cancelled(slurm_cluster, tmp_path):
    job = slurm_cluster.sbatch("-D", str(tmp_path), "-o", "/dev/null", "--wrap", "sleep 300")
    slurm_cluster.wait_state(job, "RUNNING", timeout=20)
    subprocess.run(["scancel", job], check=True, timeout=30)
    assert slurm_cluster.wait_state(job, "CANCELLED", timeout=30) == "CANCELLED"
    slurm_cluster.wait_gone(job, timeout=30)


def test_start_again_is_noop(slurm_cluster):
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(slurm_cluster.start_script)], capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    assert "already up" in r.stdout, r.stdout + r.stderr
    assert elapsed < 5, f"second start.sh took {elapsed:.1f}s"


def test_submitit_job(slurm_cluster, tmp_path):
    import submitit

    ex = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    ex.update_parameters(timeout_min=5, slurm_partition=slurm_cluster.partition)
    # a stdlib function: one defined in this module would be pickled by reference, and the job's python
    # cannot import test modules (tests/ is not on its sys.path)
    job = ex.submit(math.factorial, 5)
    end = time.monotonic() + 60
    while not job.done():
        assert time.monotonic() < end, f"submitit job {job.job_id} not done after 60s (state {job.state})"
        time.sleep(0.2)
    assert job.result() == 120
    # accounting catches up within a second or two; submitit reads the state from sacct
    state = slurm_cluster.wait_state(job.job_id, "COMPLETED", timeout=30)
    assert job.get_info(mode="force").get("State") == state
    assert job.state == "COMPLETED"

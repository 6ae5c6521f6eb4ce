"""Session fixture `slurm_cluster`: a real single-node SLURM (slurm/local/start.sh) for tests.

Import it from tests/conftest.py (`from slurm_fixture import slurm_cluster`). Not root or the Debian
packages missing is a failure, not a skip: a skipped SLURM test must not count as passing.
The cluster is stopped at session end only when this fixture started it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCAL = REPO / "slurm" / "local"
APT_LINE = (
    "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "
    "slurmctld slurmd slurm-client munge slurmdbd mariadb-server"
)
_NEEDED = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd", "sbatch", "srun", "sacct", "sacctmgr", "sinfo")
_DAEMONS = {  # name of the pid file in STATE/run -> programs it may be
    "munged": ("munged",),
    "mariadb": ("mariadbd", "mysqld"),
    "slurmdbd": ("slurmdbd",),
    "slurmctld": ("slurmctld",),
    "slurmd": ("slurmd",),
}
_START_TIMEOUT = 300


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


def _run(cmd: list[str], timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


@dataclass
class SlurmCluster:
    state_dir: Path
    partition: str
    started_here: bool
    start_output: str

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "log"

    @property
    def start_script(self) -> Path:
        return LOCAL / "start.sh"

    @property
    def stop_script(self) -> Path:
        return LOCAL / "stop.sh"

    def sbatch(self, *args: str, cwd: str | os.PathLike | None = None) -> str:
        """Submit with `sbatch --parsable ARGS`; returns the job id."""
        r = _run(["sbatch", "--parsable", "-p", self.partition, *args], cwd=cwd)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout.strip().split(";")[0]

    def sacct_state(self, job_id: str | int) -> str:
        """The job's state in accounting ("COMPLETED", "CANCELLED", ...), "" while sacct does not know it yet."""
        r = _run(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State"])
        if r.returncode != 0:
            return ""
        lines = [ln.strip() for ln in r.stdout.splitlines() if ln.strip()]
        return lines[0].split()[0] if lines else ""  # "CANCELLED by 0" -> "CANCELLED"

    def wait_state(
        self, job_id: str | int, states: str | Iterable[str], timeout: float = 30, release_requeued: bool = False
    ) -> str:
        """Poll sacct until the job is in one of `states`; returns it, raises TimeoutError otherwise.
        `release_requeued`: start a PENDING (requeued) job now instead of after slurmctld's 120 s
        BeginTime hold, which is the scheduler's policy, not what the tests check."""
        wanted = {states} if isinstance(states, str) else set(states)
        end = time.monotonic() + timeout
        state = ""
        while time.monotonic() < end:
            state = self.sacct_state(job_id)
            if state in wanted:
                return state
            if release_requeued and state == "PENDING":
                _run(["scontrol", "update", f"jobid={job_id}", "starttime=now"])
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id}: sacct state {state!r} after {timeout}s, wanted one of {sorted(wanted)}")

    def wait_gone(self, job_id: str | int, timeout: float = 30) -> None:
        """Wait until squeue no longer lists the job (it finished, however)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            r = _run(["squeue", "-h", "-j", str(job_id), "-o", "%i"])
            if r.returncode == 0 and not r.stdout.strip():
                return
            time.sleep(0.1)
        raise TimeoutError(f"job {job_id} still in squeue after {timeout}s")


def _running_daemons(state_dir: Path) -> list[str]:
    """Daemons whose PID start.sh recorded and that are still that program."""
    up = []
    for name, comms in _DAEMONS.items():
        try:
            pid = int((state_dir / "run" / f"{name}.pid").read_text())
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if Path(f"/proc/{pid}/comm").read_text().strip() in comms and state != "Z":
                up.append(name)
        except (OSError, ValueError):
            pass
    return up


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running local SLURM (partition `debug`, accounting via slurmdbd)."""
    if os.geteuid() != 0:
        pytest.fail(f"the SLURM tests need root (they run slurm/local/start.sh). Packages: {APT_LINE}", pytrace=False)
    missing = [b for b in _NEEDED if _which(b) is None]
    if missing:
        pytest.fail(f"SLURM packages missing ({', '.join(missing)} not found); install them: {APT_LINE}", pytrace=False)

    state_dir = Path(os.environ.get("RELED_SLURM_DIR", "/var/lib/reled-slurm"))
    already = _running_daemons(state_dir)
    try:
        r = _run(["bash", str(LOCAL / "start.sh")], timeout=_START_TIMEOUT)
        failure = None if r.returncode == 0 else f"failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    except subprocess.TimeoutExpired as e:
        failure = f"did not finish in {_START_TIMEOUT}s:\n{e.stdout}\n{e.stderr}"
    if failure is not None:
        if not already:  # do not leave a half-started cluster behind
            _run(["bash", str(LOCAL / "stop.sh")], timeout=120)
        pytest.fail(f"slurm/local/start.sh {failure}\n(logs: {state_dir / 'log'})", pytrace=False)

    cluster = SlurmCluster(
        state_dir=state_dir,
        partition="debug",
        started_here=not already and "already up" not in r.stdout,
        start_output=r.stdout + r.stderr,
    )
    yield cluster
    if cluster.started_here:
        _run(["bash", str(LOCAL / "stop.sh")], timeout=120)

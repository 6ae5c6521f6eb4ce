"""Shared fixtures. Maps are built once per session into a private cache (real netconvert, osmnx)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from slurm_fixture import slurm_cluster  # noqa: F401  (session fixture: the real local SLURM)

# one private map cache for the whole session, set before any reled_hpc import reads it
_CACHE = Path(os.environ.get("RELED_HPC_TEST_CACHE", "/tmp/reled_hpc_test_cache_" + str(os.getpid())))
os.environ["RELED_HPC_CACHE"] = str(_CACHE)

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def helsinki():
    from reled_hpc.sim.maps import resolve_map

    return resolve_map("helsinki")


@pytest.fixture(scope="session")
def grid():
    from reled_hpc.sim.maps import resolve_map

    return resolve_map("grid")


@pytest.fixture(scope="session")
def ingolstadt():
    from reled_hpc.sim.maps import resolve_map

    return resolve_map("ingolstadt")


@pytest.fixture
def cli():
    """Run the real console script in a subprocess; returns CompletedProcess."""
    import subprocess

    def run(*args: str, check: bool = False, timeout: float = 300):
        return subprocess.run(
            [str(VENV_BIN / "reled-hpc"), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            env=os.environ.copy(),
        )

    return run


def pytest_sessionfinish(session, exitstatus):
    import shutil

    if "RELED_HPC_TEST_CACHE" not in os.environ:
        shutil.rmtree(_CACHE, ignore_errors=True)

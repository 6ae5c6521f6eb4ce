"""Locating the SUMO installation (the `eclipse-sumo` wheel) and running its command-line tools."""

from __future__ import annotations

import os
import subprocess
from functools import lru_cache
from pathlib import Path

from ..errors import MapError, SetupError


@lru_cache(maxsize=1)
def sumo_home() -> Path:
    """SUMO_HOME: the environment variable if set, else the `eclipse-sumo` wheel's copy."""
    env = os.environ.get("SUMO_HOME")
    if env and Path(env, "bin").is_dir():
        return Path(env)
    try:
        import sumo  # the eclipse-sumo wheel
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise SetupError("SUMO not found: install the 'eclipse-sumo' package or set SUMO_HOME") from exc
    home = Path(sumo.SUMO_HOME)
    os.environ.setdefault("SUMO_HOME", str(home))
    return home


def binary(name: str) -> Path:
    """Path of a SUMO executable such as `netconvert`, with a clear error when it is missing."""
    path = sumo_home() / "bin" / name
    if not path.exists():
        raise SetupError(f"SUMO binary {name!r} not found at {path}")
    return path


def run_tool(name: str, args: list[str], what: str, cwd: Path | None = None) -> str:
    """Run a SUMO binary; on failure raise MapError with the tool's own message (`what` names the input)."""
    cmd = [str(binary(name)), *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise MapError(f"{name} failed on {what} (exit {proc.returncode}):\n{tail}")
    return proc.stderr

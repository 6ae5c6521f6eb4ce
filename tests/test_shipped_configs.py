"""Every config and sweep file the repository ships loads and expands: the experiment commands in
docs/results.md must not fail on a typo in a file nobody ran for a while."""

from __future__ import annotations

from pathlib import Path

import pytest

from reled_hpc.experiment.config import load_config
from reled_hpc.launch.sweep import plan

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted([*REPO.glob("configs/*.yaml"), *REPO.glob("configs/scale/*.yaml")])
SWEEPS = sorted([*REPO.glob("configs/experiments/*.yaml"), *REPO.glob("configs/sweeps/*.yaml")])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_config_loads(path):
    cfg = load_config(path)
    if cfg.env.demand.kind == "file":  # relative to the repository root, where the docs run it
        assert (REPO / cfg.env.demand.file).exists(), cfg.env.demand.file


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_sweep_expands(path, tmp_path):
    _, _, tasks = plan(path, out=tmp_path)
    assert tasks and len({t.name for t in tasks}) == len(tasks)


def test_the_lists_are_not_empty():
    assert len(CONFIGS) >= 8 and len(SWEEPS) >= 8

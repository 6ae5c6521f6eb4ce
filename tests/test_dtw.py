"""DTW distance and HPO alpha (reled_hpc.learn.dtw) against a brute-force DTW written here."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest

from reled_hpc.learn import dtw
from reled_hpc.learn.dtw import FastDTWExtensionError, batch_dtw, dtw_distance, hpo_alpha


def brute_dtw(x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    """Classic O(n*m) DTW with euclidean point cost; returns (total cost, length of the optimal path)."""
    n, m = len(x), len(y)
    cost = np.linalg.norm(x[:, None, :] - y[None, :, :], axis=-1)
    acc = np.full((n + 1, m + 1), np.inf)
    steps = np.zeros((n + 1, m + 1), dtype=int)
    acc[0, 0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            prev = [
                (acc[i - 1, j - 1], steps[i - 1, j - 1]),
                (acc[i - 1, j], steps[i - 1, j]),
                (acc[i, j - 1], steps[i, j - 1]),
            ]
            best, k = min(prev, key=lambda p: p[0])
            acc[i, j] = cost[i - 1, j - 1] + best
            steps[i, j] = k + 1
    return float(acc[n, m]), int(steps[n, m])


def test_matches_brute_force_exact_radius():
    rng = np.random.default_rng(0)
    for _ in range(40):
        n, m = rng.integers(1, 13, size=2)
        x, y = rng.uniform(0, 500, (n, 2)), rng.uniform(0, 500, (m, 2))
        scale = 250.0
        total, path_len = brute_dtw(x / scale, y / scale)
        assert dtw_distance(x, y, scale, radius=12) == pytest.approx(total / path_len, rel=1e-9)


def test_identical_is_zero_and_symmetric():
    rng = np.random.default_rng(1)
    x, y = rng.uniform(0, 100, (9, 2)), rng.uniform(0, 100, (6, 2))
    assert dtw_distance(x, x, 100.0) == 0.0
    assert dtw_distance(x, y, 100.0, radius=10) == pytest.approx(dtw_distance(y, x, 100.0, radius=10), rel=1e-12)


def test_scale_normalisation():
    rng = np.random.default_rng(2)
    x, y = rng.uniform(0, 100, (7, 2)), rng.uniform(0, 100, (11, 2))
    d = dtw_distance(x, y, 100.0, radius=3)
    assert dtw_distance(2 * x, 2 * y, 200.0, radius=3) == pytest.approx(d, rel=1e-12)
    # a constant offset of 30 m on a 100 m scale: every matched pair is 0.3 apart
    assert dtw_distance(x, x + np.array([30.0, 0.0]), 100.0, radius=10) == pytest.approx(0.3, rel=1e-12)


def test_does_not_grow_with_length():
    t = np.linspace(0, 1, 10)[:, None]
    short = np.hstack([t, np.zeros_like(t)])
    t2 = np.linspace(0, 1, 100)[:, None]
    long = np.hstack([t2, np.zeros_like(t2)])
    assert dtw_distance(short, short + np.array([0.0, 0.1]), 1.0) == pytest.approx(0.1)
    assert dtw_distance(long, long + np.array([0.0, 0.1]), 1.0) == pytest.approx(0.1)


def test_bad_input():
    with pytest.raises(ValueError, match="empty"):
        dtw_distance(np.zeros((0, 2)), np.zeros((3, 2)), 1.0)
    with pytest.raises(ValueError, match="agent_xy is empty"):
        dtw_distance(np.zeros((3, 2)), np.zeros((0, 2)), 1.0)
    with pytest.raises(ValueError, match=r"\(T, 2\)"):
        dtw_distance(np.zeros((3, 3)), np.zeros((3, 2)), 1.0)
    with pytest.raises(ValueError, match="scale"):
        dtw_distance(np.zeros((3, 2)), np.zeros((3, 2)), 0.0)


def test_batch_dtw():
    rng = np.random.default_rng(3)
    pairs = [(rng.uniform(0, 10, (k, 2)), rng.uniform(0, 10, (k + 2, 2))) for k in range(1, 6)]
    out = batch_dtw(pairs, 10.0, radius=2)
    assert out.shape == (5,)
    np.testing.assert_allclose(out, [dtw_distance(e, a, 10.0, radius=2) for e, a in pairs])
    assert batch_dtw([], 10.0).shape == (0,)


def test_hpo_alpha():
    assert hpo_alpha(0.0, 3.0) == 1.0
    assert hpo_alpha(2.0, 0.0) == 1.0
    assert hpo_alpha(0.5, 2.0) == pytest.approx(np.exp(-1.0))
    a = hpo_alpha(np.linspace(0, 5, 20), 1.5)
    assert isinstance(a, np.ndarray) and np.all(np.diff(a) < 0) and a[0] == 1.0
    with pytest.raises(ValueError, match="kappa"):
        hpo_alpha(1.0, -0.1)
    with pytest.raises(ValueError):
        hpo_alpha(-1.0, 1.0)


def test_uses_fastdtw_c_extension():
    assert dtw._fastdtw.__module__ == "fastdtw._fastdtw"
    assert type(dtw._fastdtw).__name__ != "function"  # compiled (cython), not the pure-Python fallback


def test_missing_c_extension_fails_loudly(monkeypatch):
    monkeypatch.setitem(sys.modules, "fastdtw._fastdtw", None)  # makes `import fastdtw._fastdtw` fail
    monkeypatch.delitem(sys.modules, "reled_hpc.learn.dtw")
    # the re-import defines a fresh class object, so check by name and by the ImportError base
    with pytest.raises(ImportError, match=r"scripts/setup_venv\.sh") as err:
        importlib.import_module("reled_hpc.learn.dtw")
    assert type(err.value).__name__ == FastDTWExtensionError.__name__

"""DTW distance between expert and agent trajectories, and the HPO weight alpha = exp(-kappa * D).

D is the fastdtw total (euclidean point distance, positions divided by the map's length scale)
divided by the length of the warping path: the mean distance between matched points, in
map-scale units, so it does not grow with trajectory length and kappa means the same on any map.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from reled_hpc.errors import SetupError

__all__ = ["FastDTWExtensionError", "batch_dtw", "dtw_distance", "hpo_alpha"]


class FastDTWExtensionError(SetupError, ImportError):
    """fastdtw is installed without its compiled C extension (the pure-Python fallback is ~100x slower)."""


try:
    # import the C extension directly: `fastdtw.fastdtw` silently falls back to pure Python
    from fastdtw._fastdtw import fastdtw as _fastdtw
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise FastDTWExtensionError(
        "fastdtw's C extension (fastdtw._fastdtw) cannot be imported; the pure-Python fallback is too slow "
        "for 1000+ agents. Run scripts/setup_venv.sh to reinstall fastdtw with its extension."
    ) from exc

_EUCLIDEAN = 2  # fastdtw's C path computes the p-norm for an int p without Python callbacks


def _xy(name: str, a: np.ndarray) -> np.ndarray:
    arr = np.ascontiguousarray(a, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name} must have shape (T, 2) of x, y positions in metres, got {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty: DTW needs at least one position per trajectory")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite positions")
    return arr


def dtw_distance(expert_xy: np.ndarray, agent_xy: np.ndarray, scale: float, radius: int = 1) -> float:
    """Mean matched-point euclidean distance of the fastdtw alignment, in units of `scale` (metres).

    `radius` is fastdtw's neighbourhood; radius >= max(len) gives exact DTW.
    """
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive length in metres, got {scale}")
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    e = _xy("expert_xy", expert_xy) / scale
    a = _xy("agent_xy", agent_xy) / scale
    total, path = _fastdtw(e, a, radius=int(radius), dist=_EUCLIDEAN)
    return float(total) / len(path)


def batch_dtw(pairs: Iterable[tuple[np.ndarray, np.ndarray]], scale: float, radius: int = 1) -> np.ndarray:
    """`dtw_distance` for each (expert_xy, agent_xy) pair, shape (len(pairs),); linear in the number of pairs."""
    return np.array([dtw_distance(e, a, scale, radius) for e, a in pairs], dtype=np.float64)


def hpo_alpha(d: float | np.ndarray, kappa: float) -> float | np.ndarray:
    """alpha = exp(-kappa * d): 1 when the agent follows the expert, towards 0 as it strays."""
    if not (np.isfinite(kappa) and kappa >= 0):
        raise ValueError(f"kappa must be a finite number >= 0, got {kappa}")
    arr = np.asarray(d, dtype=np.float64)
    if not (arr >= 0).all():  # also catches NaN
        raise ValueError("DTW distances must be >= 0 (and not NaN)")
    out = np.exp(-kappa * arr)
    return float(out) if out.ndim == 0 else out

"""Reductions over the finite values only.

NaN in metrics means "not measured" (an iteration that reused its SED cycle, a run where nobody
arrived), so reductions skip it; with nothing finite left they return NaN, without numpy's
empty-slice warning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np


def finite_stat(values: Iterable[float] | np.ndarray, fn: Callable[[np.ndarray], Any]) -> float:
    v = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, np.float64)
    v = v[np.isfinite(v)]
    return float(fn(v)) if v.size else math.nan


def finite_mean(values: Iterable[float] | np.ndarray) -> float:
    return finite_stat(values, np.mean)


def finite_max(values: Iterable[float] | np.ndarray) -> float:
    return finite_stat(values, np.max)


def finite_sum(values: Iterable[float] | np.ndarray) -> float:
    return finite_stat(values, np.sum)

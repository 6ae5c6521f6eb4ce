"""Random partition of the agents into SED's m disjoint subsets S_1..S_m (docs/architecture.md section 3.3).

Re-drawn each refinement cycle: `partition_for_cycle(ids, m, seed, cycle)` seeds a generator from
(seed, cycle), so a run is reproducible and consecutive cycles get different subsets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

__all__ = ["partition_for_cycle", "random_partition"]

T = TypeVar("T")


def random_partition(agent_ids: Sequence[T], m: int, rng: np.random.Generator | int | None = None) -> list[list[T]]:
    """Shuffle `agent_ids` with `rng` and cut them into min(m, n) disjoint subsets that cover every
    agent once, sizes differing by at most 1 (larger subsets first).

    m > n is clamped to n rather than refused: late in an episode fewer agents may remain than m, and
    an empty subset would mean a prompt with no agent to route. n == 0 gives []. The result depends
    on the order of `agent_ids` (pass them in a fixed order for reproducibility)."""
    if isinstance(m, bool) or int(m) != m or m < 1:
        raise ValueError(f"m (the number of subsets) must be an integer >= 1, got {m!r}")
    ids = list(agent_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("agent ids must be unique")
    n = len(ids)
    if n == 0:
        return []
    k = min(int(m), n)
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    order = gen.permutation(n)
    base, extra = divmod(n, k)
    out: list[list[T]] = []
    start = 0
    for j in range(k):
        size = base + (1 if j < extra else 0)
        out.append([ids[i] for i in order[start : start + size]])
        start += size
    return out


def partition_for_cycle(agent_ids: Sequence[T], m: int, seed: int, cycle: int) -> list[list[T]]:
    """`random_partition` with a generator seeded by (seed, cycle): the same for the same (seed, cycle),
    a fresh draw for each cycle."""
    return random_partition(agent_ids, m, np.random.default_rng([int(seed), int(cycle)]))

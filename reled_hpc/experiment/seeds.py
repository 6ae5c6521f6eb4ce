"""Seeds and episode numbers as pure functions of the config: a resumed or re-run job, with any
number of ranks, sees exactly the scenarios and samples the uninterrupted run saw."""

from __future__ import annotations

import hashlib
from typing import Any


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from a path of labels and numbers (stable across processes and machines)."""
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def scenario_seed(cfg: Any, iteration: int, k: int, rank: int = 0) -> int:
    """The traffic scenario of a rank's episode k: iterations of one hpo.scenario_period share it."""
    return derive_seed("scenario", cfg.seed, iteration // cfg.hpo.scenario_period, rank, k)


def eval_seed(cfg: Any, rank: int, k: int) -> int:
    """A rank's held-out evaluation scenario k: its own seed stream, never a training scenario's."""
    return derive_seed("eval-scenario", cfg.seed, rank, k)


def actor_seed(cfg: Any, iteration: int, rank: int) -> int:
    """Seed of a rank's action sampling: with scenario_seed, every rollout is a pure function of
    (weights, config, iteration, rank), however many ranks run."""
    return derive_seed("actor", cfg.seed, iteration, rank)


def episode_index(cfg: Any, iteration: int, rank: int, ranks: int, k: int) -> int:
    """The dump's episode number of a rank's episode k: unique over ranks and iterations."""
    return (iteration * ranks + rank) * cfg.episodes_per_iteration + k


def expert_seed(cfg: Any, rank: int) -> int:
    """Seed of a rank's LLM expert (subset partition and sampling)."""
    return cfg.seed * 1_009 + rank

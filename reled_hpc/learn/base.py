"""The learner interface the training loop drives (PPOLearner, QMIXLearner)."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from .rollout import Actor, Batch


class Learner(Protocol):
    net: Any  # the shared policy network (PointerNet)

    def begin_iteration(self, iteration: int) -> None:
        """Called on every rank before iteration `iteration` rolls out (schedules such as epsilon)."""
        ...

    def reseed_actor(self, seed: int) -> None: ...
    def actor(self, greedy: bool = False) -> Actor: ...

    def update(
        self, batch: Batch, expert: Batch | None, alpha: np.ndarray | None, n_agents: int, comm: Any = None
    ) -> dict[str, float]:
        """One update; returns loss statistics by name. Central (comm None): every rank's rows, on rank 0.
        Data-parallel (a comm of R > 1 ranks, PPO family only): this rank's rows, called on every rank,
        the result equal to the central update on all ranks' rows (see PPOLearner.update)."""
        ...

    def flat_weights(self) -> np.ndarray: ...
    def load_flat_weights(self, vec: np.ndarray) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

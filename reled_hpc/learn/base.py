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

    def update(self, batch: Batch, expert: Batch | None, alpha: np.ndarray | None, n_agents: int) -> dict[str, float]:
        """One update on every rank's rows (rank 0); returns loss statistics by name."""
        ...

    def flat_weights(self) -> np.ndarray: ...
    def load_flat_weights(self, vec: np.ndarray) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

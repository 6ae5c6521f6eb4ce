"""The interface between expert demonstrations and the learner."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from ..learn.rollout import Batch
from ..sim.env import NavigationEnv

# (obs [n, D], mask [n, A]) -> log pi_theta [n, A]: the current policy, for experts that use it
PolicyLogProbs = Callable[[np.ndarray, np.ndarray], np.ndarray]


class ExpertSource(Protocol):
    """Produces expert trajectories tau^e for the scenario an episode runs (same seed -> same
    agents, origins, destinations and background traffic), as decision rows in the rollout batch
    format (actions are the expert's choices, logp/value are 0)."""

    name: str
    # the demonstration depends on the policy given to set_policy (SED: PDI/RVI choose the plan), so
    # a cached demonstration is valid only for the weights it was made with
    policy_dependent: bool

    def set_policy(self, policy_log_probs: PolicyLogProbs | None) -> None:
        """The learner's current policy, before each iteration's demonstrations."""
        ...

    def demonstrate(self, env: NavigationEnv, seed: int, episode: int) -> tuple[Batch, dict[str, Any]]:
        """Expert rows and a stats dict (e.g. the expert's own travel time) for scenario `seed`."""
        ...

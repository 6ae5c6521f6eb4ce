"""The interface between expert demonstrations and the learner."""

from __future__ import annotations

from typing import Any, Protocol

from ..env import NavigationEnv
from ..learn.rollout import Batch


class ExpertSource(Protocol):
    """Produces expert trajectories tau^e for the scenario an episode runs (same seed -> same
    agents, origins, destinations and background traffic), as decision rows in the rollout batch
    format (actions are the expert's choices, logp/value are 0)."""

    name: str

    def demonstrate(self, env: NavigationEnv, seed: int, episode: int) -> tuple[Batch, dict[str, Any]]:
        """Expert rows and a stats dict (e.g. the expert's own travel time) for scenario `seed`."""
        ...

"""A rank's expert demonstrations kept per traffic scenario, so that one demonstration (for SED: one
LLM refinement cycle) serves every iteration of the scenario's `hpo.scenario_period`.

An expert whose demonstration depends on the current policy (`policy_dependent`: SED's PDI/RVI
choose the revisions and the accepted plan) also keeps the current scenario's entry in a file, so a
resume in the middle of a period reuses what the uninterrupted run would have reused, rather than a
demonstration recomputed against later weights. Policy-free experts (the oracle) are simply
recomputed after a resume: same scenario, same demonstration.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..learn.rollout import Batch
from ..sim.env import NavigationEnv
from .base import ExpertSource

log = logging.getLogger(__name__)


@dataclass
class ExpertEntry:
    """A rank's expert demonstration of one scenario: the iteration that computed it, its rows, its stats."""

    iteration: int
    batch: Batch
    stats: dict[str, Any]


class DemonstrationCache:
    """Demonstrations of `expert` by scenario seed. `path` (None: memory only) persists them for a
    resume; `key` is what a persisted entry must match to be reused (the scenario's inputs and this
    rank's share of agents); entries computed at or after `resume_from` are recomputed, as the
    iterations being redone are."""

    def __init__(
        self, expert: ExpertSource, path: Path | None, key: str, resume_from: int = 0, label: str = ""
    ) -> None:
        self.expert = expert
        self.path = path
        self.key = key
        self.resume_from = resume_from
        self.label = label
        self._entries: dict[int, ExpertEntry] = {}

    def keep_only(self, seeds: Iterable[int]) -> None:
        """Forget every scenario but `seeds` (bounded memory: the current scenario only)."""
        for seed in set(self._entries) - set(seeds):
            del self._entries[seed]

    def episode(
        self, env: NavigationEnv, iteration: int, seed: int, episode: int
    ) -> tuple[Batch, dict[str, Any], bool]:
        """The expert demonstration of scenario `seed`: computed the first time the scenario comes up,
        then reused. Returns (batch numbered as `episode`, stats, whether it was computed now)."""
        entry = self._entries.get(seed)
        if entry is None and self.path is not None:
            entry = self._load(seed)
        new = entry is None
        if entry is None:
            batch, stats = self.expert.demonstrate(env, seed, episode)
            entry = ExpertEntry(iteration, batch, stats)
            if self.path is not None:
                self._save({**self._entries, seed: entry})
        self._entries[seed] = entry
        batch = dict(entry.batch)  # the caller renumbers agent ids: never hand out the cached arrays
        batch["episode"] = np.full(len(batch["action"]), episode, batch["episode"].dtype)
        return batch, entry.stats, new

    def _save(self, entries: dict[int, ExpertEntry]) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            pickle.dump({"key": self.key, "entries": entries}, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, self.path)

    def _load(self, seed: int) -> ExpertEntry | None:
        """The persisted entry of `seed`, if its iteration is committed (before resume_from)."""
        assert self.path is not None
        try:
            with open(self.path, "rb") as f:
                data = pickle.load(f)
        except FileNotFoundError:
            return None
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, TypeError, ModuleNotFoundError) as exc:
            log.warning("ignoring unreadable expert cache %s (%s): recomputing", self.path, exc)
            return None
        entry = data.get("entries", {}).get(seed) if data.get("key") == self.key else None
        if entry is None or entry.iteration >= self.resume_from:
            return None
        log.info("%sreusing the expert demonstration of iteration %d (scenario %d)", self.label, entry.iteration, seed)
        return entry

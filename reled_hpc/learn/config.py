"""Config sections of the learners (`ppo:`, `qmix:`): plain dataclasses, no torch, so that a config
loads without the learning stack. Each config class names its learner (`learner_class`), as the
algorithm registry (reled_hpc.experiment.algorithms) expects."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import require


@dataclass
class PPOConfig:
    lr: float = 3e-4
    gamma: float = 0.99
    lam: float = 0.95
    clip: float = 0.2
    epochs: int = 4
    minibatch: int = 256
    vf_coef: float = 0.5
    ent_coef: float = 0.01
    max_grad_norm: float = 0.5
    hidden: int = 64

    @staticmethod
    def learner_class() -> type[Any]:
        """The learner this section configures (PPO for IPPO, MAPPO and RELED)."""
        from .ppo import PPOLearner

        return PPOLearner

    def validate(self, where: str = "ppo") -> None:
        require(self.lr > 0, f"{where}.lr", "must be > 0")
        require(0 < self.gamma <= 1, f"{where}.gamma", "must be in (0, 1]")
        require(0 <= self.lam <= 1, f"{where}.lam", "must be in [0, 1]")
        require(0 < self.clip < 1, f"{where}.clip", "must be in (0, 1)")
        require(self.epochs >= 1, f"{where}.epochs", "must be >= 1")
        require(self.minibatch >= 1, f"{where}.minibatch", "must be >= 1")
        require(self.hidden >= 4, f"{where}.hidden", "must be >= 4")


@dataclass
class QMIXConfig:
    lr: float = 5e-4
    gamma: float = 0.99
    buffer_decisions: int = 200_000  # replay capacity in decision rows (whole groups are evicted FIFO)
    batch_groups: int = 32  # groups (joint transitions) per gradient step
    updates_per_iteration: int = 100  # gradient steps per update() call
    target_update: int = 200  # hard target copy every K gradient steps
    eps_start: float = 1.0
    eps_end: float = 0.05
    eps_decay_iterations: int = 50  # linear decay over iterations; 0 = eps_end from the start
    hidden: int = 64
    mixer_embed: int = 32
    mixer_hidden: int = 64
    double_q: bool = True
    max_grad_norm: float = 10.0
    checkpoint_buffer: bool = True  # save the replay contents in state_dict (else only its counters/RNG)

    @staticmethod
    def learner_class() -> type[Any]:
        """The learner this section configures."""
        from .qmix import QMIXLearner

        return QMIXLearner

    def validate(self, where: str = "qmix") -> None:
        require(self.lr > 0, f"{where}.lr", "must be > 0")
        require(0 < self.gamma <= 1, f"{where}.gamma", "must be in (0, 1]")
        require(self.buffer_decisions >= 1, f"{where}.buffer_decisions", "must be >= 1")
        require(self.batch_groups >= 1, f"{where}.batch_groups", "must be >= 1")
        require(self.updates_per_iteration >= 1, f"{where}.updates_per_iteration", "must be >= 1")
        require(self.target_update >= 1, f"{where}.target_update", "must be >= 1")
        require(0 <= self.eps_end <= 1, f"{where}.eps_end", "must be in [0, 1]")
        require(self.eps_end <= self.eps_start <= 1, f"{where}.eps_start", "must be in [eps_end, 1]")
        require(self.eps_decay_iterations >= 0, f"{where}.eps_decay_iterations", "must be >= 0")
        require(self.hidden >= 4, f"{where}.hidden", "must be >= 4")
        require(self.mixer_embed >= 1, f"{where}.mixer_embed", "must be >= 1")
        require(self.mixer_hidden >= 1, f"{where}.mixer_hidden", "must be >= 1")
        require(self.max_grad_norm > 0, f"{where}.max_grad_norm", "must be > 0")

    def epsilon(self, iteration: int) -> float:
        if self.eps_decay_iterations == 0:
            return self.eps_end
        frac = min(max(iteration, 0) / self.eps_decay_iterations, 1.0)
        return self.eps_start + (self.eps_end - self.eps_start) * frac

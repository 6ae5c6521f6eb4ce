"""Config sections of the learners (`ppo:`, `qmix:`): plain dataclasses, no torch, so that a config
loads without the learning stack. Which learner a section configures is the algorithm registry's
to say (reled_hpc.experiment.algorithms)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import require

MAX_LR = 1.0  # Adam steps of this size already wreck a network: larger rates are typos (1e300 overflows)
MAX_WIDTH = 4096  # network widths beyond this do not fit memory for any batch (1e9 would be a typo)


@dataclass
class PPOConfig:
    lr: float = 3e-4
    """Adam learning rate, in (0, 1]."""
    gamma: float = 0.99
    """Discount per decision of an agent, in (0, 1] (rewards already charge the elapsed time)."""
    lam: float = 0.95
    """GAE lambda over each agent's decision sequence, in [0, 1]."""
    clip: float = 0.2
    """PPO's ratio clipping range, in (0, 1)."""
    epochs: int = 4
    """Passes over the iteration's batch per update (>= 1)."""
    minibatch: int = 256
    """Decisions per minibatch (>= 1): the batch is cut into ceil(rows / minibatch) equal minibatches."""
    minibatch_per_rank: bool = False
    """With R ranks a minibatch holds minibatch x R decisions: steps per epoch stay one rank's (docs/scaling.md)."""
    vf_coef: float = 0.5
    """Weight of the value loss in the total loss."""
    ent_coef: float = 0.01
    """Weight of the entropy bonus in the total loss."""
    max_grad_norm: float = 0.5
    """Gradients are clipped to this global norm."""
    hidden: int = 64
    """Width of the pointer network's layers, in [4, 4096]."""

    def validate(self, where: str = "ppo") -> None:
        require(0 < self.lr <= MAX_LR, f"{where}.lr", f"must be in (0, {MAX_LR}], got {self.lr}")
        require(0 < self.gamma <= 1, f"{where}.gamma", "must be in (0, 1]")
        require(0 <= self.lam <= 1, f"{where}.lam", "must be in [0, 1]")
        require(0 < self.clip < 1, f"{where}.clip", "must be in (0, 1)")
        require(self.epochs >= 1, f"{where}.epochs", "must be >= 1")
        require(self.minibatch >= 1, f"{where}.minibatch", "must be >= 1")
        require(4 <= self.hidden <= MAX_WIDTH, f"{where}.hidden", f"must be in [4, {MAX_WIDTH}], got {self.hidden}")


@dataclass
class QMIXConfig:
    lr: float = 5e-4
    """Adam learning rate of the Q network and mixer, in (0, 1]."""
    gamma: float = 0.99
    """Discount per group transition, in (0, 1] (one gamma per step, not gamma^dt: rewards charge the time)."""
    buffer_decisions: int = 200_000
    """Replay capacity in decision rows (>= 1); whole groups are evicted first in, first out."""
    batch_groups: int = 32
    """Groups (agents that decided at one env step, a joint transition) per gradient step (>= 1)."""
    updates_per_iteration: int = 100
    """Gradient steps per update, i.e. per iteration (>= 1)."""
    target_update: int = 200
    """Hard copy to the target networks every this many gradient steps, counted across iterations (>= 1)."""
    eps_start: float = 1.0
    """Exploration epsilon at iteration 0, in [eps_end, 1]."""
    eps_end: float = 0.05
    """Exploration epsilon after the decay, in [0, 1]."""
    eps_decay_iterations: int = 50
    """Iterations of the linear epsilon decay (>= 0; 0 = eps_end from the start)."""
    hidden: int = 64
    """Width of the per-agent Q network's layers, in [4, 4096]."""
    mixer_embed: int = 32
    """Mixer's embedding size, in [1, 4096]."""
    mixer_hidden: int = 64
    """Hidden width of the mixer's hypernetworks, in [1, 4096]."""
    double_q: bool = True
    """Double Q-learning: the online network picks the next action, the target network values it."""
    max_grad_norm: float = 10.0
    """Gradients are clipped to this global norm (> 0)."""
    checkpoint_buffer: bool = True
    """Checkpoints hold the replay contents; false: only its sampling RNG, a resume starts with an empty replay."""

    def validate(self, where: str = "qmix") -> None:
        require(0 < self.lr <= MAX_LR, f"{where}.lr", f"must be in (0, {MAX_LR}], got {self.lr}")
        require(0 < self.gamma <= 1, f"{where}.gamma", "must be in (0, 1]")
        require(self.buffer_decisions >= 1, f"{where}.buffer_decisions", "must be >= 1")
        require(self.batch_groups >= 1, f"{where}.batch_groups", "must be >= 1")
        require(self.updates_per_iteration >= 1, f"{where}.updates_per_iteration", "must be >= 1")
        require(self.target_update >= 1, f"{where}.target_update", "must be >= 1")
        require(0 <= self.eps_end <= 1, f"{where}.eps_end", "must be in [0, 1]")
        require(self.eps_end <= self.eps_start <= 1, f"{where}.eps_start", "must be in [eps_end, 1]")
        require(self.eps_decay_iterations >= 0, f"{where}.eps_decay_iterations", "must be >= 0")
        require(4 <= self.hidden <= MAX_WIDTH, f"{where}.hidden", f"must be in [4, {MAX_WIDTH}], got {self.hidden}")
        for key in ("mixer_embed", "mixer_hidden"):
            v = getattr(self, key)
            require(1 <= v <= MAX_WIDTH, f"{where}.{key}", f"must be in [1, {MAX_WIDTH}], got {v}")
        require(self.max_grad_norm > 0, f"{where}.max_grad_norm", "must be > 0")

    def epsilon(self, iteration: int) -> float:
        if self.eps_decay_iterations == 0:
            return self.eps_end
        frac = min(max(iteration, 0) / self.eps_decay_iterations, 1.0)
        return self.eps_start + (self.eps_end - self.eps_start) * frac

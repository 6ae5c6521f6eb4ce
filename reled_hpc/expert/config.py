"""SED's config section (`sed:`): a plain dataclass, so that a config loads without the LLM and sandbox stack."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import require

FALLBACK_POLICIES = ("shortest_path", "fastest_path")


@dataclass
class SEDConfig:
    m: int = 2  # subsets per cycle
    mode: Literal["code", "json"] = "code"
    # RVI threshold, in RVI's own units: rvi_at_uniform_kl(0.25, 5, 0.99), i.e. the RVI of a 5-agent subset
    # (the demo's: 10 agents per rank, m = 2) whose every agent is at max KL 0.25 nats from the policy.
    # RVI grows with the subset: scale it by |S_k| / 5 for other sizes (docs/sed.md, "Thresholds").
    tau_R: float = 350.0
    tau_P: float = 0.5  # PDI threshold (nats)
    r_max_rounds: int = 3  # R_max: rounds per cycle, round 1 included
    eps: float = 0.1  # expert smoothing: pi^e = (1-eps) onehot + eps uniform
    feedback: bool = True  # ablation: False = one round, no revision
    fallback: Literal["shortest_path", "fastest_path"] = "shortest_path"
    gamma: float = 0.99
    cpu_s: int = 2
    wall_s: float = 5.0
    mem_mb: int = 256
    temperature: float = 0.0
    max_tokens: int = 512
    template_version: str = "v1"
    measure_external: bool = True  # drive 1 + m extra episodes to measure the other agents' return change

    def validate(self, where: str = "sed") -> None:
        require(isinstance(self.m, int) and self.m >= 1, f"{where}.m", f"must be an integer >= 1, got {self.m!r}")
        require(self.mode in ("code", "json"), f"{where}.mode", f"must be 'code' or 'json', got {self.mode!r}")
        require(self.tau_R >= 0, f"{where}.tau_R", f"must be >= 0, got {self.tau_R}")
        require(self.tau_P >= 0, f"{where}.tau_P", f"must be >= 0, got {self.tau_P}")
        require(self.r_max_rounds >= 1, f"{where}.r_max_rounds", f"must be >= 1, got {self.r_max_rounds}")
        require(0.0 < self.eps <= 1.0, f"{where}.eps", f"must be in (0, 1] (KL stays finite), got {self.eps}")
        require(self.fallback in FALLBACK_POLICIES, f"{where}.fallback", f"one of {', '.join(FALLBACK_POLICIES)}")
        require(0.0 <= self.gamma < 1.0, f"{where}.gamma", f"must be in [0, 1), got {self.gamma}")
        require(self.cpu_s >= 1, f"{where}.cpu_s", f"must be >= 1, got {self.cpu_s}")
        require(self.wall_s > 0, f"{where}.wall_s", f"must be > 0, got {self.wall_s}")
        require(self.mem_mb >= 32, f"{where}.mem_mb", f"must be >= 32, got {self.mem_mb}")
        require(self.temperature >= 0, f"{where}.temperature", f"must be >= 0, got {self.temperature}")
        require(self.max_tokens >= 1, f"{where}.max_tokens", f"must be >= 1, got {self.max_tokens}")

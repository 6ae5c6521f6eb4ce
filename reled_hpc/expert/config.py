"""SED's config section (`sed:`): a plain dataclass, so that a config loads without the LLM and sandbox stack."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import require

FALLBACK_POLICIES = ("shortest_path", "fastest_path")


@dataclass
class SEDConfig:
    m: int = 2
    """Subsets the agents are split into at random per refinement cycle, one LLM program each (>= 1)."""
    mode: Literal["code", "json"] = "code"
    """'code': the LLM writes a plan(api) program; 'json': a JSON plan listing every agent (small subsets)."""
    # calibrated from measured cycles (docs/sed.md, "Thresholds"): just above the p90 of a shortest-path plan's
    # indices on 5-agent subsets (the demo's: 10 agents per rank, m = 2), so a good plan is accepted in round 1
    # and a detour the policy would not take is revised; 750 = rvi_at_uniform_kl(1.15, 5, 0.99)
    tau_R: float = 750.0
    """RVI threshold (unit-free, >= 0): a plan above it is revised; set for 5-agent subsets, scale by |S_k| / 5."""
    tau_P: float = 2.0
    """PDI threshold in nats (>= 0): a plan whose max KL from the policy is above it is revised."""
    r_max_rounds: int = 3
    """R_max: LLM rounds per cycle, round 1 included (>= 1)."""
    eps: float = 0.1
    """Expert smoothing for PDI/RVI, pi^e = (1-eps) onehot + eps uniform, in (0, 1] (keeps the KL finite)."""
    feedback: bool = True
    """Revise plans with feedback; false (ablation) = one round, no revision."""
    fallback: Literal["shortest_path", "fastest_path"] = "shortest_path"
    """Policy of the agents without a usable LLM route (or that left it) in expert episodes."""
    gamma: float = 0.99
    """Discount of the RVI bound and of the returns' scale r_max / (1 - gamma), in (0, 1)."""
    cpu_s: int = 2
    """Sandbox CPU-time limit per program, whole seconds (>= 1)."""
    wall_s: float = 5.0
    """Sandbox wall-clock limit per program, seconds (> 0)."""
    mem_mb: int = 256
    """Sandbox address-space limit per program, MB (>= 32)."""
    temperature: float = 0.0
    """LLM sampling temperature (>= 0); only temperature-0 answers are cached (llm.cache)."""
    max_tokens: int = 512
    """Most tokens the LLM may generate per answer (>= 1); code answers also stop at the closing fence."""
    stop_at_fence: bool = True
    """Code mode: stop generating at the code block's closing fence (prompts.CODE_STOP), not after prose."""
    revision_temperature: float = 0.7
    """Sampling temperature of revisions (round >= 2, >= 0): at 0 a small model repeats its round-1 answer."""
    revision_candidates: int = 1
    """Answers sampled per revision and subset (>= 1); each is driven and scored, the best is kept."""
    revision_mode: Literal["choice", "program"] = "choice"
    # a failed program is always revised as a program: it has no routes to choose from (docs/sed.md)
    """Revise a plan above a threshold by a choice of new routes for its top-KL agents, or as a program."""
    revision_agents: int = 5
    """Choice revisions: agents offered alternatives per revision, those with the largest KL (>= 1)."""
    prime_prefix: Literal["auto", "on", "off"] = "off"
    """Send a round's shared prompt prefix first (1 token); auto: for vLLM. Off: measured no gain (docs/llm.md)."""
    template_version: str = "v4"
    """Prompt template set prompt_templates/<version>/: v1, v2 (shared prefix), v3 (+ congestion), v4 (short subset)."""
    measure_external: bool = True
    """Drive 1 + m extra episodes per cycle to measure the other agents' return change (a logged metric)."""

    def validate(self, where: str = "sed") -> None:
        require(isinstance(self.m, int) and self.m >= 1, f"{where}.m", f"must be an integer >= 1, got {self.m!r}")
        require(self.mode in ("code", "json"), f"{where}.mode", f"must be 'code' or 'json', got {self.mode!r}")
        require(self.revision_mode in ("choice", "program"), f"{where}.revision_mode",
                f"must be 'choice' or 'program', got {self.revision_mode!r}")  # fmt: skip
        require(
            isinstance(self.revision_agents, int) and self.revision_agents >= 1,
            f"{where}.revision_agents",
            f"must be an integer >= 1, got {self.revision_agents!r}",
        )
        require(self.prime_prefix in ("auto", "on", "off"), f"{where}.prime_prefix",
                f"must be auto, on or off, got {self.prime_prefix!r}")  # fmt: skip
        require(self.tau_R >= 0, f"{where}.tau_R", f"must be >= 0, got {self.tau_R}")
        require(self.tau_P >= 0, f"{where}.tau_P", f"must be >= 0, got {self.tau_P}")
        require(self.r_max_rounds >= 1, f"{where}.r_max_rounds", f"must be >= 1, got {self.r_max_rounds}")
        require(0.0 < self.eps <= 1.0, f"{where}.eps", f"must be in (0, 1] (KL stays finite), got {self.eps}")
        require(self.fallback in FALLBACK_POLICIES, f"{where}.fallback", f"one of {', '.join(FALLBACK_POLICIES)}")
        # 0 is refused too: the bound's 2*gamma/(1-gamma)^2 form is what RVI is built on (indices.py)
        require(0.0 < self.gamma < 1.0, f"{where}.gamma", f"must be in (0, 1), got {self.gamma}")
        require(self.cpu_s >= 1, f"{where}.cpu_s", f"must be >= 1, got {self.cpu_s}")
        require(self.wall_s > 0, f"{where}.wall_s", f"must be > 0, got {self.wall_s}")
        require(self.mem_mb >= 32, f"{where}.mem_mb", f"must be >= 32, got {self.mem_mb}")
        require(self.temperature >= 0, f"{where}.temperature", f"must be >= 0, got {self.temperature}")
        require(self.max_tokens >= 1, f"{where}.max_tokens", f"must be >= 1, got {self.max_tokens}")
        require(
            self.revision_temperature >= 0,
            f"{where}.revision_temperature",
            f"must be >= 0, got {self.revision_temperature}",
        )
        require(
            isinstance(self.revision_candidates, int) and self.revision_candidates >= 1,
            f"{where}.revision_candidates",
            f"must be an integer >= 1, got {self.revision_candidates!r}",
        )

"""The typed config of a training run: every section, loading with `--set` overrides, and the agent split.

Sections of lower layers live with the code they configure, as plain dataclasses that import nothing
heavy (`sim.env.EnvConfig`, `learn.config.PPOConfig` / `QMIXConfig`, `expert.config.SEDConfig`);
this module composes them into `TrainConfig` and holds the sections that only the experiment reads.
An unknown key, a wrong type or an impossible value raises ConfigError naming the file and the
dotted key, before any work starts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..config import from_dict, load_yaml, require, to_dict
from ..errors import ConfigError
from ..expert.config import SEDConfig
from ..learn.config import PPOConfig, QMIXConfig
from ..sim.env import EnvConfig


@dataclass
class LLMConfig:
    """Where SED's LLM is: "" starts the embedded CPU server on rank 0 with `model`; an URL
    (http://host:port/v1, e.g. a vLLM server) or a folder/file with serve-llm's endpoint.json."""

    endpoint: str = ""
    """Empty: the embedded CPU server on rank 0; else an URL (http://host:port/v1) or serve-llm's endpoint.json."""
    model: str = "qwen2.5-coder-0.5b"
    """Embedded server: a registry name or GGUF path; with an URL: the served model's name."""
    n_ctx: int = 4096
    """Context length of the embedded server, in tokens (>= 1024: plan prompts are ~2k tokens)."""
    wait_s: float = 900.0
    """Seconds to wait for an endpoint file and its server to answer (> 0)."""
    timeout_s: float = 300.0
    """Seconds per LLM request (> 0)."""
    cache: bool = True
    """Reuse temperature-0 answers kept on disk ($RELED_HPC_CACHE/llm_responses): a rerun or resume skips the model."""
    max_answer_bytes: int = 65536
    """Cap on each LLM answer in UTF-8 bytes (> 0) before it is parsed, cached or stored; a plan program is <= 20 kB."""
    on_unavailable: Literal["fallback", "error"] = "fallback"
    """No answer (dead URL, no endpoint file after wait_s): 'fallback' demonstration, retried each cycle, or 'error'."""

    def validate(self, where: str = "llm") -> None:
        require(self.n_ctx >= 1024, f"{where}.n_ctx", "must be >= 1024 (plan prompts are ~2k tokens)")
        require(self.wait_s > 0 and self.timeout_s > 0, where, "wait_s and timeout_s must be > 0")
        require(self.max_answer_bytes > 0, f"{where}.max_answer_bytes", f"must be > 0, got {self.max_answer_bytes}")


@dataclass
class HPOConfig:
    expert: Literal["oracle", "none", "llm"] = "oracle"
    """RELED's demonstrations: a reference policy ('oracle'), SED's LLM ('llm'), or none (plain PPO)."""
    oracle_policy: Literal["shortest_path", "fastest_path"] = "shortest_path"
    """The reference policy the oracle expert drives."""
    kappa: float = 5.0
    """PPO weight alpha_i = exp(-kappa * D_i) (imitation: 1 - alpha_i), D_i: DTW from the expert / map scale (>= 0)."""
    dtw_radius: int = 1
    """fastdtw's neighbourhood radius (>= 1; larger is closer to exact DTW, and slower)."""
    scenario_period: int = 1
    """Iterations sharing one traffic scenario (>= 1); demonstrations are cached per scenario."""

    def validate(self, where: str = "hpo") -> None:
        require(self.kappa >= 0, f"{where}.kappa", f"must be >= 0, got {self.kappa}")
        require(self.dtw_radius >= 1, f"{where}.dtw_radius", "must be >= 1")
        require(self.scenario_period >= 1, f"{where}.scenario_period", "must be >= 1")


@dataclass
class DistConfig:
    total_agents: int = 0
    """> 0: split this many agents (<= 10000000) over the ranks, env.n_agents ignored; 0: env.n_agents per rank."""
    learner: Literal["auto", "central", "allreduce"] = "auto"
    """Update: 'central' on rank 0, 'allreduce' data-parallel on every rank (PPO family); 'auto': allreduce if R > 1."""
    sync_check_every: int = 10
    """allreduce: every this many iterations, check that all ranks hold identical weights and Adam state (0: off)."""
    async_commit: bool = False
    """Rank 0 commits in a thread during the next rollout (a job abort then loses the iteration in flight)."""
    dump: Literal["auto", "single", "sharded"] = "auto"
    """HDF5 dump: 'single' file from rank 0; 'sharded': a shard per rank + a VDS master; 'auto': sharded if R > 1."""

    def validate(self, where: str = "dist") -> None:
        # generous: 100 ranks of env.n_agents' own bound; a larger value is a typo that would fail mid-run
        require(0 <= self.total_agents <= 10_000_000, f"{where}.total_agents",
                f"must be in [0, 10000000], got {self.total_agents}")  # fmt: skip
        require(self.learner in ("auto", "central", "allreduce"), f"{where}.learner",
                f"must be auto, central or allreduce, got {self.learner!r}")  # fmt: skip
        require(self.sync_check_every >= 0, f"{where}.sync_check_every", f"must be >= 0, got {self.sync_check_every}")
        require(self.dump in ("auto", "single", "sharded"), f"{where}.dump",
                f"must be auto, single or sharded, got {self.dump!r}")  # fmt: skip

    def dump_mode(self, ranks: int) -> Literal["single", "sharded"]:
        """The dump layout this run uses: 'auto' shards when R > 1 (one rank writes one file either way)."""
        if self.dump == "auto":
            return "sharded" if ranks > 1 else "single"
        return self.dump

    def learner_mode(self, algorithm: str, ranks: int, where: str = "dist") -> Literal["central", "allreduce"]:
        """The update this run uses. QMIX's replay, target networks and joint-group sampling live on rank 0,
        so it is always central ('allreduce' is refused); one rank has nothing to reduce."""
        if algorithm == "qmix":
            if self.learner == "allreduce":
                raise ConfigError(f"{where}.learner: allreduce is not supported for qmix (its replay and mixer "
                                  "train centrally on rank 0); use central or auto")  # fmt: skip
            return "central"
        if self.learner == "auto":
            return "allreduce" if ranks > 1 else "central"
        return self.learner


@dataclass
class ProbeConfig:
    """The interaction probe (reled_hpc.experiment.probe), for any algorithm."""

    every: int = 0
    """Probe every this many iterations (0: never); each probe drives 2 extra episodes per rank."""
    subset_share: float = 0.2
    """Share of a rank's agents (at least one) that switch to `switch_to` in the probe's second drive, in (0, 1]."""
    switch_to: Literal["shortest_path", "fastest_path", "random"] = "fastest_path"
    """Reference policy the probe's subset switches to."""

    def validate(self, where: str = "probe") -> None:
        require(self.every >= 0, f"{where}.every", f"must be >= 0, got {self.every}")
        require(0.0 < self.subset_share <= 1.0, f"{where}.subset_share", f"must be in (0, 1], got {self.subset_share}")


@dataclass
class EvalConfig:
    """Held-out evaluation (reled_hpc.experiment.evaluation): the greedy policy on unseen scenarios."""

    every: int = 0
    """Evaluate every this many iterations and at the last one (0: never)."""
    episodes: int = 2
    """Held-out scenarios per rank (>= 1): the same ones at every evaluation and for every algorithm."""

    def validate(self, where: str = "eval") -> None:
        require(self.every >= 0, f"{where}.every", f"must be >= 0, got {self.every}")
        require(self.episodes >= 1, f"{where}.episodes", f"must be >= 1, got {self.episodes}")


@dataclass
class TrainConfig:
    name: str = "run"
    """Run name: the run folder is runs_dir/name (no '/')."""
    algorithm: str = "reled"
    """ippo, mappo, qmix or reled: a name in reled_hpc.experiment.algorithms.ALGORITHMS."""
    seed: int = 0
    """Seed of everything: scenarios, action sampling, network init and the LLM expert's subsets derive from it."""
    iterations: int = 50
    """Training iterations (rollout, then update) of the run (>= 1)."""
    episodes_per_iteration: int = 1
    """Episodes each rank rolls out per iteration (>= 1)."""
    checkpoint_every: int = 5
    """Checkpoint every this many iterations (>= 1); also after the last one and on SIGTERM/SIGINT."""
    keep_checkpoints: int = 3
    """Newest checkpoints kept; older ones are deleted (>= 1)."""
    runs_dir: str = "runs"
    """Folder of the run folders."""
    tensorboard: bool = True
    """Write TensorBoard scalars to the run's tb/ folder (when tensorboard is installed)."""
    torch_threads: int = 1
    """Torch threads per rank (>= 1): the networks are small, more threads only contend with SUMO and other ranks."""
    env: EnvConfig = field(default_factory=EnvConfig)
    """The simulation: map, agents, traffic and rewards (reled_hpc.sim.env.EnvConfig)."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """PPO hyper-parameters, for ippo, mappo and reled."""
    hpo: HPOConfig = field(default_factory=HPOConfig)
    """RELED's hybrid policy optimisation: the expert and how far agents imitate it."""
    qmix: QMIXConfig = field(default_factory=QMIXConfig)
    """QMIX hyper-parameters, for qmix."""
    dist: DistConfig = field(default_factory=DistConfig)
    """How agents are spread over MPI ranks."""
    sed: SEDConfig = field(default_factory=SEDConfig)
    """SED, the LLM expert's refinement cycle (hpo.expert: llm)."""
    llm: LLMConfig = field(default_factory=LLMConfig)
    """Where SED's LLM runs and how it is asked (hpo.expert: llm)."""
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    """The interaction probe: the other agents' return change and route churn, measured during training."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation of the greedy policy on scenarios training never sees."""
    slurm: dict[str, Any] = field(default_factory=dict)
    """SLURM resources of `reled-hpc submit` (keys: reled_hpc.launch.spec.SlurmSpec's fields); training ignores it."""

    def validate(self, where: str = "config") -> None:
        from .algorithms import ALGORITHMS

        require(self.algorithm in ALGORITHMS, f"{where}.algorithm",
                f"{self.algorithm!r} is not one of {', '.join(map(repr, ALGORITHMS))}")  # fmt: skip
        require(bool(self.name) and "/" not in self.name, f"{where}.name", "must be a non-empty folder name")
        require(self.iterations >= 1, f"{where}.iterations", f"must be >= 1, got {self.iterations}")
        require(self.episodes_per_iteration >= 1, f"{where}.episodes_per_iteration", "must be >= 1")
        require(self.checkpoint_every >= 1, f"{where}.checkpoint_every", "must be >= 1")
        require(self.keep_checkpoints >= 1, f"{where}.keep_checkpoints", "must be >= 1")
        require(self.torch_threads >= 1, f"{where}.torch_threads", "must be >= 1")
        self.dist.learner_mode(self.algorithm, 2, f"{where}.dist")  # refuses qmix + allreduce at load, not per rank

    @property
    def uses_llm(self) -> bool:
        """SED's LLM expert is part of this run."""
        from .algorithms import get_algorithm

        return get_algorithm(self.algorithm).uses_expert and self.hpo.expert == "llm"


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` items (dotted keys, YAML values) as {dotted key: value}."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE (dotted keys, e.g. env.n_agents=20), got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def load_config(path: Path | str, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """The config file at `path` with dotted-key `overrides` applied (env.n_agents=20), checked."""
    data = load_yaml(path)
    for key, value in (overrides or {}).items():
        node = data
        parts = key.split(".")
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):  # e.g. `ppo:` left null in the file and --set ppo.lr=...
                raise ConfigError(f"{path}: {'.'.join(parts[: i + 1])} is not a mapping, cannot set {key}")
        node[parts[-1]] = value
    return from_dict(TrainConfig, data, str(path))


def config_yaml(cfg: TrainConfig) -> str:
    """The config as the YAML a run folder and its dump keep (loads back to the same config)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def split_agents(total: int, ranks: int) -> list[int]:
    """Agents per rank: as even as possible, the first ranks take the remainder."""
    return [total // ranks + (r < total % ranks) for r in range(ranks)]


def agent_counts(cfg: TrainConfig | Mapping[str, Any], ranks: int) -> list[int]:
    """Agents of each of `ranks` ranks: `dist.total_agents` split over them when > 0, else
    `env.n_agents` on every rank. `cfg` is a TrainConfig or a config mapping as a dump stores it
    (missing keys take the defaults). ConfigError when a rank would have no agent."""
    if isinstance(cfg, TrainConfig):
        total, n = cfg.dist.total_agents, cfg.env.n_agents
    else:
        total = (cfg.get("dist") or {}).get("total_agents", DistConfig.total_agents)
        n = (cfg.get("env") or {}).get("n_agents", EnvConfig.n_agents)
    if ranks < 1:
        raise ConfigError(f"{ranks} ranks: need at least one")
    counts = split_agents(total, ranks) if total else [n] * ranks
    if min(counts) < 1:
        raise ConfigError(f"dist.total_agents={total} leaves ranks without agents ({ranks} ranks)")
    return counts

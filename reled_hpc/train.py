"""`reled-hpc train CONFIG.yaml`: the training loop, run folders, checkpoints and resume.

Per iteration: roll out `episodes_per_iteration` episodes with the current weights (rollout side),
fetch expert demonstrations of the same scenarios (RELED), compute per-agent DTW and alpha,
update (learner side), append everything to the HDF5 dump, log, checkpoint every K iterations.
SIGTERM/SIGINT finish the current iteration, checkpoint and exit cleanly; `--resume RUN_DIR`
continues with no lost or duplicated iterations.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml

from . import __version__
from .config import from_dict, load_yaml, require, to_dict
from .env import EnvConfig, NavigationEnv
from .errors import ConfigError, ReledError
from .expert.llm_expert import SEDConfig
from .finite import finite_max, finite_mean, finite_sum
from .learn.ppo import PPOConfig, PPOLearner
from .learn.qmix import QMIXConfig, QMIXLearner
from .learn.rollout import Batch, collect_episode, concat

log = logging.getLogger("reled_hpc.train")

ALGORITHMS = ("ippo", "mappo", "qmix", "reled")
EXTRA_METRICS = (
    "policy_loss", "value_loss", "entropy", "approx_kl", "bc_nll", "decisions", "bg_mean_travel_time",
    "expert_travel_time", "expert_arrival_rate", "failed_rate", "update_s", "rollout_s", "expert_s",
    "mean_time_censored", "td_loss", "epsilon", "dtw_s", "comm_s", "comm_bytes", "write_s", "ranks", "rss_mb_max",
    "external_change_max", "sed_cycle", "llm_cache_hits",
)  # fmt: skip


@dataclass
class LLMConfig:
    """Where SED's LLM is: "" starts the embedded CPU server on rank 0 with `model`; an URL
    (http://host:port/v1, e.g. a vLLM server) or a folder/file with serve-llm's endpoint.json."""

    endpoint: str = ""
    model: str = "qwen2.5-coder-0.5b"  # embedded: registry name or GGUF path; URL: the served model name
    n_ctx: int = 4096
    wait_s: float = 900.0  # bound on waiting for an endpoint file and its server
    timeout_s: float = 300.0  # per request
    # keep temperature-0 answers on disk ($RELED_HPC_CACHE/llm_responses) and reuse them: a rerun or a
    # resume that asks the same prompts gets the same answers without the model (and much faster)
    cache: bool = True

    def validate(self, where: str = "llm") -> None:
        require(self.n_ctx >= 1024, f"{where}.n_ctx", "must be >= 1024 (plan prompts are ~2k tokens)")
        require(self.wait_s > 0 and self.timeout_s > 0, where, "wait_s and timeout_s must be > 0")


@dataclass
class HPOConfig:
    expert: Literal["oracle", "none", "llm"] = "oracle"
    oracle_policy: Literal["shortest_path", "fastest_path"] = "shortest_path"
    kappa: float = 5.0
    dtw_radius: int = 1
    scenario_period: int = 1  # iterations sharing one traffic scenario; experts are cached per scenario

    def validate(self, where: str = "hpo") -> None:
        require(self.kappa >= 0, f"{where}.kappa", f"must be >= 0, got {self.kappa}")
        require(self.dtw_radius >= 1, f"{where}.dtw_radius", "must be >= 1")
        require(self.scenario_period >= 1, f"{where}.scenario_period", "must be >= 1")


@dataclass
class DistConfig:
    total_agents: int = 0  # > 0: split this many agents over the ranks (env.n_agents is then ignored)

    def validate(self, where: str = "dist") -> None:
        require(self.total_agents >= 0, f"{where}.total_agents", "must be >= 0")


@dataclass
class TrainConfig:
    name: str = "run"
    algorithm: Literal["ippo", "mappo", "qmix", "reled"] = "reled"
    seed: int = 0
    iterations: int = 50
    episodes_per_iteration: int = 1
    checkpoint_every: int = 5
    keep_checkpoints: int = 3
    runs_dir: str = "runs"
    tensorboard: bool = True
    torch_threads: int = 1  # the networks are small: more threads only contend with SUMO and other ranks
    env: EnvConfig = field(default_factory=EnvConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    hpo: HPOConfig = field(default_factory=HPOConfig)
    qmix: QMIXConfig = field(default_factory=QMIXConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    sed: SEDConfig = field(default_factory=SEDConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    # SLURM submission settings (`reled-hpc submit`); checked by reled_hpc.launch.spec, unused by training
    slurm: dict[str, Any] = field(default_factory=dict)

    def validate(self, where: str = "config") -> None:
        require(bool(self.name) and "/" not in self.name, f"{where}.name", "must be a non-empty folder name")
        require(self.iterations >= 1, f"{where}.iterations", f"must be >= 1, got {self.iterations}")
        require(self.episodes_per_iteration >= 1, f"{where}.episodes_per_iteration", "must be >= 1")
        require(self.checkpoint_every >= 1, f"{where}.checkpoint_every", "must be >= 1")
        require(self.keep_checkpoints >= 1, f"{where}.keep_checkpoints", "must be >= 1")
        require(self.torch_threads >= 1, f"{where}.torch_threads", "must be >= 1")


def load_config(path: Path | str, overrides: dict[str, Any] | None = None) -> TrainConfig:
    data = load_yaml(path)
    for key, value in (overrides or {}).items():  # dotted keys: env.n_agents=20
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return from_dict(TrainConfig, data, str(path))


def config_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _seed(*parts: object) -> int:
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


DUMP_COLUMNS = ("episode", "agent_id", "t", "obs", "action", "action_mask", "reward", "done", "logp", "value", "x", "y")


def dump_rows(batch: Batch, iteration: int) -> dict[str, np.ndarray]:
    """A rollout batch as the HDF5 dump's agent/ or expert/ rows (rank 0 when the batch has none)."""
    n = len(batch["action"])
    rank = batch["rank"] if "rank" in batch else np.zeros(n, np.int16)
    return {"iteration": np.full(n, iteration, np.int32), "rank": rank, **{k: batch[k] for k in DUMP_COLUMNS}}


def scenario_seed(cfg: TrainConfig, iteration: int, k: int, rank: int = 0) -> int:
    """The traffic scenario of a rank's episode k: a pure function of the config, so a resumed run
    replays exactly the scenarios it would have seen, whatever the number of ranks."""
    return _seed("scenario", cfg.seed, iteration // cfg.hpo.scenario_period, rank, k)


class _StopFlag:
    """SIGTERM/SIGINT ask the loop to stop after the current iteration (a second SIGINT aborts)."""

    def __init__(self, announce: bool = True) -> None:
        self.announce = announce
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        if self.announce:
            log.warning("%s received: finishing this iteration, then checkpoint and exit", self.requested)

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def split_agents(total: int, size: int) -> list[int]:
    """Agents per rank: as even as possible, the first ranks take the remainder."""
    return [total // size + (r < total % size) for r in range(size)]


def actor_seed(cfg: TrainConfig, iteration: int, rank: int) -> int:
    """Seed of a rank's action sampling: with scenario_seed, every rollout is a pure function of
    (weights, config, iteration, rank), however many ranks run."""
    return _seed("actor", cfg.seed, iteration, rank)


METRIC_KEYS = ("mean_return", "mean_travel_time", "arrival_rate", "bg_mean_travel_time", "mean_time_censored",
               "failed_rate", "expert_travel_time", "expert_arrival_rate", "env_steps", "decisions", "rollout_s",
               "expert_s", "dtw_s", "rss_mb", "execution_rate", "rvi_max", "pdi_max", "llm_latency_s",
               "external_change_max", "sed_cycle", "llm_cache_hits")  # fmt: skip


class Trainer:
    """The training loop of one rank. Rank 0 is the learner (it also rolls out); it alone writes
    the HDF5 dump, checkpoints and TensorBoard. With one rank no MPI is involved."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, resume: bool = False, comm: Any = None) -> None:
        from .dist.comm import SerialComm

        self.cfg = cfg
        torch.set_num_threads(cfg.torch_threads)
        self.comm = comm or SerialComm()
        self.rank, self.size = self.comm.rank, self.comm.size
        self.root = self.rank == 0
        self.run_dir = run_dir
        self.ckpt_dir = run_dir / "checkpoints"
        counts = (
            split_agents(cfg.dist.total_agents, self.size) if cfg.dist.total_agents else [cfg.env.n_agents] * self.size
        )
        if min(counts) < 1:
            raise ConfigError(
                f"dist.total_agents={cfg.dist.total_agents} leaves a rank with no agents ({self.size} ranks)"
            )
        self.n_agents = counts[self.rank]
        self.n_agents_total = sum(counts)
        self.agent_offset = sum(counts[: self.rank])
        self.env = NavigationEnv(dataclasses.replace(cfg.env, n_agents=self.n_agents))
        g_dim = len(NavigationEnv.GLOBAL_FEATURES)
        self.learner: PPOLearner | QMIXLearner
        if cfg.algorithm == "qmix":
            self.learner = QMIXLearner(cfg.env.a_max, g_dim, cfg.qmix, seed=cfg.seed)
        else:
            self.learner = PPOLearner(cfg.env.a_max, g_dim, cfg.ppo, central=cfg.algorithm == "mappo", seed=cfg.seed)
        self.expert: Any = None
        self._llm_server: Any = None
        if cfg.algorithm == "reled" and cfg.hpo.expert == "oracle":
            from .expert.oracle import OracleExpert

            self.expert = OracleExpert(cfg.hpo.oracle_policy)
        elif cfg.algorithm == "reled" and cfg.hpo.expert == "llm":
            self.expert = self._make_llm_expert()
        self._programs: list[dict[str, Any]] = []
        # scenario seed -> this rank's expert demonstration of it (see _expert_episode)
        self._expert_cache: dict[int, _ExpertEntry] = {}
        self.start_iteration = 0
        self.env_steps = 0
        self.wall_s = 0.0
        self.writer = None
        self.tb = None
        if self.root:
            self._init_root(resume)
        self.start_iteration = int(self.comm.bcast_obj(self.start_iteration))

    def _make_llm_expert(self) -> Any:
        """Rank 0 starts the embedded server when no endpoint is configured; every rank gets the
        endpoint by broadcast and sends its own subsets' requests."""
        from .expert.llm_expert import LLMExpert
        from .llm.server import EmbeddedServer, Endpoint, wait_for_endpoint

        llm = self.cfg.llm
        ep = None
        if self.root:
            if not llm.endpoint:
                log.info("starting the embedded LLM server (%s)", llm.model)
                self._llm_server = EmbeddedServer(llm.model, n_ctx=llm.n_ctx, log_path=self.run_dir / "llm_server.log")
                self._llm_server.__enter__()
                ep = self._llm_server.endpoint
            elif llm.endpoint.startswith(("http://", "https://")):
                ep = Endpoint(base_url=llm.endpoint.rstrip("/"), model=llm.model, backend="vllm")
            else:
                ep = wait_for_endpoint(llm.endpoint, timeout_s=llm.wait_s)
            log.info("SED LLM endpoint: %s (model %s, %s)", ep.base_url, ep.model, ep.backend)
        ep = self.comm.bcast_obj(ep)
        from .llm.cache import ResponseCache

        cache = ResponseCache() if llm.cache else None
        client = ep.client(timeout_s=llm.timeout_s, cache=cache)
        return LLMExpert(client, self.cfg.sed, seed=self.cfg.seed * 1_009 + self.rank)

    def _policy_log_probs(self, obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The current policy's log-probabilities at given states (for PDI/RVI)."""
        from .learn.losses import masked_log_probs

        net = self.learner.net
        with torch.no_grad():
            o, m = torch.from_numpy(np.asarray(obs, np.float32)), torch.from_numpy(np.asarray(mask, bool))
            g = torch.zeros((len(o), net.global_dim)) if net.global_dim else None
            scores, _ = net(o, m, g)
            return masked_log_probs(scores, m).numpy()

    def _init_root(self, resume: bool) -> None:
        from .io import TrajectoryWriter

        cfg, run_dir = self.cfg, self.run_dir
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_yaml(cfg))
        ckpt = self.latest_checkpoint() if resume else None
        if resume and ckpt is None:
            log.info("no checkpoint in %s: starting from iteration 0", self.ckpt_dir)
        if ckpt is not None:
            state = torch.load(ckpt, weights_only=False)
            self.learner.load_state_dict(state["learner"])
            torch.set_rng_state(state["torch_rng"])
            self.start_iteration = state["iteration"] + 1
            self.env_steps = state["env_steps"]
            self.wall_s = state["wall_s"]
            log.info("resuming %s from %s (iteration %d done)", run_dir, ckpt.name, state["iteration"])
        self.writer = TrajectoryWriter(
            run_dir / "trajectories.h5",
            config_yaml=config_yaml(cfg),
            obs_dim=cfg.env.obs_dim,
            a_max=cfg.env.a_max,
            extra_metrics=EXTRA_METRICS,
            resume=resume and (run_dir / "trajectories.h5").exists(),
            # iterations the dump holds beyond the checkpoint are redone: drop them first
            keep_through=self.start_iteration - 1,
        )
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=self.start_iteration)
            except ImportError:
                log.warning("tensorboard is not installed: no TensorBoard scalars (metrics are in the HDF5 file)")

    # ---- checkpoints -----------------------------------------------------------------------------
    def latest_checkpoint(self) -> Path | None:
        ckpts = sorted(self.ckpt_dir.glob("ckpt_*.pt"))
        return ckpts[-1] if ckpts else None

    def save_checkpoint(self, iteration: int) -> Path:
        path = self.ckpt_dir / f"ckpt_{iteration:06d}.pt"
        tmp = path.with_suffix(".tmp")
        state = {
            "iteration": iteration,
            "learner": self.learner.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "env_steps": self.env_steps,
            "wall_s": self.wall_s,
            "config": config_yaml(self.cfg),
            "package_version": __version__,
        }
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: a kill leaves the old or the new checkpoint, never half of one
        for old in sorted(self.ckpt_dir.glob("ckpt_*.pt"))[: -self.cfg.keep_checkpoints]:
            old.unlink()
        return path

    # ---- one iteration ---------------------------------------------------------------------------
    def _local_rollout(self, it: int) -> tuple[Batch, Batch | None, np.ndarray, np.ndarray, np.ndarray]:
        """This rank's episodes, expert episodes, per-agent alpha/dtw and metrics vector."""
        from .learn.hpo import agent_alphas

        cfg, E = self.cfg, self.cfg.episodes_per_iteration
        fault = os.environ.get("RELED_HPC_FAULT")  # test hook: "RANK:ITERATION" raises there
        if fault and fault == f"{self.rank}:{it}":
            raise RuntimeError(f"injected fault on rank {self.rank} at iteration {it} (RELED_HPC_FAULT)")
        t0 = time.perf_counter()
        if isinstance(self.learner, QMIXLearner):
            self.learner.set_iteration(it)  # epsilon schedule
        self.learner.reseed_actor(actor_seed(cfg, it, self.rank))
        actor = self.learner.actor()
        batches, mets, steps = [], [], 0
        for k in range(E):
            episode = (it * self.size + self.rank) * E + k  # unique over ranks and iterations
            batch, m = collect_episode(self.env, actor, scenario_seed(cfg, it, k, self.rank), episode)
            batches.append(batch)
            mets.append(m)
            steps += self.env.sim_steps
        agent = concat(batches)
        t1 = time.perf_counter()
        expert, estats, fresh, dtw_s = None, [], [], 0.0
        alpha = np.ones(self.n_agents, np.float32)
        dtw = np.full(self.n_agents, np.nan)
        if self.expert is not None:
            if hasattr(self.expert, "set_policy"):
                self.expert.set_policy(self._policy_log_probs)
            ebatches, fresh = [], []
            seeds = [scenario_seed(cfg, it, k, self.rank) for k in range(E)]
            for seed in set(self._expert_cache) - set(seeds):  # bounded: the current scenario only
                del self._expert_cache[seed]
            for k in range(E):
                episode = (it * self.size + self.rank) * E + k
                eb, st, new = self._expert_episode(it, seeds[k], episode)
                ebatches.append(eb)
                estats.append(st)
                fresh.append(new)
            expert = concat(ebatches)
            t2 = time.perf_counter()
            # DTW on the rank that holds both trajectories
            alpha, dtw = agent_alphas(agent, expert, self.n_agents, self.env.graph.scale, cfg.hpo.kappa,
                                      cfg.hpo.dtw_radius)  # fmt: skip
            dtw_s = time.perf_counter() - t2
        t3 = time.perf_counter()
        for b in (agent, expert):
            if b is not None:
                b["agent_id"] = (b["agent_id"] + self.agent_offset).astype(np.int32)
                b["rank"] = np.full(len(b["action"]), self.rank, np.int16)

        def avg(key: str) -> float:
            vals = [m[key] for m in mets if not np.isnan(m[key])]
            return float(np.mean(vals)) if vals else float("nan")

        vec = {
            **{
                k: avg(k)
                for k in (
                    "mean_return",
                    "mean_travel_time",
                    "arrival_rate",
                    "bg_mean_travel_time",
                    "mean_time_censored",
                )
            },
            "failed_rate": float(np.mean([m["failed"] / max(m["agents"], 1) for m in mets])),
            "expert_travel_time": float(np.nanmean([s["expert_travel_time"] for s in estats])) if estats else np.nan,
            "expert_arrival_rate": float(np.mean([s["expert_arrival"] for s in estats])) if estats else np.nan,
            "env_steps": float(steps),
            "decisions": float(len(agent["action"])),
            "rollout_s": t1 - t0,
            "expert_s": t3 - t1 - dtw_s,
            "dtw_s": dtw_s,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            **_sed_stats(estats, fresh),
        }
        for st, new in zip(estats, fresh, strict=True):
            for row in st.get("programs", ()) if new else ():  # a reused demonstration's programs are logged
                self._programs.append({**row, "subset": int(row["subset"]) + 1000 * self.rank})
        log.debug(
            "rank %d iteration %d: %d decisions, %d expert decisions, obs checksum %.6f",
            self.rank,
            it,
            len(agent["action"]),
            0 if expert is None else len(expert["action"]),
            float(agent["obs"].sum()),
        )
        return agent, expert, alpha, dtw, np.array([vec[k] for k in METRIC_KEYS], np.float64)

    def _expert_episode(self, it: int, seed: int, episode: int) -> tuple[Batch, dict[str, Any], bool]:
        """The expert demonstration of scenario `seed`: computed the first time the scenario comes up,
        then reused for the rest of its hpo.scenario_period (no new LLM cycle, no program logged again).
        Returns (batch numbered as `episode`, stats, whether it was computed now).

        An expert whose demonstration depends on the current policy (the LLM expert: PDI/RVI choose the
        revisions and the accepted plan) also keeps the current scenario's entry in the run folder, so
        a resume in the middle of a period reuses what the uninterrupted run would have reused, rather
        than a demonstration recomputed against later weights. Policy-free experts (the oracle) are
        simply recomputed after a resume: same scenario, same demonstration."""
        entry = self._expert_cache.get(seed)
        if entry is None and self._expert_persisted:
            entry = self._load_expert_entry(seed)
        new = entry is None
        if entry is None:
            batch, stats = self.expert.demonstrate(self.env, seed, episode)
            entry = _ExpertEntry(it, batch, stats)
            if self._expert_persisted:
                self._save_expert_entries({**self._expert_cache, seed: entry})
        self._expert_cache[seed] = entry
        batch = dict(entry.batch)  # the caller renumbers agent ids: never hand out the cached arrays
        batch["episode"] = np.full(len(batch["action"]), episode, batch["episode"].dtype)
        return batch, entry.stats, new

    @property
    def _expert_persisted(self) -> bool:
        return self.cfg.hpo.scenario_period > 1 and hasattr(self.expert, "set_policy")

    def _expert_file(self) -> Path:
        return self.run_dir / "expert_cache" / f"rank{self.rank:05d}.pkl"

    def _expert_key(self) -> str:
        """What an entry must match to be reused: the scenario's inputs and this rank's share of agents."""
        c = self.cfg
        parts = (c.seed, to_dict(c.env), to_dict(c.hpo), to_dict(c.sed), c.llm.model, self.rank, self.size,
                 self.n_agents, self.agent_offset)  # fmt: skip
        return hashlib.sha256(repr(parts).encode()).hexdigest()

    def _save_expert_entries(self, entries: dict[int, _ExpertEntry]) -> None:
        import pickle

        path = self._expert_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            pickle.dump({"key": self._expert_key(), "entries": entries}, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)

    def _load_expert_entry(self, seed: int) -> _ExpertEntry | None:
        """The persisted entry of `seed`, if its iteration is committed (before start_iteration): one
        computed in an iteration that is being redone is recomputed, as that iteration is."""
        import pickle

        path = self._expert_file()
        try:
            with open(path, "rb") as f:
                data = pickle.load(f)
        except FileNotFoundError:
            return None
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, TypeError) as exc:
            log.warning("ignoring unreadable expert cache %s (%s): recomputing", path, exc)
            return None
        entry = data.get("entries", {}).get(seed) if data.get("key") == self._expert_key() else None
        if entry is None or entry.iteration >= self.start_iteration:
            return None
        log.info("rank %d: reusing the expert demonstration of iteration %d (scenario %d)", self.rank,
                 entry.iteration, seed)  # fmt: skip
        return entry

    def iteration(self, it: int) -> dict[str, float] | None:
        """One iteration on every rank; returns the metrics row on rank 0 (None elsewhere)."""
        comm = self.comm
        t0 = time.perf_counter()
        weights = self.learner.flat_weights() if self.root else np.empty(self._n_weights(), np.float32)
        weights = comm.bcast_array(weights)
        if not self.root:
            self.learner.load_flat_weights(weights)
        t_b = time.perf_counter() - t0
        agent, expert, alpha, dtw, vec = self._local_rollout(it)
        t1 = time.perf_counter()
        bytes0 = comm.bytes_moved()
        agent_all, _ = comm.gather_columns(agent)
        expert_all = comm.gather_columns(expert)[0] if expert is not None else None
        ad_all, _ = comm.gather_columns({"alpha": alpha, "dtw": dtw})
        vecs = comm.gather_fixed(vec)
        # LLM programs: a few small records per iteration, off the hot path: pickled
        programs = comm.gather_obj(self._programs)
        self._programs = []
        t2 = time.perf_counter()
        comm_bytes = comm.bytes_moved() - bytes0
        if not self.root:
            return None
        assert agent_all is not None and ad_all is not None and vecs is not None
        alpha_all = ad_all["alpha"] if expert_all is not None else None
        stats = self.learner.update(agent_all, expert_all, alpha_all, self.n_agents_total)
        t3 = time.perf_counter()
        per = {k: vecs[:, i] for i, k in enumerate(METRIC_KEYS)}
        steps = float(per["env_steps"].sum())
        self.env_steps += int(steps)
        dtw_all = ad_all["dtw"]

        def mean(k: str) -> float:
            v = per[k][np.isfinite(per[k])]
            return float(v.mean()) if len(v) else float("nan")

        metrics = {
            "iteration": float(it),
            "env_steps": float(self.env_steps),
            "mean_return": mean("mean_return"),
            "mean_travel_time": mean("mean_travel_time"),
            "arrival_rate": mean("arrival_rate"),
            "alpha_mean": float(np.mean(alpha_all)) if alpha_all is not None else float("nan"),
            "dtw_mean": float(np.nanmean(dtw_all)) if np.isfinite(dtw_all).any() else float("nan"),
            "rvi_max": finite_max(per["rvi_max"]),
            "pdi_max": finite_max(per["pdi_max"]),
            "execution_rate": mean("execution_rate"),
            "llm_latency_s": finite_max(per["llm_latency_s"]),  # ranks ask in parallel: the slowest
            "external_change_max": finite_max(per["external_change_max"]),
            "sed_cycle": finite_max(per["sed_cycle"]),  # 1: a SED cycle ran this iteration, 0: demonstrations reused
            "llm_cache_hits": finite_sum(per["llm_cache_hits"]),
            "decisions": float(per["decisions"].sum()),
            **{
                k: mean(k)
                for k in (
                    "bg_mean_travel_time",
                    "expert_travel_time",
                    "expert_arrival_rate",
                    "failed_rate",
                    "mean_time_censored",
                )
            },
            # slowest rank: the others wait for it at the gather
            "rollout_s": float(per["rollout_s"].max()),
            "expert_s": float(per["expert_s"].max()),
            "dtw_s": float(per["dtw_s"].max()),
            "comm_s": t_b + (t2 - t1),
            "comm_bytes": float(comm_bytes + weights.nbytes * (self.size - 1)),
            "update_s": t3 - t2,
            "ranks": float(self.size),
            "rss_mb_max": float(per["rss_mb"].max()),
            **{
                k: stats.get(k, float("nan"))
                for k in ("policy_loss", "value_loss", "entropy", "approx_kl", "bc_nll", "td_loss", "epsilon")
            },
        }
        assert self.writer is not None
        tw = time.perf_counter()
        self.writer.append_rows("agent", dump_rows(agent_all, it))
        if expert_all is not None:
            self.writer.append_rows("expert", dump_rows(expert_all, it))
        rows = [dict(r, iteration=it) for part in (programs or []) for r in part]
        if rows:
            self.writer.append_programs(rows)
        metrics["write_s"] = time.perf_counter() - tw
        self.wall_s += time.perf_counter() - t0
        metrics["wall_s"] = self.wall_s
        self.writer.end_iteration(metrics)  # commits the iteration in the dump
        if self.tb is not None:
            for k, v in metrics.items():
                if k != "iteration" and np.isfinite(v):
                    self.tb.add_scalar(k, v, it)
            self.tb.flush()
        return metrics

    def _n_weights(self) -> int:
        return len(self.learner.flat_weights())

    def run(self) -> dict[str, float] | None:
        cfg = self.cfg
        last: dict[str, float] | None = None
        bar = None
        if self.root and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=cfg.iterations, initial=self.start_iteration, desc=cfg.name, unit="it")
        with _StopFlag(announce=self.root) as stop:
            for it in range(self.start_iteration, cfg.iterations):
                m = self.iteration(it)
                done = it == cfg.iterations - 1
                # rank 0 decides for all: under srun every rank gets the signal, under mpiexec maybe one
                stopping = bool(self.comm.bcast_obj(bool(stop.requested) if self.root else None))
                if not self.root:
                    if stopping:
                        break
                    continue
                assert m is not None
                last = m
                if (it + 1) % cfg.checkpoint_every == 0 or done or stopping:
                    self.save_checkpoint(it)
                line = (f"it {it}: travel {m['mean_travel_time']:.1f} s, arrival {m['arrival_rate']:.2f}, "
                        f"return {m['mean_return']:.2f}, alpha {m['alpha_mean']:.2f}, "
                        f"steps {int(m['env_steps'])}, {m['wall_s']:.0f} s")  # fmt: skip
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(travel=f"{m['mean_travel_time']:.0f}", ret=f"{m['mean_return']:.2f}",
                                    alpha=f"{m['alpha_mean']:.2f}")  # fmt: skip
                    log.debug(line)
                else:
                    log.info(line)
                if stopping and not done:
                    log.info("stopped by %s after iteration %d; resume with --resume %s", stop.requested or "signal",
                             it, self.run_dir)  # fmt: skip
                    break
        if bar is not None:
            bar.close()
        return last

    def close(self) -> None:
        if self._llm_server is not None:
            self._llm_server.__exit__(None, None, None)
        if self.writer is not None:
            self.writer.close()
        self.env.close()
        if self.tb is not None:
            self.tb.close()


@dataclass
class _ExpertEntry:
    """A rank's expert demonstration of one scenario: the iteration that computed it, its rows, its stats."""

    iteration: int
    batch: Batch
    stats: dict[str, Any]


SED_KEYS = ("execution_rate", "rvi_max", "pdi_max", "llm_latency_s", "external_change_max", "sed_cycle",
            "llm_cache_hits")  # fmt: skip


def _sed_stats(estats: list[dict[str, Any]], fresh: list[bool] | None = None) -> dict[str, float]:
    """SED figures of a rank's expert episodes: NaN for oracle experts, and NaN (with sed_cycle 0) in an
    iteration that reuses its scenario's demonstrations, so that means over iterations count each
    cycle once. `fresh[i]`: episode i's demonstration was computed in this iteration."""
    fresh = [True] * len(estats) if fresh is None else fresh
    if not estats or "execution_rate" not in estats[0]:
        return dict.fromkeys(SED_KEYS, float("nan"))
    now = [s for s, f in zip(estats, fresh, strict=True) if f]
    if not now:
        return {**dict.fromkeys(SED_KEYS, float("nan")), "sed_cycle": 0.0, "llm_cache_hits": 0.0}

    def vals(key: str) -> np.ndarray:
        return np.array([float(s.get(key, np.nan)) for s in now], np.float64)

    er = vals("execution_rate")
    return {
        "execution_rate": float(np.nanmean(er)) if np.isfinite(er).any() else float("nan"),
        "rvi_max": finite_max(vals("rvi_max")),
        "pdi_max": finite_max(vals("pdi_max")),
        "llm_latency_s": float(np.nansum(vals("llm_latency_s"))),
        # measured |mean return change| of agents outside a subset, in RVI's units (RVI bounds it)
        "external_change_max": finite_max(vals("measured_external_change")),
        "sed_cycle": 1.0,
        "llm_cache_hits": float(np.nansum(vals("cache_hits"))),
    }


def _setup_logging(run_dir: Path) -> None:
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("reled_hpc").addHandler(handler)


def train(config: Path | str | TrainConfig | None, *, resume: Path | None = None,
          overrides: dict[str, Any] | None = None, run_dir: Path | None = None,
          comm: Any = None) -> tuple[Path, dict[str, float] | None]:  # fmt: skip
    """Train from a config file (or object), or resume a run folder. Returns (run folder, last
    metrics on rank 0). Under mpiexec/srun every rank calls this; an exception on any rank aborts
    the whole job (MPI Abort) after logging the rank and traceback."""
    from .dist.comm import get_comm

    comm = comm or get_comm()
    try:
        if resume is not None:
            resume = Path(resume)
            if not (resume / "config.yaml").exists():
                raise ReledError(f"{resume} is not a run folder (no config.yaml)")
            cfg = load_config(resume / "config.yaml", overrides)
            run_dir = resume
        else:
            if config is None:
                raise ReledError("train needs a config or a run folder to resume")
            cfg = config if isinstance(config, TrainConfig) else load_config(config, overrides)
            run_dir = run_dir or Path(cfg.runs_dir) / cfg.name
            if (run_dir / "trajectories.h5").exists():
                raise ReledError(f"run folder {run_dir} already holds a run: use --resume {run_dir} or another name")
        comm.barrier()  # every rank checked the folder before rank 0 creates anything in it
        if comm.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            _setup_logging(run_dir)
            if comm.size > 1:
                log.info("%d MPI ranks, rank 0 is the learner", comm.size)
        comm.barrier()
        trainer = Trainer(cfg, run_dir, resume=resume is not None, comm=comm)
        try:
            last = trainer.run()
        finally:
            trainer.close()
        return run_dir, last
    except BaseException as exc:
        if not comm.is_mpi or isinstance(exc, SystemExit):
            raise
        import traceback

        msg = f"rank {comm.rank}/{comm.size} failed: {exc!r}\n{traceback.format_exc()}"
        log.error("%s", msg)
        print(f"reled-hpc: {msg}", file=sys.stderr, flush=True)
        for h in logging.getLogger("reled_hpc").handlers:
            h.flush()
        comm.abort(1)  # takes every rank down now: no rank waits on a dead peer
        raise


def reference_travel_time(cfg: TrainConfig, policy: str, last: int = 5, ranks: int = 1) -> dict[str, float]:
    """A reference policy's metrics on the scenarios the run's last `last` iterations see on every
    rank (the same traffic the final policy faces), averaged."""
    from .policies import make_policy, run_episode

    counts = split_agents(cfg.dist.total_agents, ranks) if cfg.dist.total_agents else [cfg.env.n_agents] * ranks
    its = range(max(cfg.iterations - last, 0), cfg.iterations)
    ms = []
    for rank, n in enumerate(counts):
        seeds = sorted({scenario_seed(cfg, it, k, rank) for it in its for k in range(cfg.episodes_per_iteration)})
        with NavigationEnv(dataclasses.replace(cfg.env, n_agents=n)) as env:
            ms += [run_episode(env, make_policy(policy, cfg.seed), seed=s) for s in seeds]
    keys = ("mean_travel_time", "arrival_rate", "mean_return", "mean_time_censored")
    return {k: finite_mean(np.array([m[k] for m in ms], np.float64)) for k in keys}  # NaN: nobody arrived

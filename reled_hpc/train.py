"""`reled-hpc train CONFIG.yaml`: the training loop, run folders, checkpoints and resume.

Per iteration: roll out `episodes_per_iteration` episodes with the current weights (rollout side),
fetch expert demonstrations of the same scenarios (RELED), compute per-agent DTW and alpha,
update (learner side), append everything to the HDF5 dump, log, checkpoint every K iterations.
SIGTERM/SIGINT finish the current iteration, checkpoint and exit cleanly; `--resume RUN_DIR`
continues with no lost or duplicated iterations.
"""

from __future__ import annotations

import dataclasses
import logging
import os
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
from .errors import ReledError
from .learn.ppo import PPOConfig, PPOLearner
from .learn.qmix import QMIXConfig, QMIXLearner
from .learn.rollout import Batch, collect_episode, concat

log = logging.getLogger("reled_hpc.train")

ALGORITHMS = ("ippo", "mappo", "qmix", "reled")
EXTRA_METRICS = (
    "policy_loss", "value_loss", "entropy", "approx_kl", "bc_nll", "decisions", "bg_mean_travel_time",
    "expert_travel_time", "expert_arrival_rate", "failed_rate", "update_s", "rollout_s", "expert_s",
    "mean_time_censored", "td_loss", "epsilon",
)  # fmt: skip


@dataclass
class HPOConfig:
    expert: Literal["oracle", "none"] = "oracle"
    oracle_policy: Literal["shortest_path", "fastest_path"] = "shortest_path"
    kappa: float = 5.0
    dtw_radius: int = 1
    scenario_period: int = 1  # iterations sharing one traffic scenario; experts are cached per scenario

    def validate(self, where: str = "hpo") -> None:
        require(self.kappa >= 0, f"{where}.kappa", f"must be >= 0, got {self.kappa}")
        require(self.dtw_radius >= 1, f"{where}.dtw_radius", "must be >= 1")
        require(self.scenario_period >= 1, f"{where}.scenario_period", "must be >= 1")


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
    env: EnvConfig = field(default_factory=EnvConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    hpo: HPOConfig = field(default_factory=HPOConfig)
    qmix: QMIXConfig = field(default_factory=QMIXConfig)

    def validate(self, where: str = "config") -> None:
        require(bool(self.name) and "/" not in self.name, f"{where}.name", "must be a non-empty folder name")
        require(self.iterations >= 1, f"{where}.iterations", f"must be >= 1, got {self.iterations}")
        require(self.episodes_per_iteration >= 1, f"{where}.episodes_per_iteration", "must be >= 1")
        require(self.checkpoint_every >= 1, f"{where}.checkpoint_every", "must be >= 1")
        require(self.keep_checkpoints >= 1, f"{where}.keep_checkpoints", "must be >= 1")


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


def scenario_seed(cfg: TrainConfig, iteration: int, k: int) -> int:
    """The traffic scenario of episode k of an iteration: a pure function of the config, so a
    resumed run replays exactly the scenarios it would have seen."""
    return cfg.seed * 1_000_003 + (iteration // cfg.hpo.scenario_period) * cfg.episodes_per_iteration + k


class _StopFlag:
    """SIGTERM/SIGINT ask the loop to stop after the current iteration (a second SIGINT aborts)."""

    def __init__(self) -> None:
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
        log.warning("%s received: finishing this iteration, then checkpoint and exit", self.requested)

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Path, resume: bool = False) -> None:
        from .io import TrajectoryWriter

        self.cfg = cfg
        self.run_dir = run_dir
        self.ckpt_dir = run_dir / "checkpoints"
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_yaml(cfg))
        self.env = NavigationEnv(cfg.env)
        self.n_agents = cfg.env.n_agents
        g_dim = len(NavigationEnv.GLOBAL_FEATURES)
        self.learner: PPOLearner | QMIXLearner
        if cfg.algorithm == "qmix":
            self.learner = QMIXLearner(cfg.env.a_max, g_dim, cfg.qmix, seed=cfg.seed)
        else:
            self.learner = PPOLearner(cfg.env.a_max, g_dim, cfg.ppo, central=cfg.algorithm == "mappo", seed=cfg.seed)
        self.expert = None
        if cfg.algorithm == "reled" and cfg.hpo.expert == "oracle":
            from .expert.oracle import OracleExpert

            self.expert = OracleExpert(cfg.hpo.oracle_policy)
        self.start_iteration = 0
        self.env_steps = 0
        self.wall_s = 0.0
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
        self.tb = None
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
    def _rows(self, batch: Batch, iteration: int) -> dict[str, np.ndarray]:
        n = len(batch["action"])
        return {
            "iteration": np.full(n, iteration, np.int32),
            "rank": np.zeros(n, np.int16),
            "episode": batch["episode"],
            "agent_id": batch["agent_id"],
            "t": batch["t"],
            "obs": batch["obs"],
            "action": batch["action"],
            "action_mask": batch["action_mask"],
            "reward": batch["reward"],
            "done": batch["done"],
            "logp": batch["logp"],
            "value": batch["value"],
            "x": batch["x"],
            "y": batch["y"],
        }

    def iteration(self, it: int) -> dict[str, float]:
        from .learn.hpo import agent_alphas

        cfg = self.cfg
        t0 = time.perf_counter()
        if isinstance(self.learner, QMIXLearner):
            self.learner.set_iteration(it)  # epsilon schedule
        actor = self.learner.actor()
        batches, mets = [], []
        steps = 0
        for k in range(cfg.episodes_per_iteration):
            batch, m = collect_episode(self.env, actor, scenario_seed(cfg, it, k), it * cfg.episodes_per_iteration + k)
            batches.append(batch)
            mets.append(m)
            steps += self.env.sim_steps
        agent = concat(batches)
        t1 = time.perf_counter()
        expert = None
        alpha = dtw = None
        estats: list[dict[str, Any]] = []
        if self.expert is not None:
            ebatches = []
            for k in range(cfg.episodes_per_iteration):
                eb, st = self.expert.demonstrate(
                    self.env, scenario_seed(cfg, it, k), it * cfg.episodes_per_iteration + k
                )
                ebatches.append(eb)
                estats.append(st)
            expert = concat(ebatches)
            alpha, dtw = agent_alphas(agent, expert, self.n_agents, self.env.graph.scale, cfg.hpo.kappa,
                                      cfg.hpo.dtw_radius)  # fmt: skip
        t2 = time.perf_counter()
        stats = self.learner.update(agent, expert, alpha, self.n_agents)
        t3 = time.perf_counter()
        self.env_steps += steps
        self.wall_s += t3 - t0

        def avg(key: str) -> float:
            vals = [m[key] for m in mets if not np.isnan(m[key])]
            return float(np.mean(vals)) if vals else float("nan")

        metrics = {
            "iteration": float(it),
            "env_steps": float(self.env_steps),
            "wall_s": self.wall_s,
            "mean_return": avg("mean_return"),
            "mean_travel_time": avg("mean_travel_time"),
            "arrival_rate": avg("arrival_rate"),
            "alpha_mean": float(np.mean(alpha)) if alpha is not None else float("nan"),
            "dtw_mean": float(np.nanmean(dtw)) if dtw is not None and np.isfinite(dtw).any() else float("nan"),
            "rvi_max": float("nan"),
            "pdi_max": float("nan"),
            "execution_rate": float("nan"),
            "llm_latency_s": float("nan"),
            "decisions": float(len(agent["action"])),
            "bg_mean_travel_time": avg("bg_mean_travel_time"),
            "expert_travel_time": float(np.nanmean([s["expert_travel_time"] for s in estats]))
            if estats
            else float("nan"),
            "expert_arrival_rate": float(np.mean([s["expert_arrival"] for s in estats])) if estats else float("nan"),
            "failed_rate": float(np.mean([m["failed"] / max(m["agents"], 1) for m in mets])),
            "mean_time_censored": avg("mean_time_censored"),
            "rollout_s": t1 - t0,
            "expert_s": t2 - t1,
            "update_s": t3 - t2,
            **{
                k: stats.get(k, float("nan"))
                for k in ("policy_loss", "value_loss", "entropy", "approx_kl", "bc_nll", "td_loss", "epsilon")
            },
        }
        self.writer.append_rows("agent", self._rows(agent, it))
        if expert is not None:
            self.writer.append_rows("expert", self._rows(expert, it))
        self.writer.end_iteration(metrics)  # commits the iteration in the dump
        if self.tb is not None:
            for k, v in metrics.items():
                if k != "iteration" and np.isfinite(v):
                    self.tb.add_scalar(k, v, it)
            self.tb.flush()
        return metrics

    def run(self) -> dict[str, float] | None:
        cfg = self.cfg
        last: dict[str, float] | None = None
        bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=cfg.iterations, initial=self.start_iteration, desc=cfg.name, unit="it")
        with _StopFlag() as stop:
            for it in range(self.start_iteration, cfg.iterations):
                last = self.iteration(it)
                done = it == cfg.iterations - 1
                if (it + 1) % cfg.checkpoint_every == 0 or done or stop.requested:
                    self.save_checkpoint(it)
                line = (f"it {it}: travel {last['mean_travel_time']:.1f} s, arrival {last['arrival_rate']:.2f}, "
                        f"return {last['mean_return']:.2f}, alpha {last['alpha_mean']:.2f}, "
                        f"steps {int(last['env_steps'])}, {last['wall_s']:.0f} s")  # fmt: skip
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(travel=f"{last['mean_travel_time']:.0f}", ret=f"{last['mean_return']:.2f}",
                                    alpha=f"{last['alpha_mean']:.2f}")  # fmt: skip
                    log.debug(line)
                else:
                    log.info(line)
                if stop.requested and not done:
                    log.info("stopped by %s after iteration %d; resume with --resume %s", stop.requested, it,
                             self.run_dir)  # fmt: skip
                    break
        if bar is not None:
            bar.close()
        return last

    def close(self) -> None:
        self.writer.close()
        self.env.close()
        if self.tb is not None:
            self.tb.close()


def _setup_logging(run_dir: Path) -> None:
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("reled_hpc").addHandler(handler)


def train(config: Path | str | TrainConfig, *, resume: Path | None = None, overrides: dict[str, Any] | None = None,
          run_dir: Path | None = None) -> tuple[Path, dict[str, float] | None]:  # fmt: skip
    """Train from a config file (or object), or resume a run folder. Returns (run folder, last metrics)."""
    if resume is not None:
        resume = Path(resume)
        if not (resume / "config.yaml").exists():
            raise ReledError(f"{resume} is not a run folder (no config.yaml)")
        cfg = load_config(resume / "config.yaml", overrides)
        run_dir = resume
    else:
        cfg = config if isinstance(config, TrainConfig) else load_config(config, overrides)
        run_dir = run_dir or Path(cfg.runs_dir) / cfg.name
        if (run_dir / "trajectories.h5").exists():
            raise ReledError(f"run folder {run_dir} already holds a run: use --resume {run_dir} or another name")
    run_dir.mkdir(parents=True, exist_ok=True)
    _setup_logging(run_dir)
    trainer = Trainer(cfg, run_dir, resume=resume is not None)
    try:
        last = trainer.run()
    finally:
        trainer.close()
    return run_dir, last


def reference_travel_time(cfg: TrainConfig, policy: str, episodes: int = 1) -> dict[str, float]:
    """A reference policy's metrics on the first scenarios of a run (for the demo's comparison)."""
    from .policies import make_policy, run_episode

    with NavigationEnv(dataclasses.replace(cfg.env)) as env:
        ms = [run_episode(env, make_policy(policy, cfg.seed), seed=scenario_seed(cfg, 0, k)) for k in range(episodes)]
    return {k: float(np.nanmean([m[k] for m in ms])) for k in ("mean_travel_time", "arrival_rate", "mean_return")}

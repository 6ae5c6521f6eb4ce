"""`reled-hpc train CONFIG.yaml`: the training loop, checkpoints and resume.

Per iteration: roll out `episodes_per_iteration` episodes with the current weights (rollout side),
fetch expert demonstrations of the same scenarios (RELED), compute per-agent DTW and alpha,
update (learner side), append everything to the HDF5 dump, log, checkpoint every K iterations.
SIGTERM/SIGINT finish the current iteration, checkpoint and exit cleanly; `--resume RUN_DIR`
continues with no lost or duplicated iterations.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import logging
import os
import resource
import shutil
import signal
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..config import to_dict
from ..errors import ReledError
from ..expert.base import ExpertSource
from ..expert.cache import DemonstrationCache
from ..io.master import SHARDED_GROUPS, MasterWriter, shard_path, shard_paths
from ..learn.base import Learner
from ..learn.rollout import Batch, collect_episode, concat
from ..sim.env import NavigationEnv
from .algorithms import get_algorithm
from .config import TrainConfig, agent_counts, config_yaml, load_config
from .evaluation import EVAL_METRICS, evaluate, evaluation_due
from .metrics import EXTRA_METRICS, dump_rows, iteration_row, program_rows, rank_env_steps, rank_metrics, rank_partials
from .probe import PROBE_METRICS, InteractionProbe
from .run_dir import RunDir, checkpoint_file, checkpoint_files
from .seeds import actor_seed, derive_seed, episode_index, eval_seed, expert_seed, scenario_seed

log = logging.getLogger("reled_hpc.train")
ABORT_DRAIN_S = 1.0  # a failing rank's pause between its last words and MPI_Abort


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


class Trainer:
    """The training loop of one rank. Rank 0 alone writes the HDF5 dump, checkpoints and TensorBoard.
    The update (`dist.learner`) is 'central' (rank 0 learns on every rank's gathered rows and broadcasts
    the weights) or 'allreduce' (every rank learns on its own rows, gradients summed; replicas stay
    identical without a weight broadcast). With one rank no MPI is involved."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, resume: bool = False, comm: Any = None) -> None:
        from ..dist.comm import SerialComm

        self.cfg = cfg
        torch.set_num_threads(cfg.torch_threads)
        self.comm = comm or SerialComm()
        self.rank, self.size = self.comm.rank, self.comm.size
        self.root = self.rank == 0
        self.folder = RunDir(run_dir)
        self.run_dir = self.folder.path
        counts = agent_counts(cfg, self.size)
        self.n_agents = counts[self.rank]
        self.n_agents_total = sum(counts)
        self.agent_offset = sum(counts[: self.rank])
        self.env = NavigationEnv(dataclasses.replace(cfg.env, n_agents=self.n_agents))
        self.algorithm = get_algorithm(cfg.algorithm)
        self.learner: Learner = self.algorithm.make_learner(cfg, len(NavigationEnv.GLOBAL_FEATURES))
        # one rank has nothing to reduce: the central path (bitwise the same update)
        self.allreduce = cfg.dist.learner_mode(cfg.algorithm, self.size) == "allreduce" and self.size > 1
        self.sharded = cfg.dist.dump_mode(self.size) == "sharded"
        # a central PPO update on R ranks' rows sizes its minibatches like the data-parallel one
        # (ppo.minibatch_per_rank); QMIX's update takes no rank count
        self._ranks_kw = {"ranks": self.size} if self.algorithm.section == "ppo" else {}
        self.master: MasterWriter | None = None
        self._committer = ThreadPoolExecutor(1, "commit") if self.root and cfg.dist.async_commit else None
        self._commit_pending: Future[None] | None = None
        self._llm_server: Any = None
        self.expert: ExpertSource | None = self._make_expert()
        self._programs: list[dict[str, Any]] = []
        self.start_iteration = 0
        self.env_steps = 0
        self.wall_s = 0.0
        self.writer = None
        self.tb = None
        if self.root:
            self._init_root(resume)
        self.start_iteration = int(self.comm.bcast_obj(self.start_iteration))
        if self.sharded:
            self._init_shard(resume)
        if self.allreduce:
            # once: rank 0's learner (fresh, or the checkpoint's weights, Adam state and shuffle RNG) on every
            # rank; from here identical gradients keep the replicas identical
            state = self.comm.bcast_obj(self.learner.state_dict() if self.root else None)
            if not self.root:
                self.learner.load_state_dict(state)
            if self.root:
                log.info("data-parallel update (dist.learner=allreduce) over %d ranks", self.size)
        pc = cfg.probe
        self.probe = InteractionProbe(
            derive_seed("probe", cfg.seed, self.rank),
            pc.subset_share,
            pc.switch_to,
            derive_seed("probe-subset", cfg.seed, self.rank),
        )
        self.demos: DemonstrationCache | None = None
        if self.expert is not None:
            # policy-dependent demonstrations are kept on disk when a scenario spans iterations (resume)
            persist = cfg.hpo.scenario_period > 1 and self.expert.policy_dependent
            path = self.folder.expert_cache / f"rank{self.rank:05d}.pkl" if persist else None
            self.demos = DemonstrationCache(self.expert, path, self._expert_key(), self.start_iteration,
                                            label=f"rank {self.rank}: ")  # fmt: skip

    def _make_expert(self) -> ExpertSource | None:
        cfg = self.cfg
        if not self.algorithm.uses_expert or cfg.hpo.expert == "none":
            return None
        if cfg.hpo.expert == "oracle":
            from ..expert.oracle import OracleExpert

            return OracleExpert(cfg.hpo.oracle_policy)
        return self._make_llm_expert()

    def _make_llm_expert(self) -> ExpertSource:
        """Rank 0 starts the embedded server when no endpoint is configured; every rank gets the
        endpoint by broadcast and sends its own subsets' requests."""
        from ..expert.llm_expert import LLMExpert
        from ..expert.sandbox import report_sandbox_capabilities
        from ..llm import LLMUnavailable
        from ..llm.cache import ResponseCache
        from ..llm.server import DeferredClient, EmbeddedServer, Endpoint, wait_for_endpoint

        llm = self.cfg.llm
        report_sandbox_capabilities()  # at start: what contains the LLM's programs on this node
        ep = None
        if self.root:
            if not llm.endpoint:
                log.info("starting the embedded LLM server (%s)", llm.model)
                self._llm_server = EmbeddedServer(llm.model, n_ctx=llm.n_ctx, log_path=self.folder.llm_server_log)
                self._llm_server.__enter__()
                ep = self._llm_server.endpoint
            elif llm.endpoint.startswith(("http://", "https://")):
                ep = Endpoint(base_url=llm.endpoint.rstrip("/"), model=llm.model, backend="vllm")
            else:
                try:
                    ep = wait_for_endpoint(llm.endpoint, timeout_s=llm.wait_s)
                except LLMUnavailable as exc:
                    if llm.on_unavailable == "error":
                        raise
                    # as with a dead URL: train on, SED falling back, until the server turns up
                    log.warning("%s; llm.on_unavailable=fallback: SED cycles use the fallback demonstration "
                                "and look for the endpoint again at each cycle", exc)  # fmt: skip
            if ep is not None:
                log.info("SED LLM endpoint: %s (model %s, %s)", ep.base_url, ep.model, ep.backend)
        ep = self.comm.bcast_obj(ep)
        cache = ResponseCache() if llm.cache else None
        kw = {"timeout_s": llm.timeout_s, "cache": cache, "max_answer_bytes": llm.max_answer_bytes}
        client: Any = DeferredClient(llm.endpoint, llm.model, **kw) if ep is None else ep.client(**kw)
        return LLMExpert(client, self.cfg.sed, seed=expert_seed(self.cfg, self.rank))

    def _expert_key(self) -> str:
        """What a persisted demonstration must match: the scenario's inputs and this rank's share of agents."""
        c = self.cfg
        parts = (c.seed, to_dict(c.env), to_dict(c.hpo), to_dict(c.sed), c.llm.model, self.rank, self.size,
                 self.n_agents, self.agent_offset)  # fmt: skip
        return hashlib.sha256(repr(parts).encode()).hexdigest()

    def _policy_log_probs(self, obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The current policy's log-probabilities at given states (for PDI/RVI)."""
        from ..learn.losses import policy_log_probs

        return policy_log_probs(self.learner.net, obs, mask)

    def _init_root(self, resume: bool) -> None:
        cfg, run = self.cfg, self.folder
        if resume:
            self._check_layout()
        run.checkpoints.mkdir(parents=True, exist_ok=True)
        tmp = run.config.with_suffix(".tmp")
        tmp.write_text(config_yaml(cfg))
        os.replace(tmp, run.config)  # atomic: --resume never reads half a config
        ckpt, state = self._resume_checkpoint() if resume else (None, None)
        if ckpt is not None and state is not None:
            self.learner.load_state_dict(state["learner"])
            torch.set_rng_state(state["torch_rng"])
            self.start_iteration = state["iteration"] + 1
            self.env_steps = state["env_steps"]
            self.wall_s = state["wall_s"]
            log.info("resuming %s from %s (iteration %d done)", run, ckpt.name, state["iteration"])
        self.writer = self._open_writer(shard_path(run.dump, 0) if self.sharded else run.dump, resume)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run.tensorboard), purge_step=self.start_iteration)
            except ImportError:
                log.warning("tensorboard is not installed: no TensorBoard scalars (metrics are in the HDF5 file)")

    def _open_writer(self, path: Path, resume: bool, commits: bool = True) -> Any:
        """This rank's dump writer: the run's one file, or its shard. On resume, iterations the file holds
        beyond the checkpoint are redone: they are dropped first (keep_through)."""
        from ..io import TrajectoryWriter
        from .metrics import EXTRA_METRIC_INFO  # units/descriptions of the metrics/ datasets

        cfg = self.cfg
        return TrajectoryWriter(path, config_yaml=config_yaml(cfg), obs_dim=cfg.env.obs_dim, a_max=cfg.env.a_max,
                                extra_metrics=EXTRA_METRICS, metric_info=EXTRA_METRIC_INFO,
                                obs_features=cfg.env.obs_features, resume=resume and path.is_file(),
                                keep_through=self.start_iteration - 1, commits=commits)  # fmt: skip

    def _check_layout(self) -> None:
        """A resumed run keeps its dump's layout (sharded: one shard per rank, so the same number of ranks)."""
        run = self.folder
        shards = shard_paths(run.dump)
        if shards and not self.sharded:
            raise ReledError(f"cannot resume {run}: its dump is sharded over {len(shards)} ranks, this run writes one "
                             f"file (dist.dump={self.cfg.dist.dump}, {self.size} ranks); resume it with "
                             f"{len(shards)} ranks and dist.dump auto or sharded")  # fmt: skip
        if self.sharded and run.dump.is_file() and not shards:
            raise ReledError(f"cannot resume {run}: its dump {run.dump.name} is one file, this run shards it "
                             f"({self.size} ranks); resume it with dist.dump: single or with 1 rank")  # fmt: skip
        if shards and len(shards) != self.size:
            raise ReledError(f"cannot resume {run}: its dump is sharded over {len(shards)} ranks ({shards[0].name}, "
                             f"...), this run has {self.size}; resume it with {len(shards)} ranks")  # fmt: skip

    def _init_shard(self, resume: bool) -> None:
        """Every rank's shard writer (rank 0's was opened with the checkpoint), then the master, which a resumed
        run writes again at once: a kill between a commit and the master's replacement left it one behind."""
        run = self.folder
        if not self.root:
            path = shard_path(run.dump, self.rank)
            if resume and self.start_iteration > 0 and not path.is_file():
                raise ReledError(f"cannot resume {run}: rank {self.rank}'s shard {path} is missing and iterations "
                                 f"0..{self.start_iteration - 1} are committed")  # fmt: skip
            self.writer = self._open_writer(path, resume, commits=False)
        assert self.writer is not None
        n = self.writer.rows_after_commit()
        counts = self.comm.gather_fixed(np.array([n[g] for g in SHARDED_GROUPS], np.int64))
        if self.root:
            self.master = MasterWriter(run.dump, [shard_path(run.dump, r) for r in range(self.size)], self.writer.file)
            self.master.write(self._master_rows(counts), self.writer.n_committed)

    # ---- checkpoints -----------------------------------------------------------------------------
    @staticmethod
    def load_checkpoint(path: Path) -> dict[str, Any]:
        """A checkpoint's state, checked against its `.sha256` sidecar; ReledError if it is damaged.
        One without a sidecar (killed between the two writes, or older) must still load as a whole."""
        data = path.read_bytes()
        side = path.with_name(path.name + ".sha256")
        if side.exists():
            want = (side.read_text().split() or [""])[0]
            if hashlib.sha256(data).hexdigest() != want:
                raise ReledError(f"{path}: SHA-256 differs from {side.name} ({len(data)} bytes): damaged")
        try:
            state = torch.load(io.BytesIO(data), weights_only=False)
        except Exception as exc:  # a damaged file fails anywhere in unpickling, with any exception type
            raise ReledError(f"{path}: not a readable checkpoint ({len(data)} bytes): {exc!r}") from exc
        if not isinstance(state, dict) or not {"iteration", "learner", "torch_rng"} <= set(state):
            raise ReledError(f"{path}: not a reled-hpc checkpoint")
        return state

    @staticmethod
    def good_checkpoint(folder: Path, max_iteration: int | None = None) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint in `folder` that loads and passes its checksum (at most `max_iteration`),
        warning about each damaged one skipped; None if there are no checkpoints at all. ReledError naming
        every file when checkpoints exist but none is good."""
        ckpts = checkpoint_files(folder)[::-1]
        bad: list[str] = []
        for path in ckpts:
            try:
                state = Trainer.load_checkpoint(path)
            except (ReledError, OSError) as exc:
                log.warning("skipping damaged checkpoint %s", exc)
                bad.append(str(exc))
                continue
            if max_iteration is None or int(state["iteration"]) <= max_iteration:
                return path, state
            bad.append(f"{path}: iteration {state['iteration']} is past the dump's last committed iteration")
        if not ckpts:
            return None
        raise ReledError(f"no usable checkpoint in {folder}:\n  " + "\n  ".join(bad))

    def _resume_checkpoint(self) -> tuple[Path | None, dict[str, Any] | None]:
        """The checkpoint to resume from, consistent with the dump: never one past the dump's last
        committed iteration (that would leave a gap), never a start from 0 over committed iterations."""
        from ..io import TrajectoryReader

        run = self.folder
        committed: list[int] = []
        if run.has_dump():
            with TrajectoryReader(run.commit_dump) as r:
                committed = [int(i) for i in r.iterations()]
        last = committed[-1] if committed else -1
        if committed != list(range(last + 1)):
            raise ReledError(f"{run.commit_dump}: committed iterations are not 0..{last} without gaps: cannot resume")
        has_ckpts = bool(checkpoint_files(run.checkpoints))
        if has_ckpts and last < 0:
            raise ReledError(f"cannot resume {run}: checkpoints exist in {run.checkpoints} but the dump {run.dump} "
                             "is missing or holds no committed iteration; resuming would leave a gap in the dump. "
                             "Start a new run, or remove the checkpoints to start this one over")  # fmt: skip
        found = self.good_checkpoint(run.checkpoints, max_iteration=last)
        if found is None:
            if last >= 0:
                raise ReledError(f"cannot resume {run}: the dump holds committed iterations 0..{last} but there is "
                                 f"no checkpoint in {run.checkpoints}; resuming would start over from iteration 0 "
                                 "and drop them. Start a new run (or move the dump away to start over)")  # fmt: skip
            log.info("no checkpoint in %s: starting from iteration 0", run.checkpoints)
            return None, None
        return found

    def save_checkpoint(self, iteration: int) -> Path:
        self.wait_commit()  # a checkpoint is never ahead of the dump's last commit (resume relies on it)
        path = checkpoint_file(self.folder.checkpoints, iteration)
        state = {
            "iteration": iteration,
            "learner": self.learner.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "env_steps": self.env_steps,
            "wall_s": self.wall_s,
            "config": config_yaml(self.cfg),
            "package_version": __version__,
        }
        self.write_checkpoint(path, state)
        for old in checkpoint_files(self.folder.checkpoints)[: -self.cfg.keep_checkpoints]:
            old.unlink()
            old.with_name(old.name + ".sha256").unlink(missing_ok=True)
        return path

    @staticmethod
    def write_checkpoint(path: Path, state: dict[str, Any]) -> None:
        """torch.save `state` to `path` atomically, then its SHA-256 to `path.sha256`. A failed write (disk
        full, quota, file size limit) leaves no .tmp and raises ReledError naming the path and bytes free."""
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        side = path.with_name(path.name + ".sha256")
        tmps = (path.with_suffix(".tmp"), side.with_suffix(".tmp"))
        try:
            digest = f"{hashlib.sha256(data).hexdigest()}  {path.name}\n".encode()
            for tmp, payload in zip(tmps, (data, digest), strict=True):
                with open(tmp, "wb") as fh:
                    fh.write(payload)
                    fh.flush()
                    os.fsync(fh.fileno())
            # atomic: a kill leaves the old or the new checkpoint, never half of one; the sidecar follows
            os.replace(tmps[0], path)
            os.replace(tmps[1], side)
        except OSError as exc:
            for tmp in tmps:
                tmp.unlink(missing_ok=True)
            try:
                free = f"{shutil.disk_usage(path.parent).free} bytes free"
            except OSError:
                free = "free space unknown"
            if exc.errno == errno.EFBIG:  # RLIMIT_FSIZE (ulimit -f), not the disk
                free += f", file size limit {resource.getrlimit(resource.RLIMIT_FSIZE)[0]} bytes"
            why = exc.strerror or exc
            raise ReledError(f"cannot write checkpoint {path} ({len(data)} bytes, {free}): {why}") from exc

    # ---- one iteration ---------------------------------------------------------------------------
    def _local_rollout(self, it: int) -> tuple[Batch, Batch | None, np.ndarray, np.ndarray, np.ndarray]:
        """This rank's episodes, expert episodes, per-agent alpha/dtw and metrics vector."""
        from ..learn.hpo import agent_alphas

        cfg, E = self.cfg, self.cfg.episodes_per_iteration
        fault = os.environ.get("RELED_HPC_FAULT")  # test hook: "RANK:ITERATION" raises there
        if fault and fault == f"{self.rank}:{it}":
            raise RuntimeError(f"injected fault on rank {self.rank} at iteration {it} (RELED_HPC_FAULT)")
        t0 = time.perf_counter()
        self.learner.begin_iteration(it)
        self.learner.reseed_actor(actor_seed(cfg, it, self.rank))
        actor = self.learner.actor()
        episodes = [episode_index(cfg, it, self.rank, self.size, k) for k in range(E)]
        seeds = [scenario_seed(cfg, it, k, self.rank) for k in range(E)]
        batches, mets, steps = [], [], 0
        for seed, episode in zip(seeds, episodes, strict=True):
            batch, m = collect_episode(self.env, actor, seed, episode)
            batches.append(batch)
            mets.append(m)
            steps += self.env.sim_steps
        agent = concat(batches)
        t1 = time.perf_counter()
        expert, estats, fresh, dtw_s = None, [], [], 0.0
        alpha = np.ones(self.n_agents, np.float32)
        dtw = np.full(self.n_agents, np.nan)
        if self.expert is not None and self.demos is not None:
            self.expert.set_policy(self._policy_log_probs)
            self.demos.keep_only(seeds)
            ebatches = []
            for seed, episode in zip(seeds, episodes, strict=True):
                eb, st, new = self.demos.episode(self.env, it, seed, episode)
                if new and "error" in st and cfg.hpo.expert == "llm" and cfg.llm.on_unavailable == "error":
                    from ..llm import LLMUnavailable

                    raise LLMUnavailable(f"iteration {it}, rank {self.rank}: {st['error']} (llm.on_unavailable=error)")
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
        probe = dict.fromkeys(PROBE_METRICS, float("nan"))
        if cfg.probe.every and it % cfg.probe.every == 0:
            # the probe's episodes are not dumped and use no sampling RNG: training is unchanged
            probe = self.probe.run(self.env, self.learner.actor(greedy=True), self._gamma(), episode=-1)
        t4 = time.perf_counter()
        held_out = dict.fromkeys(EVAL_METRICS, float("nan"))
        if evaluation_due(cfg.eval.every, it, cfg.iterations):
            seeds = [eval_seed(cfg, self.rank, k) for k in range(cfg.eval.episodes)]
            held_out = evaluate(self.env, self.learner.actor(greedy=True), seeds)
        t5 = time.perf_counter()
        for b in (agent, expert):
            if b is not None:
                b["agent_id"] = (b["agent_id"] + self.agent_offset).astype(np.int32)
                b["rank"] = np.full(len(b["action"]), self.rank, np.int16)
        timings = {
            "env_steps": float(steps),
            "decisions": float(len(agent["action"])),
            "rollout_s": t1 - t0,
            "expert_s": t3 - t1 - dtw_s,
            "dtw_s": dtw_s,
            "probe_s": t4 - t3,
            "eval_s": t5 - t4,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            **probe,
            **held_out,
        }
        vec = rank_metrics(mets, estats, fresh, timings)
        for st, new in zip(estats, fresh, strict=True):
            if new:  # a reused demonstration's programs were logged when it was made
                self._programs += program_rows(st.get("programs", ()), self.rank)
        log.debug(
            "rank %d iteration %d: %d decisions, %d expert decisions, obs checksum %.6f",
            self.rank,
            it,
            len(agent["action"]),
            0 if expert is None else len(expert["action"]),
            float(agent["obs"].sum()),
        )
        return agent, expert, alpha, dtw, vec

    def iteration(self, it: int) -> dict[str, float] | None:
        """One iteration on every rank; returns the metrics row on rank 0 (None elsewhere)."""
        comm = self.comm
        t0 = time.perf_counter()
        bcast_bytes = 0
        if not self.allreduce:  # central: rank 0's new weights reach the rollout ranks
            weights = self.learner.flat_weights() if self.root else np.empty(self._n_weights(), np.float32)
            weights = comm.bcast_array(weights)
            if not self.root:
                self.learner.load_flat_weights(weights)
            bcast_bytes = weights.nbytes * (self.size - 1)
        t_b = time.perf_counter() - t0
        agent, expert, alpha, dtw, vec = self._local_rollout(it)
        t1 = time.perf_counter()
        bytes0, root0 = comm.bytes_moved(), comm.bytes_gathered_to_root()
        agent_all = expert_all = alpha_all = None
        if not self.allreduce or not self.sharded:
            # the rows travel to rank 0 only for a central update or a single-file dump
            agent_all, _ = comm.gather_columns(agent)
            expert_all = comm.gather_columns(expert)[0] if expert is not None else None
            if expert is not None and not self.allreduce:
                alpha_all = comm.gather_columns({"alpha": alpha})[0]
        # metrics: fixed-size reductions, whatever the number of ranks
        sums, maxes = rank_partials(vec, alpha if expert is not None else None, dtw)
        sums, maxes = comm.reduce(sums, "sum"), comm.reduce(maxes, "max")
        programs = [self._programs] if self.sharded else comm.gather_obj(self._programs)
        self._programs = []
        t2 = time.perf_counter()
        comm_bytes = comm.bytes_moved() - bytes0
        reduce_s = 0.0
        stats: dict[str, float] = {}
        if self.allreduce:
            # every rank learns on its own rows
            bytes1, s1 = comm.bytes_moved(), comm.seconds_in_allreduce()
            stats = self.learner.update(agent, expert, self._global_alpha(alpha) if expert is not None else None,
                                        self.n_agents_total, comm=comm)  # fmt: skip
            k = self.cfg.dist.sync_check_every
            if k and (it + 1) % k == 0:
                self._check_replicas(it)
            reduce_s = comm.seconds_in_allreduce() - s1
            comm_bytes += comm.bytes_moved() - bytes1
        elif self.root:
            assert agent_all is not None
            stats = self.learner.update(agent_all, expert_all, None if alpha_all is None else alpha_all["alpha"],
                                        self.n_agents_total, **self._ranks_kw)  # fmt: skip
        t3 = time.perf_counter()
        counts = None
        if self.sharded:  # every rank appends its own rows to its shard
            rows = self._write_rows(it, agent, expert, programs)
            write_s = time.perf_counter() - t3
            counts = comm.gather_fixed(rows)  # also: every shard holds the iteration before rank 0 commits it
        elif self.root:
            assert agent_all is not None
            self._write_rows(it, agent_all, expert_all, programs or [])
            write_s = time.perf_counter() - t3
        if not self.root:
            return None
        assert sums is not None and maxes is not None
        self.env_steps += rank_env_steps(sums)
        timings = {
            # allreduce: the gradient/statistic allreduces (with waiting for the slowest rank) count as comm
            "comm_s": t_b + (t2 - t1) + reduce_s,
            "comm_bytes": float(comm_bytes + bcast_bytes),
            "update_s": t3 - t2 - reduce_s,
            "ranks": float(self.size),
            "rss_mb_rank0": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "root_gather_bytes": float(comm.bytes_gathered_to_root() - root0),
        }
        metrics = iteration_row(it, self.env_steps, sums, maxes, expert is not None, stats, timings)
        assert self.writer is not None
        tw = time.perf_counter()
        self.wall_s += tw - t0
        metrics["wall_s"] = self.wall_s
        metrics["write_s"] = write_s
        rows = self._master_rows(counts) if self.master is not None else None
        if self._committer is not None:
            # the commit runs while this rank goes on with the next rollout; waited for before rank 0 touches
            # the dump again (its next rows, a checkpoint, close)
            self._commit_pending = self._committer.submit(self._commit, it, dict(metrics), rows)
        else:
            self._commit(it, metrics, rows)
            self.wall_s += time.perf_counter() - tw  # counted in the next iteration's wall time
        return metrics

    def _commit(self, it: int, metrics: dict[str, float], rows: dict[str, list[int]] | None) -> None:
        """Rank 0: commit the iteration in the dump, replace a sharded dump's master, TensorBoard."""
        assert self.writer is not None
        self.writer.end_iteration(metrics)
        if self.master is not None and rows is not None:
            self.master.write(rows, self.writer.n_committed)
        if self.tb is not None:
            for k, v in metrics.items():
                if k != "iteration" and np.isfinite(v):
                    self.tb.add_scalar(k, v, it)
            self.tb.flush()

    def wait_commit(self) -> None:
        """Rank 0: wait for the iteration being committed in the background; its error is raised here."""
        pending, self._commit_pending = self._commit_pending, None
        if pending is not None:
            pending.result()

    def _write_rows(self, it: int, agent: Batch, expert: Batch | None,
                    programs: list[list[dict[str, Any]]]) -> np.ndarray:  # fmt: skip
        """Append an iteration's rows to this rank's file (a shard without commits: make them durable);
        returns the file's row counts of agent/, expert/, programs/ once they are on disk."""
        self.wait_commit()  # rows of one iteration at a time, after the previous one's commit
        assert self.writer is not None
        self.writer.append_rows("agent", dump_rows(agent, it))
        if expert is not None:
            self.writer.append_rows("expert", dump_rows(expert, it))
        rows = [dict(r, iteration=it) for part in programs for r in part]
        if rows:
            self.writer.append_programs(rows)
        if not self.writer.commits:
            self.writer.end_rows(it)
        n = self.writer.rows_after_commit()
        return np.array([n[g] for g in SHARDED_GROUPS], np.int64)

    @staticmethod
    def _master_rows(counts: np.ndarray | None) -> dict[str, list[int]]:
        """The gathered [ranks, groups] row counts as the master writer takes them."""
        assert counts is not None
        return {g: [int(x) for x in counts[:, j]] for j, g in enumerate(SHARDED_GROUPS)}

    def _global_alpha(self, alpha: np.ndarray) -> np.ndarray:
        """This rank's alphas at their global agent ids (the data-parallel update reads only its own agents')."""
        out = np.ones(self.n_agents_total, np.float32)
        out[self.agent_offset : self.agent_offset + self.n_agents] = alpha
        return out

    def _check_replicas(self, it: int) -> None:
        """Every rank holds bitwise the same weights and Adam moments (one small allreduce); raised alike on
        every rank otherwise (the job then aborts: a drifted replica trains another policy)."""
        from ..dist.comm import same_on_all_ranks

        opt = getattr(self.learner, "opt", None)
        moments = [v.numpy() for st in (opt.state_dict()["state"].values() if opt else ()) for v in st.values()
                   if isinstance(v, torch.Tensor)]  # fmt: skip
        if not same_on_all_ranks(self.comm, [self.learner.flat_weights(), *moments]):
            raise ReledError(f"iteration {it}: the ranks' learner replicas differ (weights or Adam state)")

    def _gamma(self) -> float:
        """The learner's discount, for the probe's return scale."""
        return float(getattr(self.cfg, self.algorithm.section).gamma)

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
        """Finish a commit in flight (its error is raised once everything is closed), then close."""
        failed: BaseException | None = None
        try:
            self.wait_commit()
        except BaseException as exc:  # raised below, after the files, server and simulation are closed
            failed = exc
        if self._committer is not None:
            self._committer.shutdown()
        if self._llm_server is not None:
            self._llm_server.__exit__(None, None, None)
        if self.writer is not None:
            self.writer.close()
        self.env.close()
        if self.tb is not None:
            self.tb.close()
        if failed is not None:
            raise failed


def _setup_logging(run: RunDir) -> None:
    handler = logging.FileHandler(run.log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("reled_hpc").addHandler(handler)


def train(config: Path | str | TrainConfig | None, *, resume: Path | None = None,
          overrides: dict[str, Any] | None = None, run_dir: Path | None = None,
          comm: Any = None) -> tuple[Path, dict[str, float] | None]:  # fmt: skip
    """Train from a config file (or object), or resume a run folder. Returns (run folder, last
    metrics on rank 0). Under mpiexec/srun every rank calls this; an exception on any rank aborts
    the whole job (MPI Abort) after logging the rank and traceback.

    Rank 0 holds the folder's lock (`RunDir.lock`) from before it writes anything there until
    training ends: a second writer (another --resume, or a new run of the same name) fails at once
    with ReledError naming the holder, on every rank alike (broadcast, no abort). A new run's folder
    that already holds committed work is refused (use --resume); one whose run failed before
    committing an iteration is replaced, its files set aside in RUN_DIR/replaced-<time>/."""
    import contextlib

    from ..dist.comm import get_comm

    comm = comm or get_comm()
    run: RunDir | None = None
    agreed: BaseException | None = None  # raised on every rank alike: no MPI abort needed
    try:
        if resume is not None:
            run = RunDir(resume).require_run()
            cfg = load_config(run.config, overrides)
        else:
            if config is None:
                raise ReledError("train needs a config or a run folder to resume")
            cfg = config if isinstance(config, TrainConfig) else load_config(config, overrides)
            run = RunDir(run_dir or Path(cfg.runs_dir) / cfg.name)
        comm.barrier()  # every rank read the folder before rank 0 changes anything in it
        with contextlib.ExitStack() as held:
            failed, replaced = None, None
            if comm.rank == 0:
                try:
                    held.enter_context(run.lock())
                    # under the lock: two new runs of one name cannot both find the folder free
                    if resume is None:
                        why = run.committed()
                        if why is not None:
                            raise ReledError(f"run folder {run} already holds a run: use --resume {run} or another "
                                             f"name (it holds {why})")  # fmt: skip
                        replaced = run.set_aside()
                except (ReledError, OSError) as exc:  # every rank leaves with the message, none aborts
                    failed = str(exc) if isinstance(exc, ReledError) else f"run folder {run}: {exc}"
            failed = comm.bcast_obj(failed)
            if failed is not None:
                agreed = ReledError(failed)
                raise agreed
            if comm.rank == 0:
                _setup_logging(run)
                if replaced is not None:
                    log.warning("run folder %s held a run that committed no iteration: its files were moved to %s",
                                run, replaced)  # fmt: skip
                if comm.size > 1:
                    mode = cfg.dist.learner_mode(cfg.algorithm, comm.size)
                    log.info("%d MPI ranks, %s update", comm.size,
                             "data-parallel (allreduce)" if mode == "allreduce" else "central (rank 0)")  # fmt: skip
            comm.barrier()
            trainer = Trainer(cfg, run.path, resume=resume is not None, comm=comm)
            try:
                last = trainer.run()
            finally:
                trainer.close()
        return run.path, last
    except BaseException as exc:
        if not comm.is_mpi or isinstance(exc, SystemExit) or exc is agreed:
            raise
        import traceback

        msg = f"rank {comm.rank}/{comm.size} failed: {exc!r}\n{traceback.format_exc()}"
        log.error("%s", msg)
        print(f"reled-hpc: {msg}", file=sys.stderr, flush=True)
        for h in logging.getLogger("reled_hpc").handlers:
            h.flush()
        if run is not None and run.path.is_dir():
            try:
                with open(run.failure_log(comm.rank), "a") as f:
                    f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} {msg}\n")
            except OSError as werr:  # a full or read-only disk must not keep the job from going down
                print(f"reled-hpc: could not write {run.failure_log(comm.rank)}: {werr}", file=sys.stderr, flush=True)
        # the launcher kills every rank at MPI_Abort and may drop output its proxy has not forwarded yet
        time.sleep(ABORT_DRAIN_S)
        comm.abort(1)  # takes every rank down now: no rank waits on a dead peer
        raise

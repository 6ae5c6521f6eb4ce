"""The learner side for the PPO family: IPPO (local critic), MAPPO (centralised critic over the
pooled global state) and RELED (PPO + the HPO hybrid update with expert demonstrations).

Input: rollout batches (numpy columns, see rollout.py). Output: new weights as one flat float32
vector. Nothing here touches the env."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.nn.utils import clip_grad_norm_, parameters_to_vector, vector_to_parameters

from ..dist.comm import MPIComm, SerialComm
from . import losses
from .config import PPOConfig
from .nets import PointerNet
from .optim import adam, load_adam_state
from .rollout import Actor, Batch

Comm = SerialComm | MPIComm


def advantages(batch: Batch, gamma: float, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """GAE over each (episode, agent) decision sequence; decisions are the time steps."""
    n = len(batch["reward"])
    if n == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    order = np.lexsort((batch["step"], batch["agent_id"], batch["episode"]))
    key = batch["episode"].astype(np.int64)[order] * (1 << 32) + batch["agent_id"][order]
    values = batch["value"][order].astype(np.float64)
    last_of_seq = np.r_[key[1:] != key[:-1], True]
    next_values = np.r_[values[1:], 0.0]
    terminals = batch["terminal"][order].astype(bool)
    ends = last_of_seq | terminals
    next_values[ends & terminals] = 0.0
    adv_sorted, ret_sorted = losses.gae(
        batch["reward"][order].astype(np.float64), values, next_values, terminals, ends, gamma, lam
    )
    adv = np.empty(n)
    ret = np.empty(n)
    adv[order] = adv_sorted
    ret[order] = ret_sorted
    return adv.astype(np.float32), ret.astype(np.float32)


class PPOLearner:
    """One actor-critic shared by all agents. `central=True` gives MAPPO's critic; `update` with
    expert rows and per-agent alphas is the HPO hybrid update."""

    def __init__(self, a_max: int, g_dim: int, cfg: PPOConfig, central: bool = False, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.cfg = cfg
        self.central = central
        self.net = PointerNet(a_max, cfg.hidden, g_dim if central else 0)
        self.opt = adam(self.net.parameters(), lr=cfg.lr, eps=1e-5)
        self.sample_gen = torch.Generator().manual_seed(seed + 1)
        self.shuffle_rng = np.random.default_rng(seed + 2)

    # ---- weights ---------------------------------------------------------------------------------
    def flat_weights(self) -> np.ndarray:
        return parameters_to_vector(self.net.parameters()).detach().numpy().astype(np.float32)

    def load_flat_weights(self, vec: np.ndarray) -> None:
        vector_to_parameters(torch.as_tensor(vec, dtype=torch.float32), self.net.parameters())

    def state_dict(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict(), "gen": self.sample_gen.get_state(),
                "shuffle": self.shuffle_rng.bit_generator.state}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        load_adam_state(self.opt, state["opt"])
        self.sample_gen.set_state(state["gen"])
        self.shuffle_rng.bit_generator.state = state["shuffle"]

    def begin_iteration(self, iteration: int) -> None:
        """Nothing to schedule: PPO's hyper-parameters are constant over iterations."""

    # ---- acting ----------------------------------------------------------------------------------
    def reseed_actor(self, seed: int) -> None:
        """Make the next rollouts' action sampling a function of `seed` alone (per rank, per iteration)."""
        self.sample_gen.manual_seed(seed)

    def actor(self, greedy: bool = False) -> Actor:
        net, gen = self.net, self.sample_gen

        @torch.no_grad()
        def act(obs: np.ndarray, mask: np.ndarray, gstate: np.ndarray):
            o = torch.from_numpy(obs)
            m = torch.from_numpy(mask)
            g = torch.from_numpy(np.broadcast_to(gstate, (len(obs), len(gstate))).copy()) if net.global_dim else None
            scores, value = net(o, m, g)
            logp_all = losses.masked_log_probs(scores, m)
            a = logp_all.argmax(-1) if greedy else torch.multinomial(logp_all.exp(), 1, generator=gen).squeeze(-1)
            return a.numpy(), logp_all.gather(-1, a.unsqueeze(-1)).squeeze(-1).numpy(), value.numpy()

        return act

    # ---- learning --------------------------------------------------------------------------------
    def _forward(self, b: dict[str, torch.Tensor], idx: torch.Tensor):
        g = b["gstate"][idx] if self.central else None
        scores, value = self.net(b["obs"][idx], b["action_mask"][idx], g)
        return scores, value

    def update(
        self,
        batch: Batch,
        expert: Batch | None = None,
        alpha: np.ndarray | None = None,
        n_agents: int = 0,
        comm: Comm | None = None,
        ranks: int | None = None,
    ) -> dict[str, float]:
        """One PPO update. With `expert` rows and `alpha` (per agent id), the HPO loss
        (1/N) sum_i alpha_i L_PPO_i + (1 - alpha_i) L_BC_i replaces the PPO policy loss.

        With a `comm` of R > 1 ranks this is the data-parallel update: `batch`/`expert` are this rank's
        rows only (agent ids disjoint across ranks; `alpha` indexed by global agent id, only this rank's
        entries read), and every rank ends with the weights, optimizer state and statistics the central
        update gives on the rank-ordered concatenation of all ranks' rows: advantage normalisation,
        the minibatch split, loss means, the agent count of the HPO mix and the gradient-norm clip are
        all global (see docs/architecture.md). Every rank must call it; it allreduces once per minibatch
        (the gradient) plus a few scalar buffers. `ranks` (default: comm's size) scales the minibatch with
        `ppo.minibatch_per_rank`: a central update on R ranks' gathered rows passes R."""
        cfg = self.cfg
        comm = comm or SerialComm()
        dist = comm.size > 1
        adv, ret = advantages(batch, cfg.gamma, cfg.lam)  # sequences are (episode, agent): never split over ranks
        n_local = len(adv)
        ne_local = len(expert["action"]) if expert is not None else 0
        counts = global_counts(comm, n_local, ne_local)
        n, ne = int(counts[:, 0].sum()), int(counts[:, 1].sum())
        lo, elo = int(counts[: comm.rank, 0].sum()), int(counts[: comm.rank, 1].sum())
        adv = global_normalise(adv, comm)
        t = {
            "obs": torch.from_numpy(batch["obs"]),
            "action_mask": torch.from_numpy(batch["action_mask"]),
            "action": torch.from_numpy(batch["action"].astype(np.int64)),
            "logp": torch.from_numpy(batch["logp"]),
            "gstate": torch.from_numpy(batch["gstate"]),
            "agent": torch.from_numpy(batch["agent_id"].astype(np.int64)),
            "adv": torch.from_numpy(adv),
            "ret": torch.from_numpy(ret),
        }
        hybrid = expert is not None and alpha is not None and ne > 0
        if hybrid:
            assert expert is not None and alpha is not None
            e = {
                "obs": torch.from_numpy(expert["obs"]),
                "action_mask": torch.from_numpy(expert["action_mask"]),
                "action": torch.from_numpy(expert["action"].astype(np.int64)),
                "gstate": torch.from_numpy(expert["gstate"]),
                "agent": torch.from_numpy(expert["agent_id"].astype(np.int64)),
            }
            alpha_t = torch.as_tensor(alpha, dtype=torch.float32)
        # minibatch_per_rank: R x minibatch rows per step, so that the steps per epoch (each one a fixed cost
        # and a gradient allreduce on every rank) do not grow with the number of ranks
        per_step = cfg.minibatch * ((ranks or comm.size) if cfg.minibatch_per_rank else 1)
        n_mb = max(1, int(np.ceil(n / per_step)))
        # per minibatch, each rank's share of the global value: they sum over ranks (one allreduce at the end)
        rows: list[list[float]] = []
        for _ in range(cfg.epochs):
            # global permutations from the shared RNG (same calls on every rank), each rank keeps its rows
            mbs = local_minibatches(self.shuffle_rng.permutation(n), n_mb, lo, lo + n_local)
            embs = local_minibatches(self.shuffle_rng.permutation(ne), n_mb, elo, elo + ne_local) if hybrid else None
            n_active = self._global_active(t["agent"], e["agent"], mbs, embs, comm) if hybrid and dist else None
            for k, (idx_np, total) in enumerate(mbs):
                idx = torch.from_numpy(idx_np)
                scores, value = self._forward(t, idx)
                logp_all = losses.masked_log_probs(scores, t["action_mask"][idx])
                logp = logp_all.gather(-1, t["action"][idx].unsqueeze(-1)).squeeze(-1)
                ppo = losses.ppo_clip_loss(logp, t["logp"][idx], t["adv"][idx], cfg.clip)
                vloss = share_of_mean(losses.value_loss(value, t["ret"][idx]), total)
                ent = share_of_mean(losses.masked_entropy(scores, t["action_mask"][idx]), total)
                bc_stat = float("nan")
                if hybrid:
                    assert embs is not None
                    eidx_np, etotal = embs[k]
                    eidx = torch.from_numpy(eidx_np)
                    escores, _ = self._forward(e, eidx)
                    bc = losses.bc_nll(escores, e["action_mask"][eidx], e["action"][eidx])
                    nact = None if n_active is None else float(n_active[k])
                    policy_loss, _ = losses.hybrid_loss(
                        ppo, t["agent"][idx], bc, e["agent"][eidx], alpha_t, nact, stats=False
                    )
                    bc_stat = float(share_of_mean(bc.detach(), etotal)) if etotal else float("nan")
                else:
                    policy_loss = share_of_mean(ppo, total)
                loss = policy_loss + cfg.vf_coef * vloss - cfg.ent_coef * ent
                self.opt.zero_grad()
                loss.backward()
                if dist:
                    self._allreduce_grads(comm)
                clip_grad_norm_(self.net.parameters(), cfg.max_grad_norm)  # on the global gradient
                self.opt.step()
                with torch.no_grad():
                    log_ratio = logp - t["logp"][idx]
                    ratio = log_ratio.exp()
                    kl = float(share_of_mean((ratio - 1) - log_ratio, total))
                    clip_frac = float(share_of_mean(((ratio - 1).abs() > cfg.clip).float(), total))
                rows.append([float(policy_loss.detach()), float(vloss.detach()), float(ent.detach()), kl, clip_frac,
                             bc_stat])  # fmt: skip
        table = np.asarray(rows, np.float64).reshape(-1, len(STAT_NAMES))
        if dist:
            table = comm.allreduce_sum(table)  # a NaN (no expert rows in a minibatch) stays NaN: same on every rank
        out = {k: float(np.mean(table[:, j])) if len(table) else float("nan") for j, k in enumerate(STAT_NAMES)}
        if not hybrid:
            out["bc_nll"] = float("nan")
        return out

    @staticmethod
    def _global_active(
        agent: torch.Tensor,
        eagent: torch.Tensor,
        mbs: list[tuple[np.ndarray, int]],
        embs: list[tuple[np.ndarray, int]] | None,
        comm: Comm,
    ) -> np.ndarray:
        """Agents with PPO or expert rows in each minibatch, over all ranks (one allreduce per epoch):
        the HPO mix's N. Agent ids are disjoint across ranks, so the local counts just add up."""
        assert embs is not None
        a, ea = agent.numpy(), eagent.numpy()
        local = np.array([len(np.union1d(a[i], ea[ei])) for (i, _), (ei, _) in zip(mbs, embs, strict=True)], np.int64)
        return comm.allreduce_sum(local)

    def _allreduce_grads(self, comm: Comm) -> None:
        """Sum every rank's gradient in one float32 Allreduce; afterwards the gradient is the global one on
        every rank (each rank's loss was its share of the global loss), so the optimizer steps stay identical."""
        params = list(self.net.parameters())
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        total = torch.from_numpy(comm.allreduce_sum(flat.detach().numpy()))
        o = 0
        for p in params:
            g = total[o : o + p.numel()].view_as(p)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
            o += p.numel()


STAT_NAMES = ("policy_loss", "value_loss", "entropy", "approx_kl", "clip_frac", "bc_nll")


def share_of_mean(x: torch.Tensor, total: int) -> torch.Tensor:
    """This rank's share of the mean over `total` rows held by all ranks: sum(x) / total, so the shares
    sum to the global mean. When every row is here it is `x.mean()` itself (the central update, bitwise)."""
    return x.mean() if x.numel() == total else x.sum() / total


def global_counts(comm: Comm, *local: int) -> np.ndarray:
    """[ranks, k]: every rank's `local` counts (one allreduce), for global sizes and this rank's row offset."""
    v = np.zeros((comm.size, len(local)), np.int64)
    v[comm.rank] = local
    return comm.allreduce_sum(v)


def global_normalise(x: np.ndarray, comm: Comm) -> np.ndarray:
    """(x - mean) / (std + 1e-8) with mean and (population) std over every rank's rows; unchanged for <= 1
    row in all. One rank: numpy's float32 reductions as ever; R ranks: float64 sums, two scalar allreduces."""
    if comm.size == 1:
        return (x - x.mean()) / (x.std() + 1e-8) if len(x) > 1 else x
    s = comm.allreduce_sum(np.array([x.sum(dtype=np.float64), len(x)], np.float64))
    if s[1] <= 1:
        return x
    mean = s[0] / s[1]
    # two passes (not sum of squares): as accurate as numpy's std
    ss = comm.allreduce_sum(np.array([np.square(x.astype(np.float64) - mean).sum()]))[0]
    return ((x - mean) / (np.sqrt(ss / s[1]) + 1e-8)).astype(np.float32)


def local_minibatches(perm: np.ndarray, n_mb: int, lo: int, hi: int) -> list[tuple[np.ndarray, int]]:
    """Split a permutation of the GLOBAL row indices into `n_mb` minibatches exactly as the central update
    does; per minibatch: the rows this rank holds (global rows [lo, hi), as local indices, in permutation
    order) and the minibatch's global size."""
    n = len(perm)
    out = []
    for k in range(n_mb):
        mb = perm[k * n // n_mb : (k + 1) * n // n_mb]
        out.append((mb[(mb >= lo) & (mb < hi)] - lo, len(mb)))
    return out

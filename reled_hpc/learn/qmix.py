"""QMIX baseline for asynchronous agents: a shared per-agent Q network over candidate edges
(PointerNet scores = Q values) and a monotonic mixer (mixer.QMixer) over a variable set of agents.

Semi-synchronous transitions. QMIX needs joint transitions (s, a_1..a_n, r, s'), but here agents
decide at different env steps, so no such tuple exists: an agent's decision lasts until its own next
decision, which other agents do not share. We approximate:

- a GROUP G is the set of rows with the same (episode, step): the agents that decided together at
  one env step. Q_tot(G) = mixer(q_i(s_i, a_i) for i in G, own features of i, gstate at that step).
- each member's next state is its own next decision row (same episode and agent_id, next larger
  step) or none when the row is `done`/`terminal` (also when the batch holds no later row; with
  whole episodes, as `collect_episode` gives, that cannot happen without `done`).
- y_G = mean_{i in G} r_i + gamma * [any member continues] *
        mixer_target(max_a Q_target(s'_i, a) over continuing members, their own features at s'_i,
                     gstate of the EARLIEST next decision among the members).
  The members' next decisions are generally at different steps, so the "next joint state" is a
  bag of per-agent next states taken at different times; the mixer's global state comes from the
  first of them. One gamma per group transition (not gamma^dt): rewards already charge elapsed
  time, and this keeps the target a plain one-step Bellman backup. mean_i r_i matches the mixer,
  which averages over active agents, so group size does not scale the target.
- With double_q the next action is argmax of the online Q, valued by the target Q.

Mixer agent features: the agent's own observation (the first N_SELF columns: progress, elapsed,
distance to goal, number of candidates), which lets the hypernetwork weight agents individually.

Replay: a FIFO ring of decision rows stored in group order, plus a ring of groups (contiguous row
spans). A row's next row is always stored LATER than the row itself (same episode, larger step),
so evicting the oldest groups first never leaves a dangling next pointer; every sampled group has
all its members and their next rows. Sampling is uniform over stored groups, with replacement,
from a seeded numpy Generator.

Variable N: a minibatch of groups is padded to [B, N_max] with a member mask.

Target networks: HARD copy of (Q net, mixer) every `target_update` gradient steps (counted across
iterations; the count is checkpointed), as in the original QMIX.

Epsilon: linear from eps_start to eps_end over eps_decay_iterations ITERATIONS. The trainer calls
`begin_iteration(it)` before rolling out iteration `it`; `update()` also advances the counter by one,
so a trainer that never calls begin_iteration still gets the schedule (one update per iteration).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from torch.nn.utils import clip_grad_norm_, parameters_to_vector, vector_to_parameters

from .config import QMIXConfig
from .mixer import QMixer
from .nets import N_SELF, PointerNet
from .optim import adam, load_adam_state
from .rollout import Actor, Batch

# ---- group / next-row construction (vectorised, O(n log n)) -----------------------------------------


@dataclass
class GroupIndex:
    """Rows of a batch arranged into groups. `order` lists rows group by group ((episode, step),
    then agent_id); group k is order[start[k] : start[k] + length[k]]."""

    order: np.ndarray  # [n] row ids in group order
    start: np.ndarray  # [G] offset into order
    length: np.ndarray  # [G] members
    group_of: np.ndarray  # [n] group of each row
    next_row: np.ndarray  # [n] the agent's next decision row, -1 if done/terminal/none
    next_state_row: np.ndarray  # [G] row whose gstate is the group's next state (earliest next decision), -1 if none


def build_groups(batch: Batch) -> GroupIndex:
    ep = batch["episode"].astype(np.int64)
    ag = batch["agent_id"].astype(np.int64)
    st = batch["step"].astype(np.int64)
    n = len(ep)
    # each agent's decision sequence: next row = successor in (episode, agent, step) order
    oa = np.lexsort((st, ag, ep))
    same_seq = (ep[oa][1:] == ep[oa][:-1]) & (ag[oa][1:] == ag[oa][:-1])
    if np.any(same_seq & (st[oa][1:] == st[oa][:-1])):
        raise ValueError("batch has two rows for one (episode, agent_id, step)")
    next_row = np.full(n, -1, np.int64)
    next_row[oa[:-1][same_seq]] = oa[1:][same_seq]
    ended = batch["done"].astype(bool) | batch["terminal"].astype(bool)
    next_row[ended] = -1
    # groups: same (episode, step)
    og = np.lexsort((ag, st, ep))
    new = np.r_[True, (ep[og][1:] != ep[og][:-1]) | (st[og][1:] != st[og][:-1])] if n else np.zeros(0, bool)
    start = np.flatnonzero(new)
    length = np.diff(np.r_[start, n])
    group_of = np.empty(n, np.int64)
    group_of[og] = np.cumsum(new) - 1
    # next state of a group: gstate at the earliest next decision among its members
    cont = np.flatnonzero(next_row >= 0)
    nstep = st[next_row[cont]]
    g = group_of[cont]
    srt = np.lexsort((nstep, g))
    g_first, idx = np.unique(g[srt], return_index=True)
    next_state_row = np.full(len(start), -1, np.int64)
    next_state_row[g_first] = next_row[cont[srt[idx]]]
    return GroupIndex(og, start, length, group_of, next_row, next_state_row)


# ---- replay ------------------------------------------------------------------------------------------


class GroupReplay:
    """FIFO replay of whole groups; capacity in decision rows. Rows and groups live in two rings
    indexed by ever-growing absolute counters (position = counter % capacity)."""

    ROW_KEYS = ("obs", "mask", "action", "reward", "next", "boot")
    GROUP_KEYS = ("g_start", "g_len", "state", "next_state", "has_next")

    def __init__(self, capacity: int, seed: int) -> None:
        self.cap = capacity
        self.rng = np.random.default_rng(seed)
        self.row_head = self.row_tail = 0  # live rows: [row_head, row_tail)
        self.g_head = self.g_tail = 0  # live groups: [g_head, g_tail)
        self.a: dict[str, np.ndarray] = {}

    def _alloc(self, obs_dim: int, a_max: int, s_dim: int) -> None:
        c = self.cap  # groups have >= 1 row, so `c` group slots always suffice
        self.a = {"obs": np.zeros((c, obs_dim), np.float32), "mask": np.zeros((c, a_max), bool),
                  "action": np.zeros(c, np.int64), "reward": np.zeros(c, np.float32),
                  "next": np.full(c, -1, np.int64), "boot": np.zeros(c, bool),
                  "g_start": np.zeros(c, np.int64), "g_len": np.zeros(c, np.int64),
                  "state": np.zeros((c, s_dim), np.float32), "next_state": np.zeros((c, s_dim), np.float32),
                  "has_next": np.zeros(c, bool)}  # fmt: skip

    @property
    def n_rows(self) -> int:
        return self.row_tail - self.row_head

    @property
    def n_groups(self) -> int:
        return self.g_tail - self.g_head

    def add(self, batch: Batch, gi: GroupIndex | None = None) -> None:
        n = len(batch["action"])
        if n == 0:
            return
        gi = gi or build_groups(batch)
        if not self.a:
            self._alloc(batch["obs"].shape[1], batch["action_mask"].shape[1], batch["gstate"].shape[1])
        # more rows than capacity: keep the newest groups that fit (next rows point forward, so a suffix is closed)
        first = 0
        if n > self.cap:
            first = int(np.searchsorted(gi.start, n - self.cap, side="left"))
            if first >= len(gi.start):
                raise ValueError(f"a single group has {gi.length[-1]} rows > replay capacity {self.cap}")
        k0 = int(gi.start[first])
        rows = gi.order[k0:]
        k = len(rows)
        # evict oldest groups until k rows fit
        need = self.n_rows + k - self.cap
        if need > 0:
            gpos = np.arange(self.g_head, self.g_tail) % self.cap
            freed = np.cumsum(self.a["g_len"][gpos])
            m = int(np.searchsorted(freed, need, side="left")) + 1
            self.g_head += m
            self.row_head += int(freed[m - 1])
        # absolute index of each stored row
        abs_of = np.full(n, -1, np.int64)
        abs_of[rows] = self.row_tail + np.arange(k)
        pos = (self.row_tail + np.arange(k)) % self.cap
        nxt = gi.next_row[rows]
        self.a["obs"][pos] = batch["obs"][rows]
        self.a["mask"][pos] = batch["action_mask"][rows]
        self.a["action"][pos] = batch["action"][rows]
        self.a["reward"][pos] = batch["reward"][rows]
        self.a["boot"][pos] = nxt >= 0
        self.a["next"][pos] = np.where(nxt >= 0, abs_of[np.maximum(nxt, 0)], -1)
        ng = len(gi.start) - first
        gpos = (self.g_tail + np.arange(ng)) % self.cap
        self.a["g_start"][gpos] = self.row_tail + gi.start[first:] - k0
        self.a["g_len"][gpos] = gi.length[first:]
        self.a["state"][gpos] = batch["gstate"][gi.order[gi.start[first:]]]
        nsr = gi.next_state_row[first:]
        self.a["has_next"][gpos] = nsr >= 0
        self.a["next_state"][gpos] = np.where((nsr >= 0)[:, None], batch["gstate"][np.maximum(nsr, 0)], 0.0)
        self.row_tail += k
        self.g_tail += ng

    def sample(self, b: int) -> dict[str, np.ndarray]:
        """b groups, padded to [b, N_max]; `slot` marks real members."""
        gpos = self.rng.integers(self.g_head, self.g_tail, size=b) % self.cap
        starts, lens = self.a["g_start"][gpos], self.a["g_len"][gpos]
        slot = np.arange(int(lens.max()))[None, :] < lens[:, None]
        rabs = np.where(slot, starts[:, None] + np.arange(slot.shape[1])[None, :], starts[:, None])
        rpos = rabs % self.cap
        boot = self.a["boot"][rpos] & slot
        npos = np.where(boot, self.a["next"][rpos], rabs) % self.cap  # non-continuing slots: a dummy (own row)
        return {"obs": self.a["obs"][rpos], "mask": self.a["mask"][rpos], "action": self.a["action"][rpos],
                "reward": np.where(slot, self.a["reward"][rpos], 0.0).astype(np.float32), "slot": slot, "boot": boot,
                "next_obs": self.a["obs"][npos], "next_mask": self.a["mask"][npos], "state": self.a["state"][gpos],
                "next_state": self.a["next_state"][gpos], "has_next": self.a["has_next"][gpos]}  # fmt: skip

    def state_dict(self, contents: bool) -> dict[str, Any]:
        s: dict[str, Any] = {"rng": self.rng.bit_generator.state, "contents": contents and bool(self.a)}
        s.update(row_head=self.row_head, row_tail=self.row_tail, g_head=self.g_head, g_tail=self.g_tail)
        if s["contents"]:  # live entries only, oldest first
            rpos = np.arange(self.row_head, self.row_tail) % self.cap
            gpos = np.arange(self.g_head, self.g_tail) % self.cap
            s["rows"] = {k: self.a[k][rpos].copy() for k in self.ROW_KEYS}
            s["groups"] = {k: self.a[k][gpos].copy() for k in self.GROUP_KEYS}
        return s

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.rng.bit_generator.state = s["rng"]
        if not s["contents"]:  # replay was not saved: start empty, counters restart
            self.row_head = self.row_tail = self.g_head = self.g_tail = 0
            return
        self.row_head, self.row_tail, self.g_head, self.g_tail = s["row_head"], s["row_tail"], s["g_head"], s["g_tail"]
        if self.n_rows > self.cap:
            raise ValueError(f"saved replay holds {self.n_rows} rows > buffer_decisions {self.cap}")
        r, g = s["rows"], s["groups"]
        self._alloc(r["obs"].shape[1], r["mask"].shape[1], g["state"].shape[1])
        rpos = np.arange(self.row_head, self.row_tail) % self.cap
        gpos = np.arange(self.g_head, self.g_tail) % self.cap
        for k in self.ROW_KEYS:
            self.a[k][rpos] = r[k]
        for k in self.GROUP_KEYS:
            self.a[k][gpos] = g[k]


# ---- maths -------------------------------------------------------------------------------------------


def masked_q(q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, q, torch.finfo(q.dtype).min)


def td_targets(
    reward: torch.Tensor,
    slot: torch.Tensor,
    boot: torch.Tensor,
    next_q: torch.Tensor,
    next_feats: torch.Tensor,
    next_state: torch.Tensor,
    mixer: QMixer,
    gamma: float,
) -> torch.Tensor:
    """y_G = mean_{members} r + gamma * [any continues] * mixer(next_q of continuing members, ...)."""
    n = slot.sum(1).clamp(min=1).to(reward.dtype)
    mean_r = (reward * slot).sum(1) / n
    cont = boot.any(1)
    q_next = mixer(next_q, next_feats, boot, next_state)
    return mean_r + gamma * torch.where(cont, q_next, torch.zeros_like(q_next))


class QMIXLearner:
    """Same public interface as PPOLearner. `flat_weights` carries only the agent Q network (all a
    rollout worker needs); the mixer and target networks stay on the learner."""

    def __init__(self, a_max: int, g_dim: int, cfg: QMIXConfig, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.cfg = cfg
        self.a_max = a_max
        self.net = PointerNet(a_max, cfg.hidden)  # scores = per-candidate Q; its value head is unused
        self.mixer = QMixer(g_dim, N_SELF, cfg.mixer_embed, cfg.mixer_hidden)
        self.target_net = copy.deepcopy(self.net).requires_grad_(False)
        self.target_mixer = copy.deepcopy(self.mixer).requires_grad_(False)
        self.params = [p for n, p in self.net.named_parameters() if not n.startswith("value_head")]
        self.params += list(self.mixer.parameters())
        self.opt = adam(self.params, lr=cfg.lr)
        self.act_rng = np.random.default_rng(seed + 1)
        self.replay = GroupReplay(cfg.buffer_decisions, seed + 2)
        self.iteration = 0
        self.grad_steps = 0

    # ---- schedule --------------------------------------------------------------------------------
    def begin_iteration(self, it: int) -> None:
        """Iteration `it` is about to roll out: its epsilon applies."""
        self.iteration = int(it)

    @property
    def epsilon(self) -> float:
        return self.cfg.epsilon(self.iteration)

    # ---- weights ---------------------------------------------------------------------------------
    def flat_weights(self) -> np.ndarray:
        return parameters_to_vector(self.net.parameters()).detach().numpy().astype(np.float32)

    def load_flat_weights(self, vec: np.ndarray) -> None:
        vector_to_parameters(torch.as_tensor(vec, dtype=torch.float32), self.net.parameters())

    def state_dict(self) -> dict[str, Any]:
        """Networks (online + target), optimizer, actor RNG, replay (contents unless
        cfg.checkpoint_buffer is False, always its sampling RNG), iteration and gradient-step counters."""
        return {"net": self.net.state_dict(), "mixer": self.mixer.state_dict(),
                "target_net": self.target_net.state_dict(), "target_mixer": self.target_mixer.state_dict(),
                "opt": self.opt.state_dict(), "act_rng": self.act_rng.bit_generator.state,
                "replay": self.replay.state_dict(self.cfg.checkpoint_buffer), "iteration": self.iteration,
                "grad_steps": self.grad_steps}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.mixer.load_state_dict(state["mixer"])
        self.target_net.load_state_dict(state["target_net"])
        self.target_mixer.load_state_dict(state["target_mixer"])
        load_adam_state(self.opt, state["opt"])
        self.act_rng.bit_generator.state = state["act_rng"]
        self.replay.load_state_dict(state["replay"])
        self.iteration = state["iteration"]
        self.grad_steps = state["grad_steps"]

    # ---- acting ----------------------------------------------------------------------------------
    def reseed_actor(self, seed: int) -> None:
        """Make the next rollouts' exploration a function of `seed` alone (per rank, per iteration)."""
        self.act_rng = np.random.default_rng(seed)

    def actor(self, greedy: bool = False) -> Actor:
        """Epsilon-greedy over valid candidates (epsilon read at each call, so begin_iteration applies).
        logp: log-probability of the chosen action under that distribution; value: max valid Q."""
        net, rng = self.net, self.act_rng

        @torch.no_grad()
        def act(obs: np.ndarray, mask: np.ndarray, gstate: np.ndarray):
            eps = 0.0 if greedy else self.epsilon
            m = np.asarray(mask, bool)
            q, _ = net(torch.from_numpy(np.asarray(obs, np.float32)), torch.from_numpy(m))
            qm = masked_q(q, torch.from_numpy(m))
            best = qm.argmax(-1).numpy()
            a = best.copy()
            if eps > 0:
                explore = rng.random(len(m)) < eps
                u = np.where(m, rng.random(m.shape), -1.0)  # uniform over valid candidates
                a = np.where(explore, u.argmax(-1), best)
            n_valid = np.maximum(m.sum(-1), 1)
            p = eps / n_valid + (1.0 - eps) * (a == best)
            return a.astype(np.int64), np.log(p).astype(np.float32), qm.max(-1).values.numpy().astype(np.float32)

        return act

    # ---- learning --------------------------------------------------------------------------------
    def _step(self, s: dict[str, np.ndarray]) -> dict[str, float]:
        cfg = self.cfg
        t = {k: torch.from_numpy(v) for k, v in s.items()}
        b, n, d = t["obs"].shape
        slot, boot = t["slot"], t["boot"]
        q_all, _ = self.net(t["obs"].reshape(b * n, d), t["mask"].reshape(b * n, -1))
        q_taken = q_all.gather(-1, t["action"].reshape(-1, 1)).reshape(b, n)
        q_tot = self.mixer(q_taken, t["obs"][..., :N_SELF], slot, t["state"])
        with torch.no_grad():
            flat = boot.reshape(-1).nonzero().squeeze(-1)  # evaluate continuing members only
            nobs = t["next_obs"].reshape(b * n, d)[flat]
            nmask = t["next_mask"].reshape(b * n, -1)[flat]
            q_t, _ = self.target_net(nobs, nmask)
            if cfg.double_q:
                q_o, _ = self.net(nobs, nmask)
                a_star = masked_q(q_o, nmask).argmax(-1, keepdim=True)
                v = q_t.gather(-1, a_star).squeeze(-1)
            else:
                v = masked_q(q_t, nmask).max(-1).values
            next_q = torch.zeros(b * n)
            next_q[flat] = v
            y = td_targets(t["reward"], slot, boot, next_q.reshape(b, n), t["next_obs"][..., :N_SELF],
                           t["next_state"], self.target_mixer, cfg.gamma)  # fmt: skip
        loss = F.mse_loss(q_tot, y)
        self.opt.zero_grad()
        loss.backward()
        gnorm = clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.opt.step()
        self.grad_steps += 1
        if self.grad_steps % cfg.target_update == 0:
            self.target_net.load_state_dict(self.net.state_dict())
            self.target_mixer.load_state_dict(self.mixer.state_dict())
        return {"td_loss": float(loss.detach()), "q_tot_mean": float(q_tot.detach().mean()),
                "target_mean": float(y.mean()), "grad_norm": float(gnorm),
                "group_size": float(slot.sum(1).float().mean())}  # fmt: skip

    def update(
        self,
        batch: Batch,
        expert: Batch | None = None,
        alpha: np.ndarray | None = None,
        n_agents: int = 0,
        comm: Any = None,
    ) -> dict[str, float]:
        """Store the batch's groups, then `updates_per_iteration` gradient steps on replayed groups.
        expert/alpha/n_agents are accepted for interface parity and ignored (QMIX is a baseline).
        Advances the iteration counter (epsilon schedule) by one.

        QMIX trains centrally only (rank 0, every rank's rows): the replay, the uniform sampling of groups
        over all of it, and the target networks are one learner's state; a data-parallel update would need a
        sharded replay sampled by global group index (docs/architecture.md). A comm of > 1 rank is refused."""
        if comm is not None and comm.size > 1:
            raise ValueError("QMIX has no data-parallel update: train it with dist.learner=central")
        self.replay.add(batch)
        stats: dict[str, list[float]] = {}
        if self.replay.n_groups:
            for _ in range(self.cfg.updates_per_iteration):
                for k, v in self._step(self.replay.sample(self.cfg.batch_groups)).items():
                    stats.setdefault(k, []).append(v)
        out = {k: float(np.mean(v)) for k, v in stats.items()}
        out["value_loss"] = out.get("td_loss", float("nan"))  # the metrics row has a value_loss column
        out.update(epsilon=self.epsilon, buffer_decisions=float(self.replay.n_rows),
                   buffer_groups=float(self.replay.n_groups), grad_steps=float(self.grad_steps))  # fmt: skip
        self.iteration += 1
        return out

"""The learner side for the PPO family: IPPO (local critic), MAPPO (centralised critic over the
pooled global state) and RELED (PPO + the HPO hybrid update with expert demonstrations).

Input: rollout batches (numpy columns, see rollout.py). Output: new weights as one flat float32
vector. Nothing here touches the env."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.nn.utils import clip_grad_norm_, parameters_to_vector, vector_to_parameters

from . import losses
from .config import PPOConfig
from .nets import PointerNet
from .rollout import Actor, Batch


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
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, eps=1e-5)
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
        self.opt.load_state_dict(state["opt"])
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
        self, batch: Batch, expert: Batch | None = None, alpha: np.ndarray | None = None, n_agents: int = 0
    ) -> dict[str, float]:
        """One PPO update. With `expert` rows and `alpha` (per agent id), the HPO loss
        (1/N) sum_i alpha_i L_PPO_i + (1 - alpha_i) L_BC_i replaces the PPO policy loss."""
        cfg = self.cfg
        adv, ret = advantages(batch, cfg.gamma, cfg.lam)
        if len(adv) > 1:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
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
        hybrid = expert is not None and alpha is not None and len(expert["action"]) > 0
        if hybrid:
            e = {
                "obs": torch.from_numpy(expert["obs"]),
                "action_mask": torch.from_numpy(expert["action_mask"]),
                "action": torch.from_numpy(expert["action"].astype(np.int64)),
                "gstate": torch.from_numpy(expert["gstate"]),
                "agent": torch.from_numpy(expert["agent_id"].astype(np.int64)),
            }
            alpha_t = torch.as_tensor(alpha, dtype=torch.float32)
            n_agents = n_agents or len(alpha)
        n = len(adv)
        n_mb = max(1, int(np.ceil(n / cfg.minibatch)))
        stats: dict[str, list[float]] = {"policy_loss": [], "value_loss": [], "entropy": [], "approx_kl": [],
                                         "clip_frac": [], "bc_nll": []}  # fmt: skip
        for _ in range(cfg.epochs):
            perm = torch.from_numpy(self.shuffle_rng.permutation(n))
            eperm = torch.from_numpy(self.shuffle_rng.permutation(len(expert["action"]))) if hybrid else None
            for k in range(n_mb):
                idx = perm[k * n // n_mb : (k + 1) * n // n_mb]
                scores, value = self._forward(t, idx)
                logp_all = losses.masked_log_probs(scores, t["action_mask"][idx])
                logp = logp_all.gather(-1, t["action"][idx].unsqueeze(-1)).squeeze(-1)
                ppo = losses.ppo_clip_loss(logp, t["logp"][idx], t["adv"][idx], cfg.clip)
                vloss = losses.value_loss(value, t["ret"][idx]).mean()
                ent = losses.masked_entropy(scores, t["action_mask"][idx]).mean()
                if hybrid:
                    assert eperm is not None
                    ne = len(eperm)
                    eidx = eperm[k * ne // n_mb : (k + 1) * ne // n_mb]
                    escores, _ = self._forward(e, eidx)
                    bc = losses.bc_nll(escores, e["action_mask"][eidx], e["action"][eidx])
                    policy_loss, _info = losses.hybrid_loss(ppo, t["agent"][idx], bc, e["agent"][eidx], alpha_t)
                    stats["bc_nll"].append(float(bc.detach().mean()) if len(bc) else float("nan"))
                else:
                    policy_loss = ppo.mean()
                loss = policy_loss + cfg.vf_coef * vloss - cfg.ent_coef * ent
                self.opt.zero_grad()
                loss.backward()
                clip_grad_norm_(self.net.parameters(), cfg.max_grad_norm)
                self.opt.step()
                with torch.no_grad():
                    ratio = (logp - t["logp"][idx]).exp()
                    stats["approx_kl"].append(float(((ratio - 1) - (logp - t["logp"][idx])).mean()))
                    stats["clip_frac"].append(float(((ratio - 1).abs() > cfg.clip).float().mean()))
                stats["policy_loss"].append(float(policy_loss.detach()))
                stats["value_loss"].append(float(vloss.detach()))
                stats["entropy"].append(float(ent.detach()))
        return {k: float(np.mean(v)) if v else float("nan") for k, v in stats.items()}

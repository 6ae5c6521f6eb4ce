"""QMIX monotonic mixing network for a variable number of active agents.

Unlike the original QMIX (fixed n_agents, one weight column per agent slot), the first-layer
weight of agent i comes from a hypernetwork over (global state, agent i's own features), and the
weighted Q values are averaged over the active agents. So N can change between batches and rows,
agents are still weighted individually, and memory/time are linear in N.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["QMixer"]


def _mlp(inp: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden), nn.ReLU(), nn.Linear(hidden, out))


class QMixer(nn.Module):
    """q_tot = elu(mean_active_i(|W1(s, f_i)| * q_i) + b1(s)) . |w2(s)| + V(s).

    Non-negative mixing weights and the monotone elu give dq_tot/dq_i >= 0 for every active agent
    (the QMIX condition that makes per-agent argmax consistent with the joint argmax).
    """

    def __init__(self, state_dim: int, agent_feat_dim: int, embed_dim: int = 32, hypernet_hidden: int = 64) -> None:
        super().__init__()
        self.state_dim = state_dim
        self.agent_feat_dim = agent_feat_dim
        self.embed_dim = embed_dim
        self.hyper_w1 = _mlp(state_dim + agent_feat_dim, hypernet_hidden, embed_dim)
        self.hyper_b1 = nn.Linear(state_dim, embed_dim)
        self.hyper_w2 = _mlp(state_dim, hypernet_hidden, embed_dim)
        self.value = _mlp(state_dim, embed_dim, 1)

    def forward(self, agent_qs: Tensor, agent_feats: Tensor, mask: Tensor, state: Tensor) -> Tensor:
        """agent_qs [B, N], agent_feats [B, N, F], mask [B, N] bool (True = active), state [B, S] -> q_tot [B]."""
        b, n = agent_qs.shape
        if agent_feats.shape != (b, n, self.agent_feat_dim):
            raise ValueError(f"agent_feats must be [{b}, {n}, {self.agent_feat_dim}], got {tuple(agent_feats.shape)}")
        if mask.shape != (b, n):
            raise ValueError(f"mask must be [{b}, {n}], got {tuple(mask.shape)}")
        if state.shape != (b, self.state_dim):
            raise ValueError(f"state must be [{b}, {self.state_dim}], got {tuple(state.shape)}")
        m = mask.bool()
        # zero padded slots BEFORE any arithmetic: masked entries then have exactly no influence,
        # and NaN/inf padding cannot leak into outputs or parameter gradients (0 * NaN = NaN)
        qs = torch.where(m, agent_qs, torch.zeros((), dtype=agent_qs.dtype, device=agent_qs.device))
        feats = torch.where(
            m[..., None], agent_feats, torch.zeros((), dtype=agent_feats.dtype, device=agent_feats.device)
        )

        w1 = torch.abs(self.hyper_w1(torch.cat([state[:, None, :].expand(b, n, self.state_dim), feats], dim=-1)))
        weighted = (w1 * (qs * m.to(qs.dtype))[..., None]).sum(dim=1)  # [B, E]
        n_active = m.sum(dim=1, keepdim=True).clamp(min=1).to(qs.dtype)
        hidden = F.elu(weighted / n_active + self.hyper_b1(state))  # [B, E]
        w2 = torch.abs(self.hyper_w2(state))  # [B, E]
        return (hidden * w2).sum(dim=-1) + self.value(state)[:, 0]

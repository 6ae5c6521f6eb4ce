"""Networks shared by every agent. Candidate edges are scored by one network (pointer-style), so
the same weights serve any map, any number of candidates up to `a_max`, and any number of agents."""

from __future__ import annotations

import torch
from torch import nn

from ..sim.env import CAND_FEATURES, SELF_FEATURES

N_SELF = len(SELF_FEATURES)
N_CAND = len(CAND_FEATURES)


def mlp(sizes: list[int], act: type[nn.Module] = nn.Tanh, out_act: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2 or out_act:
            layers.append(act())
    return nn.Sequential(*layers)


def split_obs(obs: torch.Tensor, a_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat env observation -> (own features [B, N_SELF], candidate features [B, a_max, N_CAND])."""
    return obs[:, :N_SELF], obs[:, N_SELF:].reshape(obs.shape[0], a_max, N_CAND)


class PointerNet(nn.Module):
    """Scores each candidate from (own features, candidate features); a pooled summary feeds a
    value head. With `global_dim` > 0 the value head also sees the global state (MAPPO's
    centralised critic; the global state is pooled, so it has a fixed size for any n)."""

    def __init__(self, a_max: int, hidden: int = 64, global_dim: int = 0) -> None:
        super().__init__()
        self.a_max = a_max
        self.global_dim = global_dim
        self.self_enc = mlp([N_SELF, hidden], out_act=True)
        self.cand_enc = mlp([N_CAND, hidden], out_act=True)
        self.scorer = mlp([2 * hidden, hidden, 1])
        self.value_head = mlp([2 * hidden + global_dim, hidden, 1])

    def forward(
        self, obs: torch.Tensor, mask: torch.Tensor, gstate: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (scores [B, a_max] unmasked, value [B])."""
        own, cand = split_obs(obs, self.a_max)
        hs = self.self_enc(own)
        hc = self.cand_enc(cand)
        scores = self.scorer(torch.cat([hs.unsqueeze(1).expand_as(hc), hc], dim=-1)).squeeze(-1)
        m = mask.unsqueeze(-1).to(hc.dtype)
        pooled = (hc * m).sum(1) / m.sum(1).clamp(min=1.0)
        parts = [hs, pooled]
        if self.global_dim:
            if gstate is None:
                raise ValueError("this network has a centralised critic: pass the global state")
            parts.append(gstate)
        value = self.value_head(torch.cat(parts, dim=-1)).squeeze(-1)
        return scores, value

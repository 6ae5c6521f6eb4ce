"""HPO glue: per-agent DTW between expert and agent trajectories, and the resulting alphas."""

from __future__ import annotations

import numpy as np

from .dtw import dtw_distance, hpo_alpha
from .rollout import Batch


def _xy_by_agent(batch: Batch) -> dict[int, np.ndarray]:
    """agent id -> (T, 2) decision positions in time order (linear: one sort, one split)."""
    if len(batch["agent_id"]) == 0:
        return {}
    order = np.lexsort((batch["step"], batch["episode"], batch["agent_id"]))
    ids = batch["agent_id"][order]
    xy = np.stack([batch["x"][order], batch["y"][order]], axis=1).astype(np.float64)
    cuts = np.flatnonzero(ids[1:] != ids[:-1]) + 1
    return {int(chunk_ids[0]): chunk for chunk_ids, chunk in zip(np.split(ids, cuts), np.split(xy, cuts), strict=True)}


def agent_alphas(
    agent: Batch, expert: Batch, n_agents: int, scale: float, kappa: float, radius: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """alpha_i = exp(-kappa * D_i), D_i = DTW(expert_i, agent_i) over positions / map scale.
    Agents without an expert or an own trajectory get D = NaN and alpha = 1 (nothing to imitate)."""
    a_xy, e_xy = _xy_by_agent(agent), _xy_by_agent(expert)
    dtw = np.full(n_agents, np.nan)
    for i, axy in a_xy.items():
        exy = e_xy.get(i)
        if exy is not None:
            dtw[i] = dtw_distance(exy, axy, scale, radius)
    alpha = np.where(np.isnan(dtw), 1.0, hpo_alpha(np.nan_to_num(dtw), kappa))
    return alpha.astype(np.float32), dtw

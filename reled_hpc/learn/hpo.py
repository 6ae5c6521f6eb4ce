"""HPO glue: per-agent DTW between expert and agent trajectories, and the resulting alphas.

The trainer (`agent_alphas`, on a rank's batches) and the offline analysis (on a dump's rows) both
go through `trajectories_by_agent` and `alphas_from_trajectories`: alpha has one definition.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from .dtw import dtw_distance, hpo_alpha


def trajectories_by_agent(rows: Mapping[str, np.ndarray]) -> dict[int, np.ndarray]:
    """agent id -> (T, 2) decision positions in time order (linear: one sort, one split).

    `rows`: agent_id, episode, x, y and, in a rollout batch, step. The sort by (agent_id, episode,
    step) is stable, so a dump's rows (no step column) keep their stored order within an episode,
    which is time order.
    """
    if len(rows["agent_id"]) == 0:
        return {}
    keys = (rows["episode"], rows["agent_id"])
    order = np.lexsort((rows["step"], *keys) if "step" in rows else keys)
    ids = rows["agent_id"][order]
    xy = np.stack([rows["x"][order], rows["y"][order]], axis=1).astype(np.float64)
    cuts = np.flatnonzero(ids[1:] != ids[:-1]) + 1
    return {int(chunk_ids[0]): chunk for chunk_ids, chunk in zip(np.split(ids, cuts), np.split(xy, cuts), strict=True)}


def alphas_from_trajectories(
    agent_xy: Mapping[int, np.ndarray],
    expert_xy: Mapping[int, np.ndarray],
    agents: Iterable[int],
    scale: float,
    kappa: float,
    radius: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """(alpha, D) of `agents`, in that order (float64): D_i = DTW(expert_i, agent_i) over positions /
    map scale, alpha_i = exp(-kappa * D_i). Agents without an expert or an own trajectory get D = NaN
    and alpha = 1 (nothing to imitate)."""
    agents = list(agents)
    dtw = np.full(len(agents), np.nan)
    for j, i in enumerate(agents):
        if i in agent_xy and i in expert_xy:
            dtw[j] = dtw_distance(expert_xy[i], agent_xy[i], scale, radius)
    alpha = np.where(np.isnan(dtw), 1.0, hpo_alpha(np.nan_to_num(dtw), kappa))
    return alpha, dtw


def agent_alphas(
    agent: Mapping[str, np.ndarray],
    expert: Mapping[str, np.ndarray],
    n_agents: int,
    scale: float,
    kappa: float,
    radius: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """alphas_from_trajectories of a rank's agents 0..n_agents-1 from its rollout and expert batches:
    (alpha as float32, D)."""
    a_xy, e_xy = trajectories_by_agent(agent), trajectories_by_agent(expert)
    alpha, dtw = alphas_from_trajectories(a_xy, e_xy, range(n_agents), scale, kappa, radius)
    return alpha.astype(np.float32), dtw

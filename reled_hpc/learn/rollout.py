"""The rollout side: env + policy inference -> trajectory batches of numpy arrays.

A batch is a dict of equal-length columns, one row per decision (the HDF5 contract's columns plus
`gstate`, the pooled global state at the decision). Rows of one (episode, agent) are in time
order; `reward[j]` is what the agent received for decision j (paid at its next decision or at its
end), `done[j]` marks its last decision of the episode. The learner side sees nothing else, so
the two can live in different processes (MPI ranks) and exchange only these arrays and a flat
weight vector.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..io.schema import ROW_COLUMNS, TRAINER_COLUMNS
from ..sim.env import NavigationEnv
from ..sim.policies import Actor, deciding

Batch = dict[str, np.ndarray]

# column -> dtype: the dump's decision columns (reled_hpc.io.schema, less the iteration and rank
# that the trainer adds), then what only the learner reads
COLUMNS: dict[str, np.dtype] = {
    **{c.name: c.dtype for c in ROW_COLUMNS if c.name not in TRAINER_COLUMNS},
    "terminal": np.dtype(bool),
    "gstate": np.dtype(np.float32),
    "step": np.dtype(np.int32),
}


def empty_batch(obs_dim: int, a_max: int, g_dim: int) -> Batch:
    b = {k: np.zeros(0, dtype=dt) for k, dt in COLUMNS.items()}
    b["obs"] = np.zeros((0, obs_dim), np.float32)
    b["action_mask"] = np.zeros((0, a_max), bool)
    b["gstate"] = np.zeros((0, g_dim), np.float32)
    return b


def concat(batches: list[Batch]) -> Batch:
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def agent_index(env: NavigationEnv) -> dict[str, int]:
    return {a: i for i, a in enumerate(env.possible_agents)}


def collect_episode(env: NavigationEnv, actor: Actor, seed: int, episode: int) -> tuple[Batch, dict[str, Any]]:
    """Run one episode; return its decision rows and env.metrics()."""
    ids = agent_index(env)
    cols: dict[str, list] = {k: [] for k in COLUMNS}
    open_row: dict[str, int] = {}
    obs, infos = env.reset(seed=seed)
    rewards: dict[str, float] = {}
    terms: dict[str, bool] = {}
    truncs: dict[str, bool] = {}
    step = 0
    while True:
        for aid, r in rewards.items():  # pay each agent's previous decision
            j = open_row.get(aid)
            if j is None:
                continue
            cols["reward"][j] += r
            if terms[aid] or truncs[aid]:
                cols["done"][j] = True
                # elapsed time is observed, so the horizon is part of the task: truncation ends it too
                cols["terminal"][j] = True
                del open_row[aid]
        now = deciding(obs, infos)
        if not now:
            break
        o = np.stack([obs[a] for a in now])
        m = np.stack([infos[a]["action_mask"] for a in now])
        g = env.global_state()
        acts, logp, value = actor(o, m, g)
        actions = {}
        for i, aid in enumerate(now):
            open_row[aid] = len(cols["episode"])
            x, y = infos[aid]["xy"]
            cols["episode"].append(episode)
            cols["agent_id"].append(ids[aid])
            cols["t"].append(env.time)
            cols["obs"].append(o[i])
            cols["action"].append(int(acts[i]))
            cols["action_mask"].append(m[i])
            cols["reward"].append(0.0)
            cols["done"].append(False)
            cols["terminal"].append(False)
            cols["logp"].append(float(logp[i]))
            cols["value"].append(float(value[i]))
            cols["x"].append(x)
            cols["y"].append(y)
            cols["gstate"].append(g)
            cols["step"].append(step)
            actions[aid] = int(acts[i])
        obs, rewards, terms, truncs, infos = env.step(actions)
        step += 1
    if open_row:  # cannot happen: every agent ends by the horizon
        raise RuntimeError(f"episode {episode}: agents {sorted(open_row)[:5]} never ended")
    batch = empty_batch(env.config.obs_dim, env.config.a_max, len(env.GLOBAL_FEATURES))
    if cols["episode"]:
        batch = {k: np.asarray(v, dtype=COLUMNS[k]) for k, v in cols.items()}
    return batch, env.metrics()

"""Statistics computed from the decision rows (`agent/`, `expert/`), streamed chunk by chunk.

Row datasets can be far larger than memory; every function here reads only the narrow columns it
needs, `CHUNK_ROWS` rows at a time, and keeps state bounded by the agents of one iteration.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from reled_hpc.errors import DumpError
from reled_hpc.experiment.config import HPOConfig

from .load import CHUNK_ROWS, Dump, RunData, cfg_get


def row_stats(dump: Dump, group: str, chunk_rows: int = CHUNK_ROWS) -> dict[str, Any]:
    """Rows, mean reward per decision, finished episodes, action shares and invalid actions of a group.

    A read error stops the pass: the figures then cover the rows before it and `error` says why.
    """
    a_max = dump.a_max
    n, reward, done, invalid = 0, 0.0, 0, 0
    counts = np.zeros(a_max, np.int64)
    error = ""
    try:
        for c in dump.iter_chunks(group, ["reward", "action", "action_mask", "done"], chunk_rows):
            k = len(c["reward"])
            n += k
            reward += float(c["reward"].sum(dtype=np.float64))
            done += int(c["done"].sum())
            act = c["action"].astype(np.int64)
            inside = (act >= 0) & (act < a_max)
            counts += np.bincount(act[inside], minlength=a_max)[:a_max]
            ok = np.zeros(k, bool)
            ok[inside] = c["action_mask"][np.flatnonzero(inside), act[inside]]
            invalid += int(k - ok.sum())
    except DumpError as exc:
        error = str(exc)
    return {
        "rows": n,
        "mean_reward": reward / n if n else math.nan,
        "episodes_done": done,
        "action_share": (counts / n).tolist() if n else [],
        "invalid_actions": invalid,
        "error": error,
    }


def returns_by_iteration(
    dump: Dump, group: str, iterations: Iterable[int], chunk_rows: int = CHUNK_ROWS
) -> dict[int, float]:
    """Per iteration: mean over (episode, agent) of the summed rewards, from the rows.

    For `expert/` this is the demonstrations' return, which the metrics do not hold.
    """
    sums: dict[int, dict[int, float]] = {}
    for c in dump.iter_chunks(group, ["iteration", "episode", "agent_id", "reward"], chunk_rows, iterations):
        # one int64 key per (episode, agent): unique and sum inside the chunk, then merge
        key = (c["episode"].astype(np.int64) << 32) | (c["agent_id"].astype(np.int64) & 0xFFFFFFFF)
        for it in np.unique(c["iteration"]):
            sel = c["iteration"] == it
            keys, inv = np.unique(key[sel], return_inverse=True)
            tot = np.bincount(inv, weights=c["reward"][sel].astype(np.float64))
            acc = sums.setdefault(int(it), {})
            for k, v in zip(keys.tolist(), tot.tolist(), strict=True):
                acc[k] = acc.get(k, 0.0) + v
    return {it: float(np.mean(list(acc.values()))) for it, acc in sums.items() if acc}


# ---------------------------------------------------------------------------- DTW and alpha
def _manifest_scale(folder: Path) -> float | None:
    try:
        scale = float(json.loads((folder / "manifest.json").read_text())["scale_m"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return scale if math.isfinite(scale) and scale > 0 else None


def map_scale(config: dict[str, Any]) -> tuple[float | None, str]:
    """The map's length scale (m) DTW is divided by, from the map's manifest, without building it.

    Looks at a map folder named in env.map, else the built maps in the cache ($RELED_HPC_CACHE).
    """
    spec = str(cfg_get(config, "env.map", "") or "")
    if not spec:
        return None, ""
    path = Path(spec)
    if path.is_dir():
        s = _manifest_scale(path)
        return (s, f"{path}/manifest.json") if s else (None, "")
    name = path.name.split(".")[0] if path.suffix else spec
    root = Path(os.environ.get("RELED_HPC_CACHE") or Path.home() / ".cache" / "reled_hpc") / "maps"
    cands = sorted(root.glob(f"{name}-*/manifest.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for m in cands:
        s = _manifest_scale(m.parent)
        if s:
            return s, str(m)
    return None, ""


def _iteration_rows(dump: Dump, group: str, it: int, chunk_rows: int) -> dict[str, np.ndarray]:
    cols = ["agent_id", "episode", "x", "y"]
    parts = list(dump.iter_chunks(group, cols, chunk_rows, [it]))
    if not parts:
        return {c: np.empty(0) for c in cols}
    return {c: np.concatenate([p[c] for p in parts]) for c in cols}


def positions_scale(dump: Dump, iterations: Iterable[int], chunk_rows: int = CHUNK_ROWS) -> float | None:
    """Fallback scale: diagonal of the bounding box of every position in those iterations (m)."""
    lo, hi = np.full(2, np.inf), np.full(2, -np.inf)
    its = list(iterations)
    for g in ("agent", "expert"):
        for c in dump.iter_chunks(g, ["x", "y"], chunk_rows, its):
            if len(c["x"]):
                xy = np.stack([c["x"], c["y"]], axis=1)
                lo, hi = np.minimum(lo, xy.min(0)), np.maximum(hi, xy.max(0))
    if not np.isfinite(lo).all():
        return None
    return float(max(np.hypot(*(hi - lo)), 1.0))


def dtw_by_iteration(
    dump: Dump,
    iterations: Iterable[int],
    scale: float,
    kappa: float = HPOConfig.kappa,
    radius: int = HPOConfig.dtw_radius,
    n_agents: int | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> dict[str, np.ndarray]:
    """alpha_mean and dtw_mean per iteration, recomputed from the agent and expert positions.

    Through training's own functions (reled_hpc.learn.hpo): D_i = DTW(expert_i, agent_i) / scale,
    alpha_i = exp(-kappa D_i), alpha = 1 for agents without both trajectories; alpha_mean is over
    all `n_agents` agents (and any other id in the rows), dtw_mean over those with a DTW; NaN alpha
    for an iteration without expert rows. One iteration's rows are in memory at a time.
    """
    from reled_hpc.learn.hpo import alphas_from_trajectories, trajectories_by_agent

    its, alphas, dtws = [], [], []
    for it in iterations:
        a = trajectories_by_agent(_iteration_rows(dump, "agent", int(it), chunk_rows))
        e = trajectories_by_agent(_iteration_rows(dump, "expert", int(it), chunk_rows))
        agents = sorted(set(range(n_agents or 0)) | set(a) | set(e))
        alpha, d = alphas_from_trajectories(a, e, agents, scale, kappa, radius)
        d = d[~np.isnan(d)]
        its.append(int(it))
        dtws.append(float(d.mean()) if d.size else math.nan)
        # no expert rows: HPO did not apply (NaN, as the metrics have it), not "alpha = 1 everywhere"
        alphas.append(float(alpha.mean()) if e else math.nan)
    return {"iteration": np.asarray(its, np.int64), "alpha_mean": np.asarray(alphas), "dtw_mean": np.asarray(dtws)}


def recompute_hpo(dump: Dump, run: RunData, force: bool = False) -> tuple[dict[str, np.ndarray] | None, list[str]]:
    """alpha/DTW per iteration from the rows for the iterations whose metrics lack them (all if
    `force`); (None, notes) when there is nothing to compute (no expert rows, metrics complete)."""
    if not run.rows.get("expert"):
        return None, []
    missing = ~np.isfinite(run.metric("alpha_mean")) | ~np.isfinite(run.metric("dtw_mean"))
    targets = run.iterations if force else run.iterations[missing]
    if not targets.size:
        return None, []
    notes = []
    scale, _ = map_scale(run.config)
    if scale is None:
        scale = positions_scale(dump, targets.tolist())
        notes.append(
            f"{run.path}: the map's scale is unknown here (map {run.cfg('env.map', '?')!r} not built in the cache): "
            "DTW recomputed with the bounding box of the positions as scale, approximate"
        )
        if scale is None:
            return None, notes
    kappa = float(run.cfg("hpo.kappa", HPOConfig.kappa))
    radius = int(run.cfg("hpo.dtw_radius", HPOConfig.dtw_radius))
    try:
        out = dtw_by_iteration(dump, targets.tolist(), scale, kappa, radius, run.total_agents)
    except DumpError as exc:
        return None, [*notes, f"{run.path}: alpha/DTW not recomputed: {exc}"]
    return out, notes

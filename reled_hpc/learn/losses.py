"""Pure maths of the learners: masked action distributions, GAE, PPO/value/BC losses, the HPO mix.

No I/O, no environment. Per-sample losses are returned unreduced so the caller (and `hybrid_loss`)
decides how rows are weighted: per agent first, then across agents.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.signal import lfilter
from torch import Tensor

__all__ = [
    "bc_nll",
    "gae",
    "gae_by_agent",
    "hybrid_loss",
    "masked_entropy",
    "masked_log_probs",
    "masked_logits",
    "per_agent_mean",
    "policy_log_probs",
    "ppo_clip_loss",
    "value_loss",
]


# ---------------------------------------------------------------------------------------------
# masked action distributions
# ---------------------------------------------------------------------------------------------


def masked_logits(logits: Tensor, mask: Tensor) -> Tensor:
    """Logits with invalid actions (mask False) set to the dtype's most negative finite value.

    A finite value (not -inf) keeps softmax/log_softmax free of NaN: valid actions get their usual
    probabilities and invalid ones exactly 0. If a row is ALL masked, every entry equals the same
    finite value, so softmax gives a uniform distribution over the (invalid) actions instead of NaN;
    such rows carry no meaning and callers must not sample from them or train on them.
    Gradients never flow into masked entries (`torch.where`).
    """
    if logits.shape != mask.shape:
        raise ValueError(f"logits shape {tuple(logits.shape)} != mask shape {tuple(mask.shape)}")
    return torch.where(mask.bool(), logits, torch.finfo(logits.dtype).min)


def masked_log_probs(logits: Tensor, mask: Tensor) -> Tensor:
    """log_softmax over the last axis with invalid actions masked (their log-prob is huge negative, finite)."""
    return torch.log_softmax(masked_logits(logits, mask), dim=-1)


def policy_log_probs(net: torch.nn.Module, obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A policy network's log-probabilities over the candidates at given states, without gradients and
    without a global state (what PDI and RVI compare the expert with)."""
    with torch.no_grad():
        o, m = torch.from_numpy(np.asarray(obs, np.float32)), torch.from_numpy(np.asarray(mask, bool))
        g = torch.zeros((len(o), net.global_dim)) if net.global_dim else None
        scores, _ = net(o, m, g)
        return masked_log_probs(scores, m).numpy()


def masked_entropy(logits: Tensor, mask: Tensor) -> Tensor:
    """Entropy per row over the valid actions only (last axis reduced).

    0 for a row with one valid action, and 0 for an all-masked row. p*log p is only summed where
    the action is valid; there p*log p is finite (log p is finite), so 0*log 0 never yields NaN.
    """
    mask = mask.bool()
    logp = masked_log_probs(logits, mask)
    plogp = torch.where(mask, logp.exp() * logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    return -plogp.sum(dim=-1)


# ---------------------------------------------------------------------------------------------
# generalised advantage estimation (numpy)
# ---------------------------------------------------------------------------------------------


def _as_1d(name: str, x: np.ndarray, n: int | None, dtype: type) -> np.ndarray:
    a = np.asarray(x, dtype=dtype)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if n is not None and a.shape[0] != n:
        raise ValueError(f"{name} has {a.shape[0]} rows, expected {n}")
    return a


def _segmented_discounted_sum(delta: np.ndarray, cut: np.ndarray, g: float) -> np.ndarray:
    """A[t] = delta[t] + g * A[t+1], with the recursion cut after every t where cut[t] (and after the end).

    Vectorised in O(n): one `lfilter` runs the recursion backwards over the whole array WITHOUT cuts
    (y), then each row's leak from beyond its cut is removed: A[t] = y[t] - g^(k+1) * y[c], where c
    is the first row after t's segment and k = c - 1 - t. The correction underflows harmlessly to 0
    for long segments; the cancellation error is ~eps * max|y| (tiny for g < 1; fine in float64).
    """
    n = delta.shape[0]
    if n == 0:
        return np.zeros(0)
    y = lfilter([1.0], [1.0, -g], delta[::-1])[::-1]  # y[t] = delta[t] + g * y[t+1]
    cut = cut.copy()
    cut[-1] = True
    # index of the last row of each row's segment: next cut at or after t
    cut_idx = np.flatnonzero(cut)
    seg_end = cut_idx[np.searchsorted(cut_idx, np.arange(n))]
    after = seg_end + 1
    y_after = np.where(after < n, y[np.minimum(after, n - 1)], 0.0)
    steps = (seg_end - np.arange(n) + 1).astype(np.float64)
    return y - np.power(g, steps) * y_after


def gae(
    rewards: np.ndarray,
    values: np.ndarray,
    next_values: np.ndarray,
    terminals: np.ndarray,
    ends: np.ndarray,
    gamma: float,
    lam: float,
) -> tuple[np.ndarray, np.ndarray]:
    """GAE(gamma, lambda) for ONE agent's decisions in time order, arrays of shape (T,).

    - delta[t] = rewards[t] + gamma * next_values[t] * (1 - terminals[t]) - values[t]
    - A[t] = delta[t] + gamma * lam * A[t+1], the recursion cut after every t with ends[t].

    `terminals[t]`: the episode truly ended after t (no bootstrap; next_values[t] is ignored).
    `ends[t]`: the segment ends after t (terminal, truncation, or the rollout stopped); for a
    truncation the caller passes the bootstrap value V(s_{t+1}) in next_values[t]. A terminal
    always ends a segment, and so does the last row (there is nothing after it). Inside a segment
    next_values[t] should equal values[t+1]; it is taken from the caller, not shifted here.
    Returns (advantages, returns) with returns = advantages + values, float64.
    """
    return gae_by_agent(
        np.zeros(len(rewards), dtype=np.int64), rewards, values, next_values, terminals, ends, gamma, lam
    )


def gae_by_agent(
    agent_ids: np.ndarray,
    rewards: np.ndarray,
    values: np.ndarray,
    next_values: np.ndarray,
    terminals: np.ndarray,
    ends: np.ndarray,
    gamma: float,
    lam: float,
    times: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`gae` applied to every agent of a flat batch of rows, vectorised (O(n log n) for the sort).

    Order contract: each row belongs to agent `agent_ids[row]`. Without `times`, the rows of ONE
    agent must appear in time order, while rows of different agents may interleave arbitrarily (the
    natural layout of a buffer appended step by step across agents); a stable sort by agent keeps
    that order. With `times` (any sortable key per row, e.g. the decision index or simulation time),
    rows may come in any order and are sorted by (agent, time); equal times keep input order.
    Each agent's last row always ends its segment. Results come back in the INPUT row order.
    """
    ids = _as_1d("agent_ids", agent_ids, None, np.int64)
    n = ids.shape[0]
    r = _as_1d("rewards", rewards, n, np.float64)
    v = _as_1d("values", values, n, np.float64)
    nv = _as_1d("next_values", next_values, n, np.float64)
    term = _as_1d("terminals", terminals, n, bool)
    end = _as_1d("ends", ends, n, bool)
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")
    if n == 0:
        return np.zeros(0), np.zeros(0)

    if times is None:
        order = np.argsort(ids, kind="stable")
    else:
        t = _as_1d("times", times, n, np.float64)
        order = np.lexsort((t, ids))  # last key is primary; lexsort is stable
    ids_s = ids[order]
    delta = r[order] + gamma * nv[order] * (~term[order]) - v[order]
    cut = end[order] | term[order]
    cut[:-1] |= ids_s[1:] != ids_s[:-1]  # an agent's last row ends its segment
    adv_sorted = _segmented_discounted_sum(delta, cut, gamma * lam)

    adv = np.empty(n)
    adv[order] = adv_sorted
    return adv, adv + v


# ---------------------------------------------------------------------------------------------
# per-sample losses (torch, unreduced)
# ---------------------------------------------------------------------------------------------


def ppo_clip_loss(logp_new: Tensor, logp_old: Tensor, adv: Tensor, clip: float) -> Tensor:
    """PPO clipped surrogate per sample: -min(r * A, clip(r, 1 - clip, 1 + clip) * A), r = exp(logp_new - logp_old)."""
    if clip < 0:
        raise ValueError(f"clip must be >= 0, got {clip}")
    ratio = torch.exp(logp_new - logp_old)
    return -torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * adv)


def value_loss(v_new: Tensor, returns: Tensor, v_old: Tensor | None = None, clip: float | None = None) -> Tensor:
    """0.5 * (v_new - returns)^2 per sample; with `clip`, PPO-style: the max of the unclipped error and the
    error of v_old + clamp(v_new - v_old, -clip, clip), so the critic cannot move far from v_old cheaply."""
    err = (v_new - returns) ** 2
    if clip is None:
        return 0.5 * err
    if v_old is None:
        raise ValueError("value clipping needs v_old")
    if clip < 0:
        raise ValueError(f"clip must be >= 0, got {clip}")
    v_clipped = v_old + torch.clamp(v_new - v_old, -clip, clip)
    return 0.5 * torch.maximum(err, (v_clipped - returns) ** 2)


def bc_nll(logits: Tensor, mask: Tensor, expert_actions: Tensor) -> Tensor:
    """Negative log-likelihood of the expert's action under the masked policy, per sample.

    Raises ValueError naming the first row whose expert action is out of range or masked out
    (an expert choosing an impossible move is a data bug, not something to learn from).
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [B, A], got shape {tuple(logits.shape)}")
    actions = expert_actions.long()
    n_actions = logits.shape[1]
    bad = (actions < 0) | (actions >= n_actions)
    if bool(bad.any()):
        row = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"expert action {int(actions[row])} at row {row} is outside [0, {n_actions})")
    valid = mask.bool().gather(1, actions[:, None])[:, 0]
    if not bool(valid.all()):
        row = int(torch.nonzero(~valid)[0, 0])
        raise ValueError(f"expert action {int(actions[row])} at row {row} is masked out (invalid move)")
    return -masked_log_probs(logits, mask).gather(1, actions[:, None])[:, 0]


# ---------------------------------------------------------------------------------------------
# per-agent reduction and the HPO objective
# ---------------------------------------------------------------------------------------------


def _per_agent_sum_count(values: Tensor, agent_index: Tensor, n_agents: int) -> tuple[Tensor, Tensor]:
    idx = agent_index.long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_agents):
        raise ValueError(f"agent_index must lie in [0, {n_agents}), got [{int(idx.min())}, {int(idx.max())}]")
    sums = torch.zeros(n_agents, dtype=values.dtype, device=values.device).index_add(0, idx, values)
    counts = torch.zeros(n_agents, dtype=values.dtype, device=values.device).index_add(0, idx, torch.ones_like(values))
    return sums, counts


def per_agent_mean(values: Tensor, agent_index: Tensor, n_agents: int) -> Tensor:
    """Mean of `values` over each agent's rows, shape (n_agents,); 0 for an agent without rows."""
    sums, counts = _per_agent_sum_count(values, agent_index, n_agents)
    return sums / counts.clamp(min=1.0)


def hybrid_loss(
    ppo_per_sample: Tensor,
    ppo_agent: Tensor,
    bc_per_sample: Tensor,
    bc_agent: Tensor,
    alpha: Tensor,
    n_active: float | None = None,
    *,
    stats: bool = True,
) -> tuple[Tensor, dict[str, float]]:
    """The HPO objective over N agents (alpha has shape (N,), agent indices in [0, N)):

        L = (1 / N_active) * sum_i [ alpha_i * mean_i(L_PPO) + (1 - alpha_i) * mean_i(L_BC) ]

    The paper writes a SUM over agents; the project's definition AVERAGES over the agents that have
    at least one row (N_active), so the loss scale and learning rate do not depend on how many
    agents run (100 or 1000+), and agents absent from this batch do not dilute it. Rows are averaged
    within each agent first, so an agent with many decisions does not outweigh one with few.

    An agent without expert rows contributes alpha_i * mean_i(L_PPO) only (the mean over an empty
    set is 0; NOT renormalised): alpha_i keeps one meaning, the trust placed in the agent's own
    policy, and nothing pushes it to imitate a missing demonstration. A caller that wants pure RL
    for such agents sets alpha_i = 1 (the natural value: no expert, no distance). Symmetrically an
    agent without PPO rows contributes only (1 - alpha_i) * mean_i(L_BC). alpha is treated as a
    constant (no gradient).

    `n_active`: N_active counted over rows held elsewhere too (the data-parallel update: each rank
    passes its own rows and the global count; agents are disjoint across ranks, so the per-rank
    losses then sum to the global one). None: counted from these rows.

    Returns the loss and its statistics by name; `stats=False`: an empty dict instead, the form a
    training step calls hundreds of times per update (the statistics are a dozen small ops and syncs).
    """
    if alpha.ndim != 1:
        raise ValueError(f"alpha must have shape (N,), got {tuple(alpha.shape)}")
    n = alpha.shape[0]
    dtype = ppo_per_sample.dtype
    a = alpha.detach().to(dtype=dtype, device=ppo_per_sample.device)
    if bool(((a < 0) | (a > 1)).any()):
        raise ValueError("alpha must lie in [0, 1]")
    ppo_sum, ppo_cnt = _per_agent_sum_count(ppo_per_sample, ppo_agent, n)
    bc_sum, bc_cnt = _per_agent_sum_count(bc_per_sample.to(dtype), bc_agent, n)
    ppo_mean = ppo_sum / ppo_cnt.clamp(min=1.0)
    bc_mean = bc_sum / bc_cnt.clamp(min=1.0)
    active = (ppo_cnt > 0) | (bc_cnt > 0)
    n_act = active.sum().clamp(min=1).to(dtype) if n_active is None else max(float(n_active), 1.0)
    per_agent = a * ppo_mean + (1.0 - a) * bc_mean
    loss = per_agent.sum() / n_act
    if not stats:
        return loss, {}

    with torch.no_grad():
        has_ppo, has_bc = ppo_cnt > 0, bc_cnt > 0
        info = {
            "loss": float(loss),
            "ppo": float(ppo_mean[has_ppo].mean()) if bool(has_ppo.any()) else 0.0,
            "bc": float(bc_mean[has_bc].mean()) if bool(has_bc.any()) else 0.0,
            "alpha_mean": float(a[active].mean()) if bool(active.any()) else 0.0,
            "n_agents_active": float(active.sum()),
            "n_agents_bc": float(has_bc.sum()),
        }
    return loss, info

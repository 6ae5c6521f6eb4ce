"""SED's stationarity indices (docs/architecture.md section 3.2): pure maths, numpy/torch in, numbers out.

The bound. With |r| <= r_max and discount gamma, when the agents of S_k switch from pi_i to pi'_i,
every agent j outside S_k sees its objective move by at most (simulation lemma, TV, Pinsker)

    |J_j(pi') - J_j(pi)| <= 2*gamma*r_max/(1-gamma)^2 * sum_{i in S_k} sqrt(0.5 * max_s KL(pi'_i(.|s) || pi_i(.|s)))

Which KL enters: pi'_i is the expert-following policy, i.e. the smoothed expert
pi^e_i = (1-eps)*onehot(a^e) + eps*uniform(valid actions), and pi_i is the current learned policy
pi_theta; the max runs over agent i's demonstration states (the decisions of tau^e_i). So PDI and
RVI are computed from ONE table of per-state KL(pi^e || pi_theta) values:

- PDI_k = max over i in S_k and demonstration states s of that KL.
- RVI_k = the bound above divided by `return_scale`, default r_max/(1-gamma) (the largest possible
  |return|), which leaves RVI_k = 2*gamma/(1-gamma) * sum_i sqrt(0.5 * max_s KL_i): unit-free,
  independent of r_max and of the reward's units (docs/sed.md gives the reasoning).

KL is taken over the valid actions only (the action mask). Everything is computed in float64 from
log-probabilities (never from exp'd probabilities), so a policy whose float32 probability of the
expert action underflows to 0 still gives a finite KL.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "ExternalChange",
    "PDIResult",
    "RVIResult",
    "bound_contributions",
    "default_return_scale",
    "measured_external_change",
    "nonstationarity_bound",
    "pdi",
    "per_agent_max_kl",
    "per_state_kl",
    "rvi",
    "rvi_at_uniform_kl",
    "smoothed_expert_policy",
]


def _np(x: Any, dtype: Any = np.float64) -> np.ndarray:
    """numpy view of an array-like or a torch tensor (detached, on the CPU)."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _masks(masks: Any, n: int | None = None, a: int | None = None) -> np.ndarray:
    m = _np(masks, bool)
    if m.ndim != 2:
        raise ValueError(f"masks must be 2-D [n, A], got shape {m.shape}")
    if (n is not None and m.shape[0] != n) or (a is not None and m.shape[1] != a):
        raise ValueError(f"masks shape {m.shape} does not match [{n}, {a}]")
    if m.shape[0] and not m.any(axis=1).all():
        bad = int(np.flatnonzero(~m.any(axis=1))[0])
        raise ValueError(f"row {bad} has no valid action: padding rows are not demonstration states")
    return m


def _check_gamma(gamma: float) -> float:
    g = float(gamma)
    if not 0.0 < g < 1.0:
        raise ValueError(f"gamma must be in (0, 1) for the bound (it has 1/(1-gamma)^2), got {gamma}")
    return g


# ---------------------------------------------------------------------------------------------
# the smoothed expert and the per-state KL
# ---------------------------------------------------------------------------------------------


def smoothed_expert_policy(expert_actions: Any, masks: Any, eps: float) -> np.ndarray:
    """pi^e = (1-eps)*onehot(a^e) + eps*uniform(valid actions), shape [n, A], float64.

    Invalid actions get exactly 0; each row sums to 1. The expert action must be valid (the sandbox
    only accepts connected routes, so a^e is always a candidate of its state)."""
    eps = float(eps)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must be in [0, 1], got {eps}")
    acts = _np(expert_actions, np.int64).reshape(-1)
    m = _masks(masks, n=acts.shape[0])
    rows = np.arange(acts.shape[0])
    if acts.size and ((acts < 0) | (acts >= m.shape[1])).any():
        raise ValueError(f"expert action out of range [0, {m.shape[1]})")
    if acts.size and not m[rows, acts].all():
        bad = int(np.flatnonzero(~m[rows, acts])[0])
        raise ValueError(f"expert action {int(acts[bad])} of row {bad} is masked (not a valid candidate)")
    probs = eps * m / m.sum(axis=1, keepdims=True).clip(min=1)
    probs[rows, acts] += 1.0 - eps
    return probs


def per_state_kl(expert_probs: Any, policy_log_probs: Any, masks: Any) -> np.ndarray:
    """KL(pi^e(.|s) || pi_theta(.|s)) per row, over the valid actions, float64 [n].

    `policy_log_probs` are log pi_theta (e.g. `losses.masked_log_probs(scores, mask)`); their masked
    entries are ignored whatever they hold. Terms with pi^e = 0 contribute 0 (0 log 0 = 0). A valid
    action with a non-finite policy log-prob is an error: the KL would be infinite."""
    p = _np(expert_probs)
    logq = _np(policy_log_probs)
    if p.ndim != 2 or p.shape != logq.shape:
        raise ValueError(f"expert_probs {p.shape} and policy_log_probs {logq.shape} must be the same [n, A]")
    m = _masks(masks, *p.shape)
    if not np.isfinite(logq[m]).all():
        raise ValueError("the policy gives a valid action probability 0 (log-prob not finite): KL is infinite")
    if (p[~m] != 0).any():
        raise ValueError("expert_probs put mass on masked actions")
    use = m & (p > 0)
    safe_p = np.where(use, p, 1.0)  # log(1) = 0: no log(0) warnings on unused entries
    terms = np.where(use, p * (np.log(safe_p) - np.where(use, logq, 0.0)), 0.0)
    # clip tiny negatives from rounding: KL >= 0
    return np.maximum(terms.sum(axis=1), 0.0)


class PDIResult(NamedTuple):
    """value: PDI_k; per_agent: agent id -> max KL over its demonstration states; argmax: the row
    (demonstration state) that attains PDI_k, -1 when there are no rows."""

    value: float
    per_agent: dict[Any, float]
    argmax: int


def _key(x: Any) -> Hashable:
    return x.item() if isinstance(x, np.generic) else x


def per_agent_max_kl(kl: Any, agent_ids: Sequence[Any] | np.ndarray) -> dict[Any, float]:
    """agent id -> max over that agent's rows of `kl` (insertion order: first appearance)."""
    kl = _np(kl).reshape(-1)
    ids = list(agent_ids)
    if len(ids) != kl.shape[0]:
        raise ValueError(f"{len(ids)} agent ids for {kl.shape[0]} rows")
    out: dict[Any, float] = {}
    for a, v in zip(ids, kl.tolist(), strict=True):
        k = _key(a)
        out[k] = max(out.get(k, -math.inf), v)
    return out


def pdi(expert_probs: Any, policy_log_probs: Any, masks: Any, agent_ids: Sequence[Any] | np.ndarray) -> PDIResult:
    """PDI_k = max over i in S_k and demonstration states s of KL(pi^e_i(.|s) || pi_theta(.|s)).

    One row per demonstration state of the subset's agents (`agent_ids[row]` says whose). Returns
    (PDI_k, per-agent max KL, the row attaining it); per_agent is what the feedback names as drivers
    and also the input of `rvi` (the same KL enters the bound). No rows: (0.0, {}, -1)."""
    kl = per_state_kl(expert_probs, policy_log_probs, masks)
    per_agent = per_agent_max_kl(kl, agent_ids)
    if kl.size == 0:
        return PDIResult(0.0, {}, -1)
    i = int(np.argmax(kl))
    return PDIResult(float(kl[i]), per_agent, i)


# ---------------------------------------------------------------------------------------------
# the bound and RVI
# ---------------------------------------------------------------------------------------------


def _kl_values(per_agent_max_kl: Mapping[Any, float] | Sequence[float] | np.ndarray) -> tuple[list[Any], np.ndarray]:
    if isinstance(per_agent_max_kl, Mapping):
        keys = list(per_agent_max_kl)
        vals = _np([per_agent_max_kl[k] for k in keys])
    else:
        vals = _np(per_agent_max_kl).reshape(-1)
        keys = list(range(vals.shape[0]))
    if vals.size and (~np.isfinite(vals) | (vals < 0)).any():
        raise ValueError("per-agent KL values must be finite and >= 0")
    return keys, vals


def bound_contributions(
    per_agent_max_kl: Mapping[Any, float] | Sequence[float] | np.ndarray, gamma: float, r_max: float
) -> dict[Any, float]:
    """Agent -> its term 2*gamma*r_max/(1-gamma)^2 * sqrt(0.5 * max_s KL_i); they sum to the bound.
    A sequence (not a mapping) is keyed by position."""
    g = _check_gamma(gamma)
    if not float(r_max) > 0:
        raise ValueError(f"r_max must be > 0, got {r_max}")
    keys, kl = _kl_values(per_agent_max_kl)
    c = 2.0 * g * float(r_max) / (1.0 - g) ** 2 * np.sqrt(0.5 * kl)
    return dict(zip(keys, c.tolist(), strict=True))


def nonstationarity_bound(
    per_agent_max_kl: Mapping[Any, float] | Sequence[float] | np.ndarray, gamma: float, r_max: float
) -> float:
    """The bound on |J_j(pi') - J_j(pi)| for every j outside S_k:
    2*gamma*r_max/(1-gamma)^2 * sum_{i in S_k} sqrt(0.5 * max_s KL_i). Not capped (Pinsker's sqrt(KL/2)
    exceeds the trivial TV <= 1 once KL > 2; the design fixes the formula, so it stays as written)."""
    return float(sum(bound_contributions(per_agent_max_kl, gamma, r_max).values()))


def default_return_scale(gamma: float, r_max: float) -> float:
    """r_max / (1 - gamma): the largest |discounted return| any policy can have."""
    return float(r_max) / (1.0 - _check_gamma(gamma))


class RVIResult(NamedTuple):
    """value: RVI_k = bound / return_scale; bound: the raw bound (return units); per_agent: agent ->
    its share of RVI_k (they sum to value); return_scale: the divisor used."""

    value: float
    bound: float
    per_agent: dict[Any, float]
    return_scale: float


def rvi(
    per_agent_max_kl: Mapping[Any, float] | Sequence[float] | np.ndarray,
    gamma: float,
    r_max: float,
    return_scale: float | None = None,
) -> RVIResult:
    """RVI_k: the non-stationarity bound normalised by the return scale.

    `per_agent_max_kl`: agent i of S_k -> max over its demonstration states of KL(pi^e_i || pi_theta)
    (`pdi(...).per_agent`). `return_scale` defaults to r_max/(1-gamma), giving
    RVI_k = 2*gamma/(1-gamma) * sum_i sqrt(0.5 * KL_i). Another positive scale (e.g. an empirical
    |mean return|) may be passed; thresholds must then be set for that scale."""
    scale = default_return_scale(gamma, r_max) if return_scale is None else float(return_scale)
    if not scale > 0 or not math.isfinite(scale):
        raise ValueError(f"return_scale must be finite and > 0, got {return_scale}")
    contrib = bound_contributions(per_agent_max_kl, gamma, r_max)
    bound = float(sum(contrib.values()))
    shares = {a: c / scale for a, c in contrib.items()}
    return RVIResult(bound / scale, bound, shares, scale)


def rvi_at_uniform_kl(kl: float, n_agents: int, gamma: float) -> float:
    """RVI_k (default scale) if each of `n_agents` agents had max KL = `kl`: 2*gamma/(1-gamma)*n*sqrt(kl/2).
    A way to set tau_R in RVI's own units from a per-agent KL one is willing to accept."""
    g = _check_gamma(gamma)
    return 2.0 * g / (1.0 - g) * int(n_agents) * math.sqrt(0.5 * float(kl))


# ---------------------------------------------------------------------------------------------
# the measured counterpart
# ---------------------------------------------------------------------------------------------


class ExternalChange(NamedTuple):
    """Outside S_k: mean of (R_expert - R_policy) (signed), its absolute value, the largest per-agent
    |R_expert - R_policy|, the number of outside agents, and abs_mean / return_scale (NaN without a
    scale) to log beside RVI_k in the same units."""

    mean: float
    abs_mean: float
    max_abs: float
    n_outside: int
    normalised: float


def measured_external_change(
    returns_policy: Any, returns_expert: Any, outside_mask: Any, return_scale: float | None = None
) -> ExternalChange:
    """How much the other agents' returns moved when S_k followed the expert routes instead of the policy.

    `returns_policy[j]`, `returns_expert[j]`: agent j's return in the run where S_k follows the policy /
    the expert (same scenario, same seed, same agent order); `outside_mask[j]`: j is not in S_k.
    The bound holds for each |J_j' - J_j| (discounted expectations); one run per side gives a noisy
    estimate of that, so this is logged next to RVI, not asserted against it."""
    rp = _np(returns_policy).reshape(-1)
    re = _np(returns_expert).reshape(-1)
    out = _np(outside_mask, bool).reshape(-1)
    if not rp.shape == re.shape == out.shape:
        raise ValueError(f"shapes differ: policy {rp.shape}, expert {re.shape}, mask {out.shape}")
    d = re[out] - rp[out]
    if d.size == 0:
        return ExternalChange(0.0, 0.0, 0.0, 0, 0.0 if return_scale else math.nan)
    mean = float(d.mean())
    norm = abs(mean) / float(return_scale) if return_scale else math.nan
    return ExternalChange(mean, abs(mean), float(np.abs(d).max()), int(d.size), norm)


def plan_preference(executed: bool, routes: int, rvi: float, pdi: float) -> tuple[float, float, float, float]:
    """Sort key of a subset's plans, lower is better: a program that executed first, then more valid
    routes, then the lowest RVI, then the lowest PDI (NaN: not measured, last). SED keeps the best
    plan by it; the analysis ranks dumped programs by it (routes unknown there: pass the same value)."""
    inf = math.inf
    return (
        0.0 if executed else 1.0,
        -float(routes),
        rvi if math.isfinite(rvi) else inf,
        pdi if math.isfinite(pdi) else inf,
    )

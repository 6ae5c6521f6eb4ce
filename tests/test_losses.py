"""Hand-computed checks of the learners' maths (reled_hpc.learn.losses)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reled_hpc.learn.losses import (
    bc_nll,
    gae,
    gae_by_agent,
    hybrid_loss,
    masked_entropy,
    masked_log_probs,
    masked_logits,
    per_agent_mean,
    ppo_clip_loss,
    value_loss,
)

T = torch.tensor


# --- PPO clip ---------------------------------------------------------------------------------


def test_ppo_clip_loss_hand_computed():
    ratios = T([1.1, 1.1, 1.5, 1.5, 0.5, 0.5], dtype=torch.float64)
    adv = T([2.0, -2.0, 2.0, -2.0, 2.0, -2.0], dtype=torch.float64)
    logp_old = torch.zeros(6, dtype=torch.float64)
    loss = ppo_clip_loss(torch.log(ratios), logp_old, adv, clip=0.2)
    expected = [
        -2.2,  # r=1.1 inside [0.8, 1.2], A=2:   -min(2.2, 2.2)
        2.2,  # r=1.1 inside,           A=-2:  -min(-2.2, -2.2)
        -2.4,  # r=1.5 above, A=2:   -min(3.0, 1.2*2=2.4)     -> clipped, no incentive beyond 1.2
        3.0,  # r=1.5 above, A=-2:  -min(-3.0, 1.2*-2=-2.4)  -> unclipped, pessimistic
        -1.0,  # r=0.5 below, A=2:   -min(1.0, 0.8*2=1.6)     -> unclipped, pessimistic
        1.6,  # r=0.5 below, A=-2:  -min(-1.0, 0.8*-2=-1.6)  -> clipped
    ]
    assert loss.shape == (6,)
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-12)


# --- GAE --------------------------------------------------------------------------------------

# gamma=0.9, lam=0.8 -> gamma*lam = 0.72
# Agent A (terminal at the end): r=[1,0,2], v=[0.5,1,1.5], next_v=[1,1.5,9 (ignored: terminal)]
#   delta2 = 2 + 0            - 1.5 = 0.5             A2 = 0.5
#   delta1 = 0 + 0.9*1.5      - 1.0 = 0.35            A1 = 0.35 + 0.72*0.5  = 0.71
#   delta0 = 1 + 0.9*1.0      - 0.5 = 1.4             A0 = 1.4  + 0.72*0.71 = 1.9112
#   returns = A + v = [2.4112, 1.71, 2.0]
A_R, A_V, A_NV = [1.0, 0.0, 2.0], [0.5, 1.0, 1.5], [1.0, 1.5, 9.0]
A_TERM, A_END = [False, False, True], [False, False, True]
A_ADV, A_RET = [1.9112, 0.71, 0.5], [2.4112, 1.71, 2.0]
# Agent B (truncation after step 1 with bootstrap V=4, then a new segment cut by the rollout end):
#   r=[1,1,1], v=[1,2,3], next_v=[2, 4 (bootstrap), 0.5 (bootstrap)]
#   delta2 = 1 + 0.9*0.5 - 3 = -1.55                   A2 = -1.55
#   delta1 = 1 + 0.9*4   - 2 = 2.6                     A1 = 2.6  (cut: A2 not added)
#   delta0 = 1 + 0.9*2   - 1 = 1.8                     A0 = 1.8 + 0.72*2.6 = 3.672
#   returns = [4.672, 4.6, 1.45]
B_R, B_V, B_NV = [1.0, 1.0, 1.0], [1.0, 2.0, 3.0], [2.0, 4.0, 0.5]
B_TERM, B_END = [False, False, False], [False, True, True]
B_ADV, B_RET = [3.672, 2.6, -1.55], [4.672, 4.6, 1.45]


def test_gae_terminal():
    adv, ret = gae(np.array(A_R), np.array(A_V), np.array(A_NV), np.array(A_TERM), np.array(A_END), 0.9, 0.8)
    np.testing.assert_allclose(adv, A_ADV, rtol=1e-12)
    np.testing.assert_allclose(ret, A_RET, rtol=1e-12)


def test_gae_truncation_with_bootstrap():
    adv, ret = gae(np.array(B_R), np.array(B_V), np.array(B_NV), np.array(B_TERM), np.array(B_END), 0.9, 0.8)
    np.testing.assert_allclose(adv, B_ADV, rtol=1e-12)
    np.testing.assert_allclose(ret, B_RET, rtol=1e-12)


def _interleaved():
    # rows alternate A (id 7), B (id 3): each agent's rows in time order, agents interleaved
    ids = np.array([7, 3, 7, 3, 7, 3])
    cols = [
        np.array([x for pair in zip(a, b, strict=True) for x in pair])
        for a, b in [
            (A_R, B_R),
            (A_V, B_V),
            (A_NV, B_NV),
            (A_TERM, B_TERM),
            (A_END, B_END),
            (A_ADV, B_ADV),
            (A_RET, B_RET),
        ]
    ]
    return ids, cols


def test_gae_by_agent_interleaved():
    ids, (r, v, nv, term, end, adv_exp, ret_exp) = _interleaved()
    adv, ret = gae_by_agent(ids, r, v, nv, term, end, 0.9, 0.8)
    np.testing.assert_allclose(adv, adv_exp, rtol=1e-12)
    np.testing.assert_allclose(ret, ret_exp, rtol=1e-12)


def test_gae_by_agent_any_order_with_times():
    ids, (r, v, nv, term, end, adv_exp, ret_exp) = _interleaved()
    times = np.array([0, 0, 1, 1, 2, 2])
    perm = np.random.default_rng(0).permutation(6)
    adv, ret = gae_by_agent(ids[perm], r[perm], v[perm], nv[perm], term[perm], end[perm], 0.9, 0.8, times=times[perm])
    np.testing.assert_allclose(adv, adv_exp[perm], rtol=1e-12)
    np.testing.assert_allclose(ret, ret_exp[perm], rtol=1e-12)


@pytest.mark.parametrize(("gamma", "lam"), [(0.99, 0.95), (1.0, 1.0), (0.9, 0.0)])
def test_gae_by_agent_matches_naive_loop_large(gamma, lam):
    # the vectorised kernel against a plain backward loop on many random agents and segments
    rng = np.random.default_rng(1)
    n = 20_000
    ids = rng.integers(0, 300, n)
    r, v, nv = rng.normal(size=n), rng.normal(size=n), rng.normal(size=n)
    term = rng.random(n) < 0.02
    end = term | (rng.random(n) < 0.02)
    adv, _ = gae_by_agent(ids, r, v, nv, term, end, gamma, lam)
    expected = np.empty(n)
    for agent in np.unique(ids):
        rows = np.flatnonzero(ids == agent)
        nxt = 0.0
        for k in range(len(rows) - 1, -1, -1):
            i = rows[k]
            cut = end[i] or term[i] or k == len(rows) - 1
            delta = r[i] + gamma * nv[i] * (not term[i]) - v[i]
            nxt = delta + gamma * lam * (0.0 if cut else nxt)
            expected[i] = nxt
    np.testing.assert_allclose(adv, expected, rtol=1e-9, atol=1e-9)


# --- value loss -------------------------------------------------------------------------------


def test_value_loss_unclipped_and_clipped():
    # unclipped: 0.5*(1-2)^2 = 0.5, 0.5*(3-2)^2 = 0.5
    np.testing.assert_allclose(value_loss(T([1.0, 3.0]), T([2.0, 2.0])).numpy(), [0.5, 0.5])
    v_new, ret, v_old = T([1.9, 1.0]), T([2.0, 2.0]), T([1.0, 1.8])
    # row 0: v_clip = 1.0 + clamp(0.9, +-0.2) = 1.2 -> 0.5*max(0.1^2, 0.8^2) = 0.5*0.64 = 0.32
    # row 1: v_clip = 1.8 + clamp(-0.8, +-0.2) = 1.6 -> 0.5*max(1.0^2, 0.4^2) = 0.5
    np.testing.assert_allclose(value_loss(v_new, ret, v_old, clip=0.2).numpy(), [0.32, 0.5], rtol=1e-6)
    with pytest.raises(ValueError, match="v_old"):
        value_loss(v_new, ret, clip=0.2)


# --- masked distributions and BC --------------------------------------------------------------


def test_bc_nll_masked_three_actions():
    logits = T([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], dtype=torch.float64)
    mask = T([[True, False, True], [True, False, True]])
    nll = bc_nll(logits, mask, T([2, 0]))
    # valid {0, 2}: -log(e^3 / (e^1 + e^3)) = log(1 + e^-2) = 0.1269280110
    #               -log(e^1 / (e^1 + e^3)) = log(1 + e^2)  = 2.1269280110
    np.testing.assert_allclose(nll.numpy(), [math.log1p(math.exp(-2)), math.log1p(math.exp(2))], rtol=1e-12)
    np.testing.assert_allclose(nll.numpy(), [0.1269280110, 2.1269280110], rtol=1e-9)
    expected = -torch.log_softmax(T([1.0, 3.0], dtype=torch.float64), 0)
    np.testing.assert_allclose(nll.numpy(), expected[[1, 0]].numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match="row 1"):
        bc_nll(logits, mask, T([0, 1]))


def test_masked_entropy():
    logits = T(
        [
            [0.3, 0.3, 0.3, 5.0],  # 3 valid, uniform -> log 3
            [0.0, math.log(3.0), 100.0, 0.0],  # p = [1/4, 3/4] over 2 valid
            [2.0, -1.0, 7.0, 0.0],  # single valid -> 0
            [1.0, 2.0, 3.0, 4.0],  # all masked -> 0, no NaN
        ],
        dtype=torch.float64,
    )
    mask = T([[True, True, True, False], [True, True, False, False], [False, True, False, False], [False] * 4])
    h = masked_entropy(logits, mask)
    # -(1/4 log 1/4 + 3/4 log 3/4) = 0.5623351446
    np.testing.assert_allclose(h.numpy(), [math.log(3), 0.5623351446, 0.0, 0.0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_actions_have_zero_probability_and_finite_gradients(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(5, 6, dtype=dtype) * 10).requires_grad_(True)
    mask = torch.rand(5, 6) < 0.5
    mask[:, 0] = True
    mask[4] = False  # an all-masked row must not produce NaN
    probs = torch.softmax(masked_logits(logits, mask), -1)
    assert torch.all(probs[:4][~mask[:4]] == 0)
    np.testing.assert_allclose(probs.sum(-1).detach().numpy(), 1.0, rtol=1e-5)
    logp = masked_log_probs(logits, mask)
    assert torch.isfinite(logp).all()
    loss = -logp[:4, 0].sum() - masked_entropy(logits, mask).sum() + bc_nll(logits[:4], mask[:4], torch.zeros(4)).sum()
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.all(logits.grad[~mask] == 0)


# --- per-agent mean and the HPO objective -----------------------------------------------------


def test_per_agent_mean():
    vals = T([1.0, 3.0, 4.0, 10.0])
    out = per_agent_mean(vals, T([0, 0, 2, 2]), 4)
    np.testing.assert_allclose(out.numpy(), [2.0, 0.0, 7.0, 0.0])  # agents 1 and 3 have no rows


PPO = T([1.0, 3.0, 4.0], dtype=torch.float64)  # agent 0: mean 2, agent 1: mean 4
PPO_AG = T([0, 0, 1])
BC = T([0.5, 1.5, 2.0, 4.0, 6.0], dtype=torch.float64)  # agent 0: mean 1, agent 1: mean 4
BC_AG = T([0, 0, 1, 1, 1])


def test_hybrid_loss_two_agents():
    loss, info = hybrid_loss(PPO, PPO_AG, BC, BC_AG, T([0.25, 0.6], dtype=torch.float64))
    # 1/2 * [0.25*2 + 0.75*1 + 0.6*4 + 0.4*4] = 1/2 * (0.5 + 0.75 + 2.4 + 1.6) = 2.625
    assert float(loss) == pytest.approx(2.625, rel=1e-12)
    assert info["loss"] == pytest.approx(2.625) and info["n_agents_active"] == 2


def test_hybrid_loss_limits():
    pure_ppo, _ = hybrid_loss(PPO, PPO_AG, BC, BC_AG, T([1.0, 1.0]))
    assert float(pure_ppo) == pytest.approx((2.0 + 4.0) / 2)  # mean of per-agent PPO means
    pure_bc, _ = hybrid_loss(PPO, PPO_AG, BC, BC_AG, T([0.0, 0.0]))
    assert float(pure_bc) == pytest.approx((1.0 + 4.0) / 2)


def test_hybrid_loss_agent_without_expert_rows():
    # agent 1 has no BC rows: contributes alpha_1 * PPO only (not renormalised)
    loss, info = hybrid_loss(PPO, PPO_AG, BC[:2], BC_AG[:2], T([0.25, 0.6], dtype=torch.float64))
    # 1/2 * [0.25*2 + 0.75*1 + 0.6*4] = 1/2 * 3.65 = 1.825
    assert float(loss) == pytest.approx(1.825, rel=1e-12)
    assert info["n_agents_bc"] == 1


def test_hybrid_loss_gradients_follow_alpha():
    ppo = PPO.clone().requires_grad_(True)
    bc = BC.clone().requires_grad_(True)
    loss, _ = hybrid_loss(ppo, PPO_AG, bc, BC_AG, T([0.25, 0.6], dtype=torch.float64))
    loss.backward()
    # d/d ppo row of agent i = alpha_i / n_i / N
    np.testing.assert_allclose(ppo.grad.numpy(), [0.25 / 2 / 2, 0.25 / 2 / 2, 0.6 / 1 / 2])
    np.testing.assert_allclose(bc.grad.numpy(), [0.75 / 2 / 2] * 2 + [0.4 / 3 / 2] * 3)


def test_hybrid_loss_without_stats_has_the_same_value_and_gradient():
    """The training step's form (stats=False) computes the same value and gradient, with and without n_active."""
    for n_active in (None, 5.0):
        ppo = PPO.clone().requires_grad_(True)
        bc = BC.clone().requires_grad_(True)
        loss, info = hybrid_loss(ppo, PPO_AG, bc, BC_AG, T([0.25, 0.6], dtype=torch.float64), n_active)
        loss.backward()
        ppo2 = PPO.clone().requires_grad_(True)
        bc2 = BC.clone().requires_grad_(True)
        bare, none = hybrid_loss(ppo2, PPO_AG, bc2, BC_AG, T([0.25, 0.6], dtype=torch.float64), n_active, stats=False)
        bare.backward()
        assert none == {} and info["loss"] == float(bare.detach()) == float(loss.detach())
        assert torch.equal(ppo.grad, ppo2.grad) and torch.equal(bc.grad, bc2.grad)
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
        hybrid_loss(PPO, PPO_AG, BC, BC_AG, T([0.25, 1.5], dtype=torch.float64), stats=False)

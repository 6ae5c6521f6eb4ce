"""QMIX mixer (reled_hpc.learn.mixer): monotonicity, masking, variable N, scale."""

from __future__ import annotations

import pytest
import torch

from reled_hpc.learn.mixer import QMixer

S, F = 6, 4


def _inputs(b: int, n: int, seed: int, p_active: float = 0.7):
    g = torch.Generator().manual_seed(seed)
    qs = torch.randn(b, n, generator=g) * 3
    feats = torch.randn(b, n, F, generator=g)
    mask = torch.rand(b, n, generator=g) < p_active
    mask[:, 0] = True
    state = torch.randn(b, S, generator=g)
    return qs, feats, mask, state


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n", [1, 2, 7, 50])
def test_monotone_in_every_active_agent(seed, n):
    torch.manual_seed(seed)
    mixer = QMixer(S, F)
    qs, feats, mask, state = _inputs(3, n, seed)
    qs.requires_grad_(True)
    mixer(qs, feats, mask, state).sum().backward()
    assert torch.all(qs.grad[mask] >= 0)
    assert torch.all(qs.grad[~mask] == 0)


def test_masked_agents_have_no_influence():
    torch.manual_seed(0)
    mixer = QMixer(S, F)
    qs, feats, mask, state = _inputs(4, 20, 0, p_active=0.5)
    base = mixer(qs, feats, mask, state)
    qs2, feats2 = qs.clone(), feats.clone()
    qs2[~mask] = torch.randn(int((~mask).sum())) * 100
    feats2[~mask] = float("nan")  # even NaN padding must not leak
    out = mixer(qs2, feats2, mask, state)
    assert torch.equal(out, base)
    feats_var = feats2.clone().requires_grad_(True)
    mixer(qs2, feats_var, mask, state).sum().backward()
    assert torch.all(feats_var.grad[~mask] == 0)
    assert all(torch.isfinite(p.grad).all() for p in mixer.parameters())


def test_variable_n_in_one_batch_equals_unpadded():
    torch.manual_seed(1)
    mixer = QMixer(S, F)
    sizes = [1, 5, 12]
    rows = [_inputs(1, n, 10 + n, p_active=1.0) for n in sizes]
    n_max = max(sizes)
    qs = torch.zeros(len(sizes), n_max)
    feats = torch.zeros(len(sizes), n_max, F)
    mask = torch.zeros(len(sizes), n_max, dtype=torch.bool)
    state = torch.cat([r[3] for r in rows])
    for i, (q, f, _, _) in enumerate(rows):
        n = q.shape[1]
        qs[i, :n], feats[i, :n], mask[i, :n] = q[0], f[0], True
    batched = mixer(qs, feats, mask, state)
    single = torch.cat([mixer(q, f, m, s) for q, f, m, s in rows])
    torch.testing.assert_close(batched, single)


def test_no_active_agents_is_finite():
    mixer = QMixer(S, F)
    qs, feats, _, state = _inputs(2, 3, 0)
    out = mixer(qs, feats, torch.zeros(2, 3, dtype=torch.bool), state)
    assert out.shape == (2,) and torch.isfinite(out).all()


def test_thousand_agents():
    # speed at this size is measured by `python -m reled_hpc.bench learner`, not here
    torch.manual_seed(2)
    mixer = QMixer(S, F)
    qs, feats, mask, state = _inputs(2, 1000, 2)
    qs.requires_grad_(True)
    out = mixer(qs, feats, mask, state)
    out.sum().backward()
    assert out.shape == (2,) and torch.all(qs.grad[mask] >= 0)

"""The learners' fused Adam: Adam's maths, and the kernel survives loading an older checkpoint."""

from __future__ import annotations

import torch

from reled_hpc.learn.config import PPOConfig
from reled_hpc.learn.nets import PointerNet
from reled_hpc.learn.optim import adam, load_adam_state
from reled_hpc.learn.ppo import PPOLearner


def _steps(opt: torch.optim.Optimizer, net: torch.nn.Module, n: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        opt.zero_grad()
        for p in net.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def test_fused_adam_follows_the_for_loop_adam():
    torch.manual_seed(0)
    a = PointerNet(4)
    b = PointerNet(4)
    b.load_state_dict(a.state_dict())
    start = [p.detach().clone() for p in a.parameters()]
    _steps(adam(a.parameters(), lr=1e-3, eps=1e-5), a, 20)
    _steps(torch.optim.Adam(b.parameters(), lr=1e-3, eps=1e-5, foreach=False), b, 20)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    assert all(not torch.equal(p, p0) for p, p0 in zip(a.parameters(), start, strict=True))  # every tensor moved


def test_loading_a_for_loop_checkpoint_keeps_the_fused_kernel_and_the_moments():
    torch.manual_seed(0)
    old = PointerNet(4)
    old_opt = torch.optim.Adam(old.parameters(), lr=1e-3, eps=1e-5)  # what learners built before
    _steps(old_opt, old, 3)
    saved = old_opt.state_dict()
    assert saved["param_groups"][0]["fused"] is None
    learner = PPOLearner(4, 0, PPOConfig(), seed=0)
    learner.net.load_state_dict(old.state_dict())
    load_adam_state(learner.opt, saved)
    assert learner.opt.param_groups[0]["fused"] is True
    first = next(iter(learner.opt.state.values()))
    assert float(first["step"]) == 3.0
    ref = saved["state"][0]["exp_avg"]
    torch.testing.assert_close(learner.opt.state[next(learner.net.parameters())]["exp_avg"], ref)
    _steps(learner.opt, learner.net, 1)  # a fused step on the loaded state runs
    assert float(first["step"]) == 4.0

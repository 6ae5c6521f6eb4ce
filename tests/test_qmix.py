"""QMIX learner (reled_hpc.learn.qmix): groups and next rows, TD targets, epsilon-greedy acting,
replay, checkpoints and learning on a synthetic bandit. Synthetic batches only (no SUMO)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from reled_hpc.errors import ConfigError
from reled_hpc.learn.config import QMIXConfig
from reled_hpc.learn.mixer import QMixer
from reled_hpc.learn.nets import N_CAND, N_SELF
from reled_hpc.learn.qmix import GroupReplay, QMIXLearner, build_groups, td_targets
from reled_hpc.learn.rollout import COLUMNS

A_MAX, G_DIM = 4, 8
OBS_DIM = N_SELF + A_MAX * N_CAND
DIST_AFTER = 4  # column of dist_after in CAND_FEATURES


@pytest.fixture(autouse=True)
def one_thread():
    # tiny networks: intra-op threads only add contention (and keep the learning test deterministic)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make_batch(rows: list[tuple[int, int, int, bool]], seed: int = 0) -> dict[str, np.ndarray]:
    """rows: (episode, agent_id, step, done); other columns random but consistent per (episode, step)."""
    rng = np.random.default_rng(seed)
    n = len(rows)
    b = {k: np.zeros(n, dt) for k, dt in COLUMNS.items()}
    b["episode"][:] = [r[0] for r in rows]
    b["agent_id"][:] = [r[1] for r in rows]
    b["step"][:] = [r[2] for r in rows]
    b["done"][:] = [r[3] for r in rows]
    b["terminal"][:] = b["done"]
    b["obs"] = rng.random((n, OBS_DIM), dtype=np.float32)
    b["action_mask"] = np.ones((n, A_MAX), bool)
    b["reward"] = rng.normal(size=n).astype(np.float32)
    # gstate = (episode, step, 0...) so tests can read which step a state comes from
    b["gstate"] = np.zeros((n, G_DIM), np.float32)
    b["gstate"][:, 0] = b["episode"]
    b["gstate"][:, 1] = b["step"]
    return b


# 2 episodes x 3 agents, steps interleaved, rows deliberately NOT in sorted order
ROWS = [
    (0, 0, 0, False),  # 0
    (0, 1, 0, False),  # 1
    (0, 2, 1, False),  # 2
    (0, 0, 2, False),  # 3
    (0, 1, 3, True),  # 4  agent 1 ends
    (0, 2, 2, False),  # 5
    (0, 0, 5, True),  # 6
    (0, 2, 5, True),  # 7
    (1, 2, 0, False),  # 8
    (1, 0, 0, True),  # 9  agent 0 of episode 1: a single decision
    (1, 1, 1, False),  # 10
    (1, 2, 4, True),  # 11
    (1, 1, 2, True),  # 12
]


def test_groups_and_next_rows():
    gi = build_groups(make_batch(ROWS))
    groups = [gi.order[s : s + n].tolist() for s, n in zip(gi.start, gi.length, strict=True)]
    # (episode, step) groups in order, members by agent_id
    assert groups == [[0, 1], [2], [3, 5], [4], [6, 7], [9, 8], [10], [12], [11]]
    assert gi.next_row.tolist() == [3, 4, 5, 6, -1, 7, -1, -1, 11, -1, 12, -1, -1]
    assert gi.group_of.tolist() == [0, 0, 1, 2, 3, 2, 4, 4, 5, 5, 6, 8, 7]
    # next state: earliest next decision among members. group [0,1] -> rows 3 (step 2) and 4 (step 3): row 3
    # group [3,5] -> rows 6 and 7 (both step 5): step-5 gstate; group [9,8] -> only 8 continues -> row 11
    ns = gi.next_state_row
    assert ns[0] == 3 and ns[1] == 5 and ns[3] == -1 and ns[4] == -1 and ns[5] == 11 and ns[6] == 12
    assert ns[2] in (6, 7)
    b = make_batch(ROWS)
    assert b["gstate"][ns[2], 1] == 5


def test_duplicate_rows_rejected():
    with pytest.raises(ValueError, match="two rows"):
        build_groups(make_batch([(0, 0, 1, False), (0, 0, 1, True)]))


def test_td_target_terminal_and_bootstrap():
    torch.manual_seed(0)
    mixer = QMixer(G_DIM, N_SELF)
    reward = torch.tensor([[1.0, 3.0, 0.0], [2.0, -1.0, 0.0]])
    slot = torch.tensor([[True, True, False], [True, True, False]])
    boot = torch.tensor([[False, False, False], [True, False, False]])  # group 0 all terminal
    next_q = torch.tensor([[9.0, 9.0, 9.0], [4.0, 9.0, 9.0]])
    feats = torch.randn(2, 3, N_SELF)
    state = torch.randn(2, G_DIM)
    y = td_targets(reward, slot, boot, next_q, feats, state, mixer, gamma=0.5)
    assert y[0].item() == pytest.approx(2.0)  # terminal group: mean reward, no bootstrap
    with torch.no_grad():
        q_next = mixer(next_q[1:], feats[1:], boot[1:], state[1:])
    assert y[1].item() == pytest.approx(0.5 + 0.5 * q_next.item(), rel=1e-5)
    # only continuing members enter the target mixer: changing a terminal member's next_q changes nothing
    next_q2 = next_q.clone()
    next_q2[1, 1] = -100.0
    assert td_targets(reward, slot, boot, next_q2, feats, state, mixer, 0.5)[1].item() == pytest.approx(y[1].item())


def test_epsilon_schedule_and_validation():
    cfg = QMIXConfig(eps_start=1.0, eps_end=0.1, eps_decay_iterations=10)
    assert [round(cfg.epsilon(i), 6) for i in (0, 5, 10, 50)] == [1.0, 0.55, 0.1, 0.1]
    assert QMIXConfig(eps_decay_iterations=0, eps_end=0.2).epsilon(0) == 0.2
    learner = QMIXLearner(A_MAX, G_DIM, cfg)
    learner.begin_iteration(5)
    assert learner.epsilon == pytest.approx(0.55)
    QMIXConfig().validate()
    for bad in ({"gamma": 0.0}, {"eps_end": 0.5, "eps_start": 0.2}, {"buffer_decisions": 0}, {"target_update": 0}):
        with pytest.raises(ConfigError):
            QMIXConfig(**bad).validate()


def _random_obs(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    obs = rng.random((n, OBS_DIM), dtype=np.float32)
    k = rng.integers(2, A_MAX + 1, size=n)
    mask = np.arange(A_MAX)[None, :] < k[:, None]
    cand = obs[:, N_SELF:].reshape(n, A_MAX, N_CAND)
    # dist_after: distinct levels (gaps >= 0.05), so the best candidate is never a near-tie
    cand[:, :, DIST_AFTER] = (rng.random((n, A_MAX)).argsort(-1) + 0.8 * rng.random((n, A_MAX))) / A_MAX
    cand[~mask] = 0.0  # padding, as the env does
    obs[:, 3] = k / A_MAX
    return obs, mask


def test_actor_masks_and_uniform_exploration():
    rng = np.random.default_rng(0)
    learner = QMIXLearner(A_MAX, G_DIM, QMIXConfig(eps_start=1.0, eps_end=1.0), seed=3)
    obs, _ = _random_obs(rng, 4000)
    mask = np.zeros((4000, A_MAX), bool)
    mask[:, [1, 3]] = True  # only candidates 1 and 3 valid
    g = np.zeros(G_DIM, np.float32)
    a, logp, value = learner.actor(greedy=True)(obs, mask, g)
    assert mask[np.arange(4000), a].all() and np.allclose(logp, 0.0)
    q, _ = learner.net(torch.from_numpy(obs), torch.from_numpy(mask))
    assert np.allclose(value, q[:, [1, 3]].max(-1).values.detach().numpy(), atol=1e-6)
    a, logp, _ = learner.actor()(obs, mask, g)  # epsilon = 1: uniform over the 2 valid candidates
    assert mask[np.arange(4000), a].all()
    assert abs((a == 1).mean() - 0.5) < 0.03
    assert np.allclose(logp, np.log(0.5))


def test_replay_eviction_keeps_capacity_and_whole_groups():
    rep = GroupReplay(capacity=10, seed=0)
    b = make_batch(ROWS)  # 13 rows > capacity: the newest groups that fit are kept
    rep.add(b)
    assert rep.n_rows <= 10
    rows = [(2, a, s, d) for a, s, d in [(0, 0, False), (1, 0, False), (0, 1, True), (1, 2, True)]]
    for k in range(5):
        rep.add(make_batch([(e + k * 10, a, s, d) for e, a, s, d in rows], seed=k))
        assert 0 < rep.n_rows <= 10
        # every live group is whole and its continuing members' next rows are live
        pos = np.arange(rep.g_head, rep.g_tail) % rep.cap
        assert rep.a["g_start"][pos][0] == rep.row_head
        assert rep.a["g_start"][pos][-1] + rep.a["g_len"][pos][-1] == rep.row_tail
        live = np.arange(rep.row_head, rep.row_tail)
        nxt = rep.a["next"][live % rep.cap][rep.a["boot"][live % rep.cap]]
        assert ((nxt >= rep.row_head) & (nxt < rep.row_tail)).all()
    s = rep.sample(16)
    assert s["obs"].shape[:2] == s["slot"].shape and (s["slot"].sum(1) >= 1).all()
    assert not (s["boot"] & ~s["slot"]).any()


def test_replay_sample_reproduces_transitions():
    b = make_batch(ROWS)
    rep = GroupReplay(capacity=100, seed=0)
    rep.add(b)
    s = rep.sample(64)
    # each sampled member's next obs is the obs of its next row in the batch
    gi = build_groups(b)
    by_obs = {b["obs"][i].tobytes(): i for i in range(len(ROWS))}
    for g in range(64):
        for j in np.flatnonzero(s["slot"][g]):
            r = by_obs[s["obs"][g, j].tobytes()]
            assert s["boot"][g, j] == (gi.next_row[r] >= 0)
            if s["boot"][g, j]:
                assert by_obs[s["next_obs"][g, j].tobytes()] == gi.next_row[r]
            assert s["reward"][g, j] == b["reward"][r]


def bandit_batch(actor, rng: np.random.Generator, episodes: int, agents: int, episode0: int):
    """Each agent makes 3 decisions at random steps; reward 1 for the candidate with least dist_after."""
    rows = []
    for e in range(episodes):
        for a in range(agents):
            steps = np.sort(rng.choice(6, size=3, replace=False))
            rows += [(episode0 + e, a, int(s), i == 2) for i, s in enumerate(steps)]
    b = make_batch(rows, seed=int(rng.integers(1 << 30)))
    obs, mask = _random_obs(rng, len(rows))
    b["obs"], b["action_mask"] = obs, mask
    b["gstate"] = rng.random((len(rows), G_DIM), dtype=np.float32)
    acts, logp, value = actor(obs, mask, b["gstate"][0])
    b["action"] = acts.astype(np.int16)
    b["logp"], b["value"] = logp, value
    b["reward"] = (acts == best_action(obs, mask)).astype(np.float32)
    return b


def best_action(obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
    d = obs[:, N_SELF:].reshape(len(obs), A_MAX, N_CAND)[:, :, DIST_AFTER]
    return np.where(mask, d, np.inf).argmin(-1)


def test_state_dict_round_trip_reproduces_actions():
    rng = np.random.default_rng(1)
    cfg = QMIXConfig(updates_per_iteration=3, batch_groups=8, eps_decay_iterations=4)
    learner = QMIXLearner(A_MAX, G_DIM, cfg, seed=1)
    learner.update(bandit_batch(learner.actor(), rng, 2, 4, 0))
    buf = io.BytesIO()  # through bytes, as a checkpoint does (optimizer state must not be shared)
    torch.save(learner.state_dict(), buf)
    buf.seek(0)
    other = QMIXLearner(A_MAX, G_DIM, cfg, seed=99)
    other.load_state_dict(torch.load(buf, weights_only=False))
    assert other.iteration == learner.iteration == 1 and other.replay.n_rows == learner.replay.n_rows
    obs, mask = _random_obs(rng, 500)
    g = np.zeros(G_DIM, np.float32)
    for x, y in zip(learner.actor()(obs, mask, g), other.actor()(obs, mask, g), strict=True):
        assert np.array_equal(x, y)
    # and the next update (replay sampling, optimizer, targets) continues identically
    nb = bandit_batch(learner.actor(greedy=True), np.random.default_rng(5), 2, 4, 10)
    s1, s2 = learner.update(nb), other.update(nb)
    assert s1["td_loss"] == s2["td_loss"]
    assert np.array_equal(learner.flat_weights(), other.flat_weights())
    # flat weights alone give the rollout side the same greedy policy
    third = QMIXLearner(A_MAX, G_DIM, cfg, seed=7)
    third.load_flat_weights(learner.flat_weights())
    assert np.array_equal(third.actor(greedy=True)(obs, mask, g)[0], learner.actor(greedy=True)(obs, mask, g)[0])


def test_learns_contextual_bandit():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = QMIXConfig(lr=3e-3, gamma=0.5, batch_groups=32, updates_per_iteration=40, target_update=50,
                     eps_start=1.0, eps_end=0.1, eps_decay_iterations=5, buffer_decisions=20_000)  # fmt: skip
    learner = QMIXLearner(A_MAX, G_DIM, cfg, seed=0)
    test_obs, test_mask = _random_obs(np.random.default_rng(123), 2000)
    best = best_action(test_obs, test_mask)
    g = np.zeros(G_DIM, np.float32)

    def accuracy() -> float:
        return float((learner.actor(greedy=True)(test_obs, test_mask, g)[0] == best).mean())

    acc0 = accuracy()
    assert acc0 < 0.6  # roughly chance (1/2 .. 1/4)
    for it in range(10):
        learner.begin_iteration(it)
        stats = learner.update(bandit_batch(learner.actor(), rng, 20, 4, it * 20))
        assert np.isfinite(stats["td_loss"])
    assert learner.grad_steps == 400
    assert accuracy() > 0.9

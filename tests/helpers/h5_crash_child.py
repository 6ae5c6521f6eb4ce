"""Child process of the SIGKILL stress test: writes deterministic iterations, prints each commit.

Usage: h5_crash_child.py PATH N_ITERATIONS [--resume]. Content is a pure function of the
iteration number (see expected_rows), so the parent can check every committed byte.
"""

from __future__ import annotations

import sys

import numpy as np

OBS_DIM, A_MAX = 36, 4


def n_rows(it: int) -> tuple[int, int, int]:
    """(agent, expert, programs) rows of iteration `it`: a few thousand, varying so chunks straddle."""
    return 2000 + (it * 7919) % 3000, 500 + (it * 104729) % 1500, it % 4


def expected_rows(it: int, group: str) -> dict[str, np.ndarray]:
    n = n_rows(it)[0 if group == "agent" else 1]
    rng = np.random.default_rng([it, 0 if group == "agent" else 1])
    idx = np.arange(n)
    return {
        "iteration": np.full(n, it, np.int32),
        "rank": (idx % 8).astype(np.int16),
        "episode": (idx // 500).astype(np.int32),
        "agent_id": (idx % 100).astype(np.int32),
        "t": (idx * 0.5).astype(np.float32),
        "obs": rng.standard_normal((n, OBS_DIM), dtype=np.float32),
        "action": rng.integers(0, A_MAX, n).astype(np.int16),
        "action_mask": rng.random((n, A_MAX)) < 0.7,
        "reward": rng.standard_normal(n, dtype=np.float32),
        "done": (idx % 50) == 49,
        "logp": rng.standard_normal(n, dtype=np.float32),
        "value": rng.standard_normal(n, dtype=np.float32),
        "x": rng.random(n, dtype=np.float32) * 1000,
        "y": rng.random(n, dtype=np.float32) * 1600,
    }


def expected_programs(it: int) -> list[dict]:
    return [
        {
            "iteration": it,
            "cycle": it // 5,
            "subset": j,
            "round": j % 2,
            "text": f"def plan(obs):  # iteration {it} program {j} ünïcode\n    return {j}\n" * (1 + j),
            "executed": j % 3 != 2,
            "error": "" if j % 3 != 2 else f"SyntaxError at line {j}",
            "rvi": 0.1 * j,
            "pdi": 0.2 * j,
            "latency_s": 1.5 + j,
            "prompt_tokens": 100 + j,
            "completion_tokens": 50 + j,
        }
        for j in range(n_rows(it)[2])
    ]


def expected_metrics(it: int) -> dict[str, float]:
    return {"iteration": it, "env_steps": 1000.0 * it, "wall_s": 0.5 * it, "mean_return": -float(it)}


def main() -> None:
    from reled_hpc.io import TrajectoryWriter

    path, n_it = sys.argv[1], int(sys.argv[2])
    resume = "--resume" in sys.argv
    with TrajectoryWriter(path, config_yaml="seed: 1\n", obs_dim=OBS_DIM, a_max=A_MAX, resume=resume) as w:
        for it in range(w.last_iteration + 1, w.last_iteration + 1 + n_it):
            print(f"start {it}", flush=True)
            for group in ("agent", "expert"):
                rows = expected_rows(it, group)
                half = len(rows["iteration"]) // 2  # two appends per group, as a learner gathering ranks would
                w.append_rows(group, {k: v[:half] for k, v in rows.items()})
                w.append_rows(group, {k: v[half:] for k, v in rows.items()})
            w.append_programs(expected_programs(it))
            w.end_iteration(expected_metrics(it))
            print(f"committed {it}", flush=True)


if __name__ == "__main__":
    main()

"""`reled-hpc references SWEEP_DIR`: the reference policies (shortest_path, fastest_path, free_flow,
due, random; docs/references.md) on the very scenarios a sweep's runs face in their last
iterations, written to SWEEP_DIR/references.json for `reled-hpc analyze compare|curves|report`.
`due` runs duaIterate once per scenario (cached on disk; $RELED_HPC_DUE_ITERATIONS steps).

Scenarios depend on the seed, the iteration, the scenario period and the rank, not on the
algorithm, so tasks that differ only in the algorithm share one reference computation.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from ..errors import ReledError
from ..finite import finite_mean
from .records import SWEEP_FILE

log = logging.getLogger("reled_hpc.launch")

REFERENCES_FILE = "references.json"
POLICIES = ("shortest_path", "fastest_path", "free_flow", "due", "random")


def _scenario_key(cfg: Any, ranks: int) -> str:
    env = {k: v for k, v in vars(cfg.env).items()}
    return json.dumps(
        [cfg.seed, env, cfg.dist.total_agents, cfg.iterations, cfg.episodes_per_iteration,
         cfg.hpo.scenario_period, ranks, cfg.eval.every > 0, cfg.eval.episodes], sort_keys=True, default=str,
    )  # fmt: skip


def sweep_references(sweep_dir: Path | str, policies: tuple[str, ...] = POLICIES, last: int = 5) -> dict[str, Any]:
    from ..experiment.config import load_config
    from ..experiment.references import reference_eval, reference_travel_time

    sweep_dir = Path(sweep_dir)
    rec_path = sweep_dir / SWEEP_FILE
    if not rec_path.exists():
        rec_path = sweep_dir / "plan.json"
    if not rec_path.exists():
        raise ReledError(f"{sweep_dir} is not a sweep folder (no {SWEEP_FILE} or plan.json)")
    rec = json.loads(rec_path.read_text())
    ranks = int(rec["spec"]["nodes"]) * int(rec["spec"]["ntasks_per_node"])
    groups: dict[str, Any] = {}
    for t in rec["tasks"]:
        cfg = load_config(sweep_dir / "configs" / f"{t['name']}.yaml")
        groups.setdefault(_scenario_key(cfg, ranks), cfg)
    out: dict[str, Any] = {"_meta": {"last_iterations": last, "scenario_groups": len(groups), "ranks": ranks}}
    t0 = time.perf_counter()
    for p in policies:
        # runs with a held-out evaluation also get the policy's figures on those scenarios (eval_*)
        per = [{**reference_travel_time(cfg, p, last=last, ranks=ranks),
                **(reference_eval(cfg, p, ranks=ranks) if cfg.eval.every else {})}
               for cfg in groups.values()]  # fmt: skip
        keys = sorted({k for m in per for k in m})
        out[p] = {k: finite_mean([m.get(k, float("nan")) for m in per]) for k in keys}  # NaN: e.g. nobody arrived
        log.info("%s: %s (%d scenario groups, %.0f s so far)", p, out[p], len(groups), time.perf_counter() - t0)
    (sweep_dir / REFERENCES_FILE).write_text(json.dumps(out, indent=1))
    return out

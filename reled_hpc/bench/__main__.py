"""`python -m reled_hpc.bench {env,learner,dist,llm,scenario} [options] --json`: print one JSON object per run."""

from __future__ import annotations

import argparse
import json
import math
import sys

from . import dist as dist_bench
from . import env as env_bench
from . import learner as learner_bench
from . import llm as llm_bench
from . import scale as scale_bench
from . import scenario as scenario_bench

BENCHES = {"env": env_bench, "learner": learner_bench, "dist": dist_bench, "llm": llm_bench, "scenario": scenario_bench}
BENCHES["scale"] = scale_bench


def _strict(obj):
    """NaN/inf -> null: the output is strict JSON for any consumer."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_strict(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reled_hpc.bench", description=__doc__)
    sub = parser.add_subparsers(dest="bench", required=True)
    for name, mod in BENCHES.items():
        p = sub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0])
        mod.add_args(p)
        p.add_argument("--json", action="store_true", help="print the result as one JSON object (default: indented)")
    args = parser.parse_args(argv)
    result = _strict(BENCHES[args.bench].run(args))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

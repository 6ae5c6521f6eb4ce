"""`python -m reled_hpc.bench {env,learner,dist} [options] --json`: print one JSON object per run."""

from __future__ import annotations

import argparse
import json
import sys

from . import dist as dist_bench
from . import env as env_bench
from . import learner as learner_bench

BENCHES = {"env": env_bench, "learner": learner_bench, "dist": dist_bench}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reled_hpc.bench", description=__doc__)
    sub = parser.add_subparsers(dest="bench", required=True)
    for name, mod in BENCHES.items():
        p = sub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0])
        mod.add_args(p)
        p.add_argument("--json", action="store_true", help="print the result as one JSON object (default: indented)")
    args = parser.parse_args(argv)
    result = BENCHES[args.bench].run(args)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

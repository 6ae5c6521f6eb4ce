"""Benchmarks: `python -m reled_hpc.bench <name> ... --json` prints one JSON object."""

"""The experiment: what a training run is, in one place.

- `config`: the typed config of a run (every section), loading, `--set` overrides, the agent split;
- `algorithms`: the registry of algorithms (IPPO, MAPPO, QMIX, RELED) and what each reads;
- `seeds`: scenario, sampling and episode numbering as pure functions of the config;
- `metrics`: metric and column names, dump rows, the SED figures of an iteration;
- `run_dir`: the run-folder layout;
- `trainer`: the training loop; `references`: reference policies on a run's own scenarios.
"""

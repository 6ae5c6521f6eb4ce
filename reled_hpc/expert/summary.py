"""What SED did in a run, from its HDF5 dump: the programs/ group (every program of every round) and the
per-iteration metrics (the accepted plans' indices). `reled-hpc demo` prints it at the end."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..finite import finite_max, finite_mean


@dataclass
class CycleRow:
    """One iteration that ran SED cycles (on every rank): its programs and indices."""

    iteration: int
    cycles: int  # (rank, scenario) cycles that logged programs
    generated: int
    executed: int
    rounds: int  # most rounds any subset took
    rvi_round1: float  # max over the subsets (all ranks) of round 1's RVI_k
    rvi_accepted: float  # max over the subsets of the accepted plans' RVI_k (metrics rvi_max)
    pdi_round1: float
    pdi_accepted: float
    external_change: float  # measured change of the other agents' return, RVI's units (metrics)


@dataclass
class SEDSummary:
    programs: int = 0  # rows of programs/ (one per subset and round)
    generated: int = 0  # programs the model answered (a failed request generated none)
    executed: int = 0
    generated_round1: int = 0
    executed_round1: int = 0
    cycles: int = 0  # per rank and scenario
    revisions_changed: int = 0  # revisions whose program differs from the subset's previous round
    revisions_routes_changed: int = -1  # revisions whose routes differ (programs/routes_changed); -1: not logged
    cache_hits: int = 0
    latency_mean_s: float = math.nan  # per answered request
    latency_total_s: float = 0.0
    tokens_mean: float = math.nan  # prompt + completion, per answered request
    rows: list[CycleRow] = field(default_factory=list)

    @property
    def execution_rate(self) -> float:
        return self.executed / self.generated if self.generated else math.nan

    def mean(self, key: str) -> float:
        return finite_mean([getattr(r, key) for r in self.rows])


def summarise_sed(path: str | Path) -> SEDSummary:
    """The SED figures of the dump file at `path`."""
    from ..io import TrajectoryReader

    with TrajectoryReader(path) as r:
        return sed_summary(r.programs(), r.metrics())


def sed_summary(p: dict[str, np.ndarray], m: dict[str, np.ndarray]) -> SEDSummary:
    """The SED figures of a dump's programs/ columns `p` (iteration, rank, cycle, subset, round,
    executed, rvi, pdi, latency_s, prompt/completion tokens; `text` to count changed revisions) and
    its metrics/ columns `m`. A program counts as generated when the model answered it
    (completion_tokens >= 0); the execution rate is executed / generated."""
    out = SEDSummary()
    n = len(p["iteration"])
    out.programs = n
    if not n:
        return out
    answered = p["completion_tokens"] >= 0
    executed = p["executed"].astype(bool)
    first = p["round"] == 1
    out.generated, out.executed = int(answered.sum()), int((executed & answered).sum())
    out.generated_round1 = int((answered & first).sum())
    out.executed_round1 = int((answered & first & executed).sum())
    out.cycles = len(set(zip(p["iteration"].tolist(), p["rank"].tolist(), p["cycle"].tolist(), strict=True)))
    if "text" in p:
        previous: dict[tuple[int, int, int, int], str] = {}
        for j in np.lexsort((p["round"], p["subset"], p["cycle"], p["rank"], p["iteration"])):
            key = (int(p["iteration"][j]), int(p["rank"][j]), int(p["cycle"][j]), int(p["subset"][j]))
            if key in previous and p["round"][j] > 1 and answered[j]:
                out.revisions_changed += int(p["text"][j].strip() != previous[key].strip())
            previous[key] = p["text"][j]
    if "routes_changed" in p:  # a file from before the column reads 0 for every row
        out.revisions_routes_changed = int(((p["round"] > 1) & answered & (p["routes_changed"] != 0)).sum())
    lat = p["latency_s"][answered]
    out.latency_total_s = float(np.nansum(lat))
    out.latency_mean_s = finite_mean(lat)  # NaN without numpy's warning when no answer has a latency
    tok = (p["prompt_tokens"] + p["completion_tokens"])[answered]
    out.tokens_mean = float(tok.mean()) if len(tok) else math.nan
    hits = m.get("llm_cache_hits")
    out.cache_hits = int(np.nansum(hits)) if hits is not None else 0
    row_of = {int(it): j for j, it in enumerate(m["iteration"])}

    def metric(key: str, it: int) -> float:
        return float(m[key][row_of[it]]) if key in m and it in row_of else math.nan

    for it in sorted(set(p["iteration"].tolist())):
        sel = p["iteration"] == it
        r1 = sel & first
        cyc = set(zip(p["rank"][sel].tolist(), p["cycle"][sel].tolist(), strict=True))
        out.rows.append(
            CycleRow(
                iteration=int(it),
                cycles=len(cyc),
                generated=int((sel & answered).sum()),
                executed=int((sel & answered & executed).sum()),
                rounds=int(p["round"][sel].max()),
                rvi_round1=finite_max(p["rvi"][r1]),
                rvi_accepted=metric("rvi_max", it),
                pdi_round1=finite_max(p["pdi"][r1]),
                pdi_accepted=metric("pdi_max", it),
                external_change=metric("external_change_max", it),
            )
        )
    return out


def _f(x: float, fmt: str = ".1f") -> str:
    return format(x, fmt) if math.isfinite(x) else "n/a"


def format_sed_summary(s: SEDSummary, sed: Any = None) -> list[str]:
    """Lines for a terminal. `sed`: the run's SEDConfig (for the thresholds), optional."""
    if not s.programs:
        return ["SED: no programs in the dump (no LLM expert, or every request failed)"]
    rate1 = s.executed_round1 / s.generated_round1 if s.generated_round1 else math.nan
    later_gen, later_ex = s.generated - s.generated_round1, s.executed - s.executed_round1
    lines = [
        f"SED: {s.cycles} refinement cycles, {s.programs} programs ({s.generated} answered, {later_gen} of them "
        "revisions after feedback)",
        f"  execution rate {_f(100 * s.execution_rate, '.0f')}% ({s.executed}/{s.generated}): round 1 "
        f"{_f(100 * rate1, '.0f')}% ({s.executed_round1}/{s.generated_round1}), revisions "
        f"{_f(100 * later_ex / later_gen, '.0f') if later_gen else 'n/a'}% ({later_ex}/{later_gen}); "
        f"{s.revisions_changed} of the {later_gen} revisions changed the program",
    ]
    if s.revisions_routes_changed >= 0:
        lines.append(f"  {s.revisions_routes_changed} of {later_gen} revisions changed the routes")
    thr = f" (tau_R {sed.tau_R:g}, tau_P {sed.tau_P:g})" if sed is not None else ""
    lines.append(f"  indices per cycle iteration, max over subsets, round 1 -> accepted plan{thr}:")
    for r in s.rows:
        lines.append(
            f"    iteration {r.iteration:3d}: RVI {_f(r.rvi_round1):>7s} -> {_f(r.rvi_accepted):>7s}, "
            f"PDI {_f(r.pdi_round1, '.3f')} -> {_f(r.pdi_accepted, '.3f')} nats, "
            f"executed {r.executed}/{r.generated}, {r.rounds} round{'s' if r.rounds > 1 else ''}, "
            f"measured external change {_f(r.external_change, '.4f')}"
        )
    lines.append(
        f"    mean: RVI {_f(s.mean('rvi_round1'))} -> {_f(s.mean('rvi_accepted'))}, "
        f"PDI {_f(s.mean('pdi_round1'), '.3f')} -> {_f(s.mean('pdi_accepted'), '.3f')} nats"
    )
    lines.append(
        f"  LLM: {s.generated} answers, ~{_f(s.tokens_mean, '.0f')} tokens each (prompt + answer); latency "
        f"{_f(s.latency_mean_s)} s per answer on average, waiting in the server's queue included "
        f"(the embedded server answers one request at a time), {_f(s.latency_total_s, '.0f')} s summed"
    )
    if s.cache_hits:
        lines.append(
            f"  {s.cache_hits} of the {s.generated} responses came from the LLM response cache (temperature 0: "
            "the same prompts as an earlier run get its answers back without the model, so this run was faster "
            "and its latencies are lookups; clear $RELED_HPC_CACHE/llm_responses or set llm.cache: false "
            "to ask the model again)"
        )
    else:
        lines.append(
            f"  0 of the {s.generated} responses came from the LLM response cache: every answer is the model's"
        )
    return lines

"""vLLM batching measured on SED-sized requests: one request alone vs all m of a cycle in flight.

SED sends a cycle's m subset requests at once; on a batching server (vLLM) the cycle should cost about
one request's latency (the issue's target: cycle <= 1.3 x single), while llama.cpp serves them one by
one (~m x). `measure_concurrency(client, requests)` is called by `reled_hpc.bench.llm`; standalone:

    python -m reled_hpc.bench.vllm --endpoint runs/llm [--m 2 --m 4]

(an endpoint file or folder from `reled-hpc serve-llm --backend vllm`), which builds m plan prompts
of the grid map's subsets, as SED's first round does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ..llm.client import Completion, LLMClient, Request, shared_prefix


def _tokens_per_s(done: Sequence[Completion], wall_s: float) -> float:
    return round(sum(c.completion_tokens for c in done) / wall_s, 2) if wall_s > 0 else float("nan")


def _salted(r: Request, salt: str | None) -> Request:
    return r if salt is None else replace(r, extra={**(r.extra or {}), "cache_salt": salt})


def measure_concurrency(
    client: LLMClient, requests: Sequence[Request], *, warmup: bool = True, cold: bool = True, prime: bool = False
) -> dict[str, Any]:
    """Latency of `requests[0]` alone, then wall time of all `requests` in flight at once (a SED cycle's
    round); `vllm_concurrency_ratio` = cycle_s / single_s (1.0: perfect batching; m: served one by one).

    The client must not answer from a response cache (every answer must be generated), and must allow
    len(requests) requests in flight. `warmup` first sends one short request, so that neither
    measurement pays the server's first-request costs. `cold` (vLLM's `cache_salt`, one fresh salt for
    the single request and one for the whole cycle): neither finds the other's prompt, nor an earlier
    run's, in vLLM's prefix cache, while the cycle's requests still share their common prefix among
    themselves, as a real cycle's subsets do. `cold=False` for servers without `cache_salt`. `prime`: the
    cycle starts with SED's priming request (sed.prime_prefix: the requests' shared prefix, 1 token), and
    cycle_s includes it."""
    reqs = list(requests)
    if not reqs:
        raise ValueError("measure_concurrency needs at least one request")
    if client.cache is not None:
        raise ValueError("measure_concurrency needs a client without a response cache (answers must be generated)")
    if client.max_concurrency < len(reqs):
        raise ValueError(f"client.max_concurrency={client.max_concurrency} < {len(reqs)} requests: they would queue")
    if warmup:
        client.complete([{"role": "user", "content": "Say OK."}], max_tokens=4)
    salt_single, salt_cycle = (uuid.uuid4().hex, uuid.uuid4().hex) if cold else (None, None)
    r0 = _salted(reqs[0], salt_single)
    t0 = time.perf_counter()
    single = client.complete(r0.messages, temperature=r0.temperature, max_tokens=r0.max_tokens,
                             json_schema=r0.json_schema, extra=r0.extra)  # fmt: skip
    single_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    primer = shared_prefix([r.messages for r in reqs]) if prime else None
    if primer is not None:
        client.complete(primer, max_tokens=1, extra=_salted(Request(primer), salt_cycle).extra)
    prime_s = time.perf_counter() - t0
    cycle: list[Completion] = client.complete_many([_salted(r, salt_cycle) for r in reqs])
    cycle_s = time.perf_counter() - t0
    lat = [c.latency_s for c in cycle]
    return {
        "vllm_concurrency_ratio": round(cycle_s / single_s, 3),
        "m": len(reqs),
        "cold": cold,
        "primed": primer is not None,
        "prime_s": round(prime_s, 3),
        "single_s": round(single_s, 3),
        "cycle_s": round(cycle_s, 3),
        "cycle_latency_mean_s": round(statistics.fmean(lat), 3),
        "cycle_latency_max_s": round(max(lat), 3),
        "single_prompt_tokens": single.prompt_tokens,
        "single_completion_tokens": single.completion_tokens,
        "cycle_prompt_tokens": sum(c.prompt_tokens for c in cycle),
        "cycle_completion_tokens": sum(c.completion_tokens for c in cycle),
        "single_tokens_per_s": _tokens_per_s([single], single_s),
        "cycle_tokens_per_s": _tokens_per_s(cycle, cycle_s),
        "finish_reasons": [c.finish_reason for c in cycle],
        # the same token budget for each request: a ratio compares like with like only when the answers
        # have similar lengths (max_tokens reached, or answers stopping near each other)
        "cycle_over_single_tokens": (
            round(max(c.completion_tokens for c in cycle) / single.completion_tokens, 3)
            if single.completion_tokens
            else None
        ),
    }


def plan_requests(
    m: int,
    *,
    max_tokens: int = 256,
    agents: int = 8,
    map_name: str = "grid",
    seed: int = 0,
    fixed_length: bool = True,
    template_version: str | None = None,
) -> list[Request]:
    """SED's round-1 requests of one cycle: the code-mode plan prompts of `m` subsets of `agents` agents,
    in `template_version`'s layout (default: SED's, `SEDConfig.template_version`).
    `fixed_length`: vLLM's `ignore_eos`, so every answer is max_tokens long and the single request and
    the cycle generate alike (otherwise one subset's early stop skews the ratio)."""
    from ..expert.config import SEDConfig
    from ..expert.llm_expert import agent_rows
    from ..expert.partition import partition_for_cycle
    from ..expert.prompts import SUMMARY_LIMITS, build_plan_messages, summarise_map, summarise_subset
    from ..sim.env import EnvConfig, NavigationEnv

    template_version = template_version or SEDConfig.template_version

    cfg = EnvConfig(map=map_name, n_agents=agents, traffic="light", horizon_s=600.0, seed=seed)
    with NavigationEnv(cfg) as env:
        env.reset(seed=seed)
        graph = env.graph
        rows = agent_rows(env)
        subsets = partition_for_cycle(list(rows), m, 0, seed)
        shared = summarise_map(graph, {}, map_name=env.map.name, n_subsets=len(subsets), n_total=len(rows))
        msgs = []
        for k, sub in enumerate(subsets):
            summary = summarise_subset(graph, [rows[a] for a in sub], {}, map_name=env.map.name, subset=k + 1,
                                       n_subsets=len(subsets), n_total=len(rows),
                                       **SUMMARY_LIMITS.get(template_version, {}))  # fmt: skip
            msgs.append(build_plan_messages(summary, "code", template_version, shared))
    extra = {"ignore_eos": True} if fixed_length else None
    return [Request(mm, 0.0, max_tokens, extra=extra) for mm in msgs]


def main(argv: list[str] | None = None) -> int:
    from ..llm.server import read_endpoint_file

    p = argparse.ArgumentParser(prog="python -m reled_hpc.bench.vllm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--endpoint", required=True, help="endpoint file or run folder of a running vLLM server")
    p.add_argument("--m", type=int, action="append", help="requests in flight (repeatable; default 2 and 4)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--agents", type=int, default=8)
    p.add_argument("--template-version", default=None, help="prompt layout (default: SED's, sed.template_version)")
    args = p.parse_args(argv)
    ep = read_endpoint_file(args.endpoint)
    out = []
    for m in args.m or [2, 4]:
        client = ep.client(max_concurrency=m, timeout_s=600, max_retries=0)
        reqs = plan_requests(m, max_tokens=args.max_tokens, agents=max(args.agents, m),
                             template_version=args.template_version)  # fmt: skip
        # unprimed and primed in turn, each cold: the same load for both
        for prime in (False, True):
            out.append({"backend": ep.backend, "model": ep.model,
                        **measure_concurrency(client, reqs, warmup=not out, prime=prime)})  # fmt: skip
            print(json.dumps(out[-1]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

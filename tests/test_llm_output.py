"""What the LLM answers is capped and made safe before anything keeps it (issue 16): a real local HTTP
server sends oversized and hostile answers (10 MB, lone surrogates, NULs, ANSI escapes) and the client
must return promptly, hold a bounded amount of memory, report the answer's real size and hand out (and
cache) only safe text of at most `max_answer_bytes`."""

from __future__ import annotations

import http.server
import json
import time
import tracemalloc

import pytest
from helpers.local_http import LocalHTTPServer

from reled_hpc.config import ConfigError
from reled_hpc.experiment.config import LLMConfig
from reled_hpc.expert.prompts import build_feedback_messages
from reled_hpc.llm import LLMUnavailable
from reled_hpc.llm.cache import ResponseCache
from reled_hpc.llm.client import DEFAULT_MAX_ANSWER_BYTES, LLMClient
from reled_hpc.text import is_safe, safe_text

MSG = [{"role": "user", "content": "plan"}]
PROGRAM = "```python\ndef plan(api):\n    return {}\n```\n"
HOSTILE = "bad \ud800 lone, \udfff low, NUL \x00, ANSI \x1b[2J\x1b[31m red, bell \x07, DEL \x7f, C1 \x9b, CR \r end"


def body_of(content: str, *, after_content: dict | None = None, ascii_only: bool = True) -> bytes:
    """A chat completion as vLLM lays it out: content first, then finish_reason, then usage."""
    choice = {"index": 0, "message": {"role": "assistant", "content": content}, **(after_content or {})}
    choice["finish_reason"] = "length"
    payload = {"id": "c1", "object": "chat.completion", "choices": [choice]}
    payload["usage"] = {"prompt_tokens": 7, "completion_tokens": 4321}
    # ascii_only: lone surrogates can only travel escaped; False: raw UTF-8 split across read chunks
    return json.dumps(payload, ensure_ascii=ascii_only).encode("utf-8")


class BodyServer(LocalHTTPServer):
    """Answers every POST with `body` (in 64 KiB writes, `delay_s` apart) and counts the bytes it got out."""

    def __init__(self, body: bytes, delay_s: float = 0.0):
        self.body, self.delay_s = body, delay_s
        self.sent = 0
        self.hits = 0
        srv = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                srv.hits += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(srv.body)))
                self.end_headers()
                view = memoryview(srv.body)
                try:
                    for i in range(0, len(view), 65536):
                        self.wfile.write(view[i : i + 65536])
                        srv.sent += len(view[i : i + 65536])
                        if srv.delay_s:
                            time.sleep(srv.delay_s)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client hung up (what these tests provoke)

        super().__init__(Handler)


@pytest.fixture
def serve():
    servers: list[BodyServer] = []

    def make(body: bytes, delay_s: float = 0.0) -> BodyServer:
        servers.append(BodyServer(body, delay_s))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def client(url: str, **kw) -> LLMClient:
    return LLMClient(url, "m", **{"max_retries": 0, "timeout_s": 20, **kw})


def test_ten_megabyte_answer_is_cut_with_bounded_memory_and_time(serve, tmp_path):
    content = PROGRAM + "x" * 10_000_000
    srv = serve(body_of(content))
    c = client(srv.url, cache=ResponseCache(tmp_path))
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        out = c.complete(MSG)
        wall = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the whole body in memory (the code before the cap) peaks above 40 MB: bytes, joined bytes, str
    assert peak < 8 * 1024 * 1024, f"{peak} bytes allocated at the peak for a 10 MB answer"
    assert wall < 10
    raw = out.text.encode("utf-8")
    assert out.cut and len(raw) <= DEFAULT_MAX_ANSWER_BYTES and out.answer_bytes == len(content)
    assert out.text.startswith(PROGRAM) and out.text.endswith(" bytes cut]")
    # the cut marker counts from the answer as sent, not from the part of the body that was read
    cut = int(out.text.rsplit("[... ", 1)[1].split(" ")[0])
    assert cut + len(out.text.split("\n[... ")[0].encode()) == len(content)
    # finish_reason and usage come after the 10 MB: read from the tail, not lost
    assert out.finish_reason == "length" and out.prompt_tokens == 7 and out.completion_tokens == 4321
    # the cache holds the capped text only, and gives back the real size
    (entry,) = list(tmp_path.rglob("*.json"))
    assert entry.stat().st_size < DEFAULT_MAX_ANSWER_BYTES + 2048
    stored = json.loads(entry.read_text(encoding="utf-8"))
    assert stored["text"] == out.text and stored["answer_bytes"] == len(content) and stored["cut"] is True
    again = c.complete(MSG)
    assert again.cached and again.text == out.text and again.answer_bytes == len(content) and again.cut
    assert srv.hits == 1


def test_hostile_characters_are_made_safe_before_the_cache(serve, tmp_path):
    content = PROGRAM + HOSTILE
    srv = serve(body_of(content))
    out = client(srv.url, cache=ResponseCache(tmp_path)).complete(MSG)
    # the code before this wrote the lone surrogate into the cache and raised UnicodeEncodeError
    assert is_safe(out.text) and not out.cut and out.text.startswith(PROGRAM)
    assert "\x00" not in out.text and "\x1b" not in out.text and "\ud800" not in out.text and "\r" not in out.text
    assert out.answer_bytes == len(content.encode("utf-8", "surrogatepass"))
    (entry,) = list(tmp_path.rglob("*.json"))
    text = json.loads(entry.read_bytes().decode("utf-8"))["text"]  # strict UTF-8: raises on a surrogate
    assert text == out.text and is_safe(text)


@pytest.mark.parametrize("cap", [1000, 50_000])
def test_oversized_answer_counts_escapes_and_multibyte_exactly(serve, cap):
    """Over the read bound the answer is decoded piece by piece as it arrives: escapes (\\n, \\", \\\\,
    \\u0001), 2-, 3- and 4-byte characters (raw UTF-8 and as surrogate-pair escapes) and lone surrogates
    cut by the 64 KiB read boundaries must not change the count or the kept text."""
    unit = 'é€😀\n"\\\x01\ud800 a\u00a0' * 3 + "z"
    content = (unit * (600_000 // len(unit)))[:200_000]
    for ascii_only in (True, False):
        if not ascii_only:
            content = content.replace("\ud800", "?")  # raw UTF-8 cannot carry a lone surrogate
        srv = serve(body_of(content, ascii_only=ascii_only))
        c = client(srv.url, max_answer_bytes=cap)
        assert len(srv.body) > c.max_body_bytes  # the path under test: the body is not kept whole
        out = c.complete(MSG)
        assert out.answer_bytes == len(content.encode("utf-8", "surrogatepass"))
        assert out.cut and is_safe(out.text) and len(out.text.encode("utf-8")) <= cap
        head = out.text.split("\n[... ")[0]
        assert head and safe_text(content).startswith(head)
        assert out.finish_reason == "length" and out.completion_tokens == 4321


def test_bulk_after_the_answer_is_not_read(serve):
    """A small answer followed by megabytes of other fields (logprobs): the client stops reading once
    it has the answer and a bounded tail, instead of draining the body."""
    junk = {"logprobs": {"content": [{"token": "x" * 100, "logprob": -1.0}] * 200_000}}
    srv = serve(body_of(PROGRAM, after_content=junk))
    out = client(srv.url).complete(MSG)
    assert out.text == PROGRAM and not out.cut and out.answer_bytes == len(PROGRAM)
    time.sleep(0.2)  # let the server notice the closed connection
    assert srv.sent < len(srv.body) / 2, f"server got {srv.sent} of {len(srv.body)} bytes out"


def test_deadline_still_bounds_a_trickled_huge_answer(serve):
    srv = serve(body_of("x" * 10_000_000), delay_s=0.05)  # 64 KiB per 50 ms: ~8 s for the whole body
    t0 = time.monotonic()
    with pytest.raises(LLMUnavailable, match="timed out"):
        client(srv.url, timeout_s=0.6).complete(MSG)
    assert time.monotonic() - t0 < 3


def test_small_answer_under_the_cap_is_untouched(serve):
    content = PROGRAM + "é" * 100
    srv = serve(body_of(content, ascii_only=False))
    out = client(srv.url).complete(MSG)
    assert out.text == content and not out.cut and out.answer_bytes == len(content.encode("utf-8"))


def test_cap_setting_is_validated():
    assert LLMConfig().max_answer_bytes == DEFAULT_MAX_ANSWER_BYTES
    with pytest.raises(ConfigError, match="max_answer_bytes"):
        LLMConfig(max_answer_bytes=0).validate()
    with pytest.raises(ValueError, match="max_answer_bytes"):
        LLMClient("http://127.0.0.1:1/v1", "m", max_answer_bytes=-1)


def test_feedback_prompt_from_a_hostile_answer_is_safe():
    first = [{"role": "system", "content": "You write plan(api)."}, {"role": "user", "content": "SUBSET SUMMARY"}]
    msgs = build_feedback_messages(
        first, PROGRAM + HOSTILE, {}, {"RVI": 1.0, "PDI": 1.0}, {}, [HOSTILE, "Traceback \x00\x1b[0m"], round_no=2
    )
    assert all(is_safe(m["content"]) for m in msgs)
    assert "\ufffd" in msgs[1]["content"]  # replaced, not silently dropped


def test_cache_never_serves_an_entry_too_large_or_cut_under_a_smaller_cap(serve, tmp_path):
    content = PROGRAM + "y" * 5000
    srv = serve(body_of(content))
    small = client(srv.url, cache=ResponseCache(tmp_path), max_answer_bytes=1000)
    assert small.complete(MSG).cut and srv.hits == 1
    assert small.complete(MSG).cached and srv.hits == 1
    # a larger cap must not get the answer cut under the smaller one: it asks the model again
    big = client(srv.url, cache=ResponseCache(tmp_path))
    out = big.complete(MSG)
    assert not out.cached and not out.cut and out.text == content and srv.hits == 2
    # an entry from before the cap (megabytes) is a miss, not read whole into memory
    (entry,) = list(tmp_path.rglob("*.json"))
    stored = json.loads(entry.read_text(encoding="utf-8"))
    entry.write_text(json.dumps({**stored, "text": "z" * (5 * 1024 * 1024)}), encoding="utf-8")
    assert ResponseCache(tmp_path).get(stored["key"]) is None
    assert not big.complete(MSG).cached and srv.hits == 3

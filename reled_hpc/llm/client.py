"""A small client of the OpenAI-compatible chat-completions API (vLLM, llama_cpp.server, any other).

Plain HTTP with the standard library (urllib), not the `openai` package: training ranks then need no
extra dependency, the request body is exactly what the structured-output adapter built (no SDK
rewriting of fields, which is how `guided_json` traps happen), and there is one retry policy (ours,
tested) instead of the SDK's hidden one. See docs/llm.md.

- `complete(messages, ...)` -> `Completion`; `complete_many([Request, ...])` sends up to
  `max_concurrency` requests at once from threads (vLLM batches concurrent requests; llama.cpp
  queues them) and returns the answers in order.
- Retries with exponential backoff (and jitter, so ranks do not retry in lockstep) on connection
  errors, timeouts, 5xx, 408 and 429; other 4xx fail at once with the server's message.
- When the endpoint stays down: `LLMUnavailable` naming the endpoint, attempts, time and last error;
  `LLMTimeout` (a subclass) when the last attempt ran out of time.
- `timeout_s` is a deadline over one whole attempt (connect, request, every byte of the answer), not a
  socket timeout, which a server sending a byte now and then would reset forever; a watchdog thread
  closes the socket when it passes, and logs while an answer takes long.
- Token/latency totals per client: `stats()`.
- Answers are capped at `max_answer_bytes` (UTF-8) and made safe (`reled_hpc.text.safe_text`) before
  they are parsed, cached or returned; the HTTP body is read into memory only up to a bound derived
  from the cap, the rest of an oversized answer is counted, not kept (`Completion.answer_bytes`, `.cut`).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..text import cut_marker, safe_text
from . import LLMRequestError, LLMUnavailable
from .cache import ResponseCache
from .structured import Messages, StructuredAdapter, StructuredResult, get_adapter, parse_structured

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 429})  # plus every 5xx
WAIT_LOG_S = 30.0  # a line in the log this often while one answer is awaited
DEFAULT_MAX_ANSWER_BYTES = 64 * 1024  # a plan program is <= 20 kB (sandbox.MAX_SOURCE_BYTES)
# JSON may spell each answer byte as up to 6 (\u0001; a 3-byte character as \uXXXX); plus the
# envelope (id, usage, finish_reason, ...). A body over 6 * cap + this is read past, not kept.
BODY_OVERHEAD_BYTES = 64 * 1024
DRAIN_LIMIT_BYTES = 256 * 1024 * 1024  # stop counting an oversized answer here (a lower bound then)


class LLMTimeout(LLMUnavailable):
    """The endpoint did not give a whole answer within `timeout_s` on the last of its attempts."""


@dataclass(frozen=True)
class Request:
    messages: Messages
    temperature: float = 0.0
    max_tokens: int = 512
    json_schema: dict[str, Any] | None = None
    extra: dict[str, Any] | None = None  # further body fields: stop, seed, top_p, ...


def shared_prefix(conversations: Sequence[Messages], min_chars: int = 1000) -> Messages | None:
    """The longest prefix every conversation starts with, as messages (the last one cut where the contents
    part): what a batching server can compute once and share through its prefix cache. None when there
    are fewer than two conversations or the prefix is shorter than `min_chars` characters of content."""
    if len(conversations) < 2:
        return None
    out: Messages = []
    for msgs in zip(*conversations, strict=False):
        first = msgs[0]
        if all(m == first for m in msgs[1:]):
            out.append(dict(first))
            continue
        if all(m.get("role") == first.get("role") for m in msgs[1:]):
            texts = [str(m.get("content", "")) for m in msgs]
            lo, hi = min(texts), max(texts)  # the common prefix of all is that of the sorted extremes
            n = next((i for i, (a, b) in enumerate(zip(lo, hi, strict=False)) if a != b), min(len(lo), len(hi)))
            text = lo[:n]
            if text:
                out.append({"role": first["role"], "content": text})
        break
    return out if sum(len(str(m.get("content", ""))) for m in out) >= min_chars else None


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float  # wall time of this call (a cache hit: the lookup only)
    cached: bool
    finish_reason: str | None = None
    attempts: int = 1  # HTTP attempts made (0 for a cache hit)
    structured: StructuredResult | None = None  # set when a json_schema was given
    answer_bytes: int = -1  # the answer's size in UTF-8 bytes as the server sent it, before the cap
    cut: bool = False  # `text` is the answer cut to max_answer_bytes (it ends with safe_text's marker)

    @property
    def json(self) -> Any:
        return self.structured.value if self.structured else None

    @property
    def valid(self) -> bool:
        """True without a schema; with one, whether the answer parsed and matched it."""
        return self.structured is None or self.structured.valid


@dataclass
class _Stats:
    requests: int = 0
    server_calls: int = 0  # successful HTTP completions
    cache_hits: int = 0
    retries: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0  # summed over server calls
    invalid_structured: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class _Retryable(Exception):
    def __init__(self, message: str, timeout: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout


class LLMClient:
    def __init__(
        self,
        endpoint: str,
        model: str,
        *,
        timeout_s: float = 300.0,
        max_retries: int = 4,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        max_concurrency: int = 8,
        cache: ResponseCache | None = None,
        structured: str | StructuredAdapter = "vllm",
        api_key: str | None = None,
        max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
    ):
        """endpoint: base URL ending in /v1 (e.g. http://gpu01:8000/v1). timeout_s bounds one HTTP
        attempt as a whole (connect, time queued on the server, the entire answer); the retries bound the
        total at (max_retries + 1) * timeout_s plus the backoff sleeps. structured: 'vllm', 'llama_cpp'/'embedded',
        'none' or an adapter. The api key defaults to $OPENAI_API_KEY (vLLM --api-key); none is sent
        otherwise. max_answer_bytes caps every answer's text (UTF-8 bytes, safe_text's cut marker
        included) and bounds the HTTP body kept in memory (6 * cap + BODY_OVERHEAD_BYTES)."""
        if max_answer_bytes <= 0:
            raise ValueError(f"max_answer_bytes must be > 0, got {max_answer_bytes}")
        self.endpoint = endpoint.rstrip("/")
        self.model = model
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_concurrency = max(1, max_concurrency)
        self.cache = cache
        self.adapter = get_adapter(structured)
        self._api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.max_answer_bytes = int(max_answer_bytes)
        self.max_body_bytes = 6 * self.max_answer_bytes + BODY_OVERHEAD_BYTES
        self._gate = threading.BoundedSemaphore(self.max_concurrency)
        self._stats = _Stats()

    def __repr__(self) -> str:
        return f"LLMClient({self.endpoint!r}, model={self.model!r}, structured={self.adapter.name!r})"

    @property
    def batches(self) -> bool:
        """The server computes concurrent requests together (vLLM); llama.cpp's serves them one by one."""
        return self.adapter.name == "vllm"

    # ---- public API ----------------------------------------------------------------------------
    def complete(
        self,
        messages: Messages,
        *,
        temperature: float = 0.0,
        max_tokens: int = 512,
        json_schema: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Completion:
        t0 = time.perf_counter()
        with self._stats.lock:
            self._stats.requests += 1
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": temperature,
            "max_tokens": max_tokens,
            **(extra or {}),
        }
        if json_schema is not None:
            body = self.adapter.apply(body, json_schema)
        self.adapter.check(body)

        key = None
        if self.cache is not None and ResponseCache.cacheable(temperature):
            params = {k: v for k, v in body.items() if k not in ("model", "messages")}
            key = ResponseCache.key(
                model=self.model,
                messages=body["messages"],
                params=params,
                schema=json_schema,
                backend=self.adapter.name,
            )
            hit = self._cached(key)
            if hit is not None:
                with self._stats.lock:
                    self._stats.cache_hits += 1
                text, cut, size = self._cap(hit["text"])
                return self._finish(
                    Completion(
                        text=text,
                        prompt_tokens=int(hit.get("prompt_tokens", 0)),
                        completion_tokens=int(hit.get("completion_tokens", 0)),
                        latency_s=time.perf_counter() - t0,
                        cached=True,
                        finish_reason=hit.get("finish_reason"),
                        attempts=0,
                        answer_bytes=_int(hit.get("answer_bytes"), size),
                        cut=cut or bool(hit.get("cut")),
                    ),
                    json_schema,
                )

        data, attempts, oversized = self._post_with_retries("/chat/completions", body)
        latency = time.perf_counter() - t0
        try:
            choice = data["choices"][0]
            text, cut, size = self._cap(choice["message"].get("content") or "", oversized)
            usage = data.get("usage") or {}
            comp = Completion(
                text=text,
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
                latency_s=latency,
                cached=False,
                finish_reason=choice.get("finish_reason"),
                attempts=attempts,
                answer_bytes=size,
                cut=cut,
            )
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise LLMRequestError(
                f"{self.endpoint}/chat/completions answered something that is not a chat completion "
                f"({type(exc).__name__}: {exc}): {json.dumps(data)[:300]}"
            ) from None
        if comp.cut:
            # info: SED's console line per cycle says what failed; programs/answer_bytes keeps the size
            log.info("LLM %s: answer of %d bytes cut to max_answer_bytes=%d", self.endpoint, comp.answer_bytes,
                        self.max_answer_bytes)  # fmt: skip
        with self._stats.lock:
            s = self._stats
            s.server_calls += 1
            s.prompt_tokens += comp.prompt_tokens
            s.completion_tokens += comp.completion_tokens
            s.latency_s += latency
        if key is not None and self.cache is not None:
            self.cache.put(
                key,
                {
                    "text": comp.text,  # capped and safe: the cache never holds more than the cap
                    "prompt_tokens": comp.prompt_tokens,
                    "completion_tokens": comp.completion_tokens,
                    "finish_reason": comp.finish_reason,
                    "latency_s": latency,
                    "model": self.model,
                    "answer_bytes": comp.answer_bytes,
                    "cut": comp.cut,
                    "max_answer_bytes": self.max_answer_bytes,
                },
            )
        return self._finish(comp, json_schema)

    def complete_many(
        self, requests: Sequence[Request | dict[str, Any]], *, return_exceptions: bool = False
    ) -> list[Any]:
        """Answers in request order, up to max_concurrency in flight. A failure raises (after every
        request finished) unless return_exceptions, which puts the exception in its slot instead."""
        reqs = [r if isinstance(r, Request) else Request(**r) for r in requests]
        if not reqs:
            return []

        def one(r: Request) -> Completion:
            return self.complete(
                r.messages, temperature=r.temperature, max_tokens=r.max_tokens, json_schema=r.json_schema, extra=r.extra
            )

        with ThreadPoolExecutor(max_workers=min(len(reqs), self.max_concurrency), thread_name_prefix="llm") as pool:
            futures = [pool.submit(one, r) for r in reqs]
            results: list[Any] = []
            for f in futures:
                exc = f.exception()
                results.append(exc if exc is not None else f.result())
        if not return_exceptions:
            for r in results:
                if isinstance(r, BaseException):
                    raise r
        return results

    def models(self) -> list[str]:
        """Model ids the server serves (GET /v1/models); a cheap liveness probe."""
        data, _, _ = self._request_with_retries("GET", "/models", None)
        return [m.get("id", "") for m in data.get("data", [])]

    def stats(self) -> dict[str, Any]:
        with self._stats.lock:
            s = self._stats
            out = {
                k: getattr(s, k)
                for k in (
                    "requests",
                    "server_calls",
                    "cache_hits",
                    "retries",
                    "failures",
                    "prompt_tokens",
                    "completion_tokens",
                    "invalid_structured",
                )
            }
            out["latency_s"] = round(s.latency_s, 4)
            out["completion_tokens_per_s"] = round(s.completion_tokens / s.latency_s, 2) if s.latency_s else 0.0
        return out

    # ---- internals -----------------------------------------------------------------------------
    def _cap(self, text: Any, size: int | None = None) -> tuple[str, bool, int]:
        """(safe text of at most max_answer_bytes, whether it was cut, the original size in bytes). size:
        the answer's real size when `text` is only its start (an oversized body)."""
        if not isinstance(text, str):
            text = "" if text is None else str(text)
        have = _utf8_size(text)
        size = have if size is None else size
        safe = safe_text(text)  # a replaced control character grows from 1 to 3 bytes: cap what is stored
        raw = safe.encode("utf-8")
        if len(raw) <= self.max_answer_bytes and size == have:
            return safe, False, size
        room = self.max_answer_bytes - len(cut_marker(size).encode("utf-8"))
        if room < 0:  # a cap too small for the marker
            return safe_text(safe, self.max_answer_bytes), True, size
        kept = raw[:room].decode("utf-8", "ignore")  # "ignore": drop a character split by the cut
        # the marker counts from the answer as sent, not from the part of it that was read
        return kept + cut_marker(max(0, size - len(kept.encode("utf-8")))), True, size

    def _cached(self, key: str) -> dict[str, Any] | None:
        """The cache entry, unless it was cut under a smaller cap than this client's (then ask again)."""
        assert self.cache is not None
        hit = self.cache.get(key)
        if hit is not None and hit.get("cut") and _int(hit.get("max_answer_bytes"), 0) < self.max_answer_bytes:
            return None
        return hit

    def _finish(self, comp: Completion, schema: dict[str, Any] | None) -> Completion:
        if schema is not None:
            comp.structured = parse_structured(comp.text, schema)
            if not comp.structured.valid:
                with self._stats.lock:
                    self._stats.invalid_structured += 1
        return comp

    def _post_with_retries(self, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], int, int | None]:
        return self._request_with_retries("POST", path, body)

    def _request_with_retries(
        self, method: str, path: str, body: dict[str, Any] | None
    ) -> tuple[dict[str, Any], int, int | None]:
        """(answer, attempts, answer bytes of an oversized answer that was cut while read, else None)."""
        url = self.endpoint + path
        t0 = time.monotonic()
        last, timed_out = "", False
        for attempt in range(self.max_retries + 1):
            if attempt:
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                log.warning("LLM %s: %s; retry %d/%d in %.2f s", url, last, attempt, self.max_retries, delay)
                with self._stats.lock:
                    self._stats.retries += 1
                time.sleep(delay)
            try:
                with self._gate:
                    data, oversized = self._request_once(method, url, body)
                    return data, attempt + 1, oversized
            except _Retryable as exc:
                last, timed_out = str(exc), exc.timeout
        with self._stats.lock:
            self._stats.failures += 1
        raise (LLMTimeout if timed_out else LLMUnavailable)(
            f"LLM endpoint {self.endpoint} unavailable: {self.max_retries + 1} attempts over "
            f"{time.monotonic() - t0:.1f} s failed; last error: {last}. Is the server running "
            "(reled-hpc serve-llm, or the vLLM job) and is the endpoint file current?"
        )

    def _request_once(self, method: str, url: str, body: dict[str, Any] | None) -> tuple[dict[str, Any], int | None]:
        """One HTTP attempt under a deadline of timeout_s over all of it. http.client directly (never a
        proxy: cluster and loopback endpoints must not go through an http_proxy from the environment), so
        the watchdog can reach the socket; urllib hides it until the headers are in. At most
        max_body_bytes of the body are kept: past that, an _OversizedAnswer keeps the answer's first
        max_answer_bytes and counts the rest; the second value is then that count, else None."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        data = json.dumps(body).encode() if body is not None else None
        parts = urllib.parse.urlsplit(url)
        conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = conn_cls(parts.hostname or "", parts.port, timeout=self.timeout_s)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        done, expired = threading.Event(), threading.Event()
        t0 = time.monotonic()
        deadline = t0 + self.timeout_s

        def watch() -> None:
            while not done.wait(max(0.0, min(WAIT_LOG_S, deadline - time.monotonic()))):
                if time.monotonic() < deadline:
                    log.info("waiting for the LLM at %s: %.0f s (deadline %g s)", url, time.monotonic() - t0,
                             self.timeout_s)  # fmt: skip
                    continue
                expired.set()
                while not done.is_set():  # again until the attempt ends: the socket may not exist yet
                    _shut(conn)
                    done.wait(0.05)

        threading.Thread(target=watch, name="llm-deadline", daemon=True).start()
        try:
            conn.request(method, target, body=data, headers=headers)
            resp = conn.getresponse()
            kept = bytearray()
            big: _OversizedAnswer | None = None
            while chunk := resp.read1(65536):  # returns per arrival, so a trickle meets the deadline check
                if big is not None:
                    big.feed(chunk)
                else:
                    kept += chunk
                    if len(kept) > self.max_body_bytes:  # from here on keep only what the cap allows
                        big = _OversizedAnswer(self.max_answer_bytes)
                        big.feed(bytes(kept))
                        kept = bytearray()
                if time.monotonic() > deadline:
                    raise TimeoutError
                if big is not None and big.done:  # the rest is not needed: do not read it
                    break
            raw, status, reason = bytes(kept) if big is None else big.head, resp.status, resp.reason
            if expired.is_set():  # the watchdog's shutdown reads as an end of file
                raise TimeoutError
            if resp.length and big is None:  # the server closed before the Content-Length it announced
                raise http.client.IncompleteRead(raw, resp.length)
        except (TimeoutError, ConnectionError, http.client.HTTPException, OSError) as exc:
            if expired.is_set() or time.monotonic() >= deadline:
                raise _Retryable(
                    f"timed out: no whole answer within the {self.timeout_s:g} s deadline (connect and entire "
                    "response)",
                    timeout=True,
                ) from None
            raise _Retryable(f"{type(exc).__name__}: {exc or 'timed out'}") from None
        finally:
            done.set()
            conn.close()
        if status >= 400:
            detail = _error_detail(raw, reason)
            if status >= 500 or status in RETRY_STATUS:
                raise _Retryable(f"HTTP {status}: {detail}")
            with self._stats.lock:
                self._stats.failures += 1
            raise LLMRequestError(
                f"{url} rejected the request with HTTP {status} (not retried): {detail}", status=status
            )
        if big is not None:
            if big.read >= DRAIN_LIMIT_BYTES:
                log.warning("LLM %s: answer body over %d bytes: stopped reading it", url, DRAIN_LIMIT_BYTES)
            return big.result(url), big.answer_bytes
        try:
            out = json.loads(raw)
        except ValueError:
            raise LLMRequestError(f"{url} answered non-JSON: {raw[:200]!r}") from None
        if not isinstance(out, dict):
            raise LLMRequestError(f"{url} answered JSON that is not an object: {raw[:200]!r}")
        return out, None


# ---- an answer too large to keep ---------------------------------------------------------------------
_CONTENT = re.compile(rb'"message"\s*:\s*\{.*?"content"\s*:\s*"', re.DOTALL)
_STRING_BODY = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*', re.DOTALL)  # a JSON string's inside, up to its quote
_HIGH_SURROGATE_END = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}\Z")
_FINISH = re.compile(rb'"finish_reason"\s*:\s*"([A-Za-z_]{1,40})"')
_TOKENS = re.compile(rb'"(prompt_tokens|completion_tokens)"\s*:\s*(\d{1,12})')
_LENIENT = json.JSONDecoder(strict=False)  # raw control characters inside strings: keep, safe_text replaces them
SEARCH_BYTES = 64 * 1024  # the message content must start within this much of the body
TAIL_BYTES = 64 * 1024  # kept after the content string, for finish_reason and usage


class _OversizedAnswer:
    """Reads a chat-completion body larger than the client keeps, in the order it arrives: keeps the
    first `keep_bytes` of choices[0].message.content (decoded from its JSON string), counts the
    answer's full size without keeping it, and keeps TAIL_BYTES after the string for finish_reason and
    usage (`done` then: nothing further is needed). Memory: about the client's max_body_bytes (the
    first piece it is fed) whatever the body's size."""

    def __init__(self, keep_bytes: int) -> None:
        self.keep_bytes = keep_bytes
        self.head = b""  # the body's start (SEARCH_BYTES), for error details
        self.read = 0  # body bytes seen
        self.answer_bytes = 0  # decoded answer bytes counted so far
        self._phase = "before"  # before the content string, "in" it, "after" it, or "lost" (never found)
        self._pending = b""  # bytes not yet decodable (an escape or UTF-8 character cut by a chunk boundary)
        self._kept: list[str] = []
        self._kept_bytes = 0
        self._tail = b""

    @property
    def done(self) -> bool:
        if self._phase == "lost":  # no answer to count: the request fails with what was read
            return True
        return (self._phase == "after" and len(self._tail) >= TAIL_BYTES) or self.read >= DRAIN_LIMIT_BYTES

    def feed(self, chunk: bytes) -> None:
        self.read += len(chunk)
        if len(self.head) < SEARCH_BYTES:
            self.head += chunk[: SEARCH_BYTES - len(self.head)]
        buf = self._pending + chunk
        self._pending = b""
        if self._phase == "before":
            m = _CONTENT.search(buf, 0, SEARCH_BYTES)
            if m is None:
                if len(buf) < SEARCH_BYTES:
                    self._pending = buf
                else:
                    self._phase = "lost"
                return
            self._phase, buf = "in", buf[m.end() :]
        if self._phase == "in":
            end = _STRING_BODY.match(buf).end()
            if end < len(buf) and buf[end : end + 1] == b'"':  # the string closes in this chunk
                self._take(buf[:end])
                self._phase, buf = "after", buf[end + 1 :]
            else:
                ok = _decodable(buf)
                self._take(buf[:ok])
                self._pending = buf[ok:]
                return
        if self._phase == "after":
            self._tail += buf[: max(0, TAIL_BYTES - len(self._tail))]

    def _take(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace")
        try:
            text = _LENIENT.decode('"' + text + '"')
        except ValueError:  # not a valid string body (a bad escape): count and keep it as it came
            pass
        self.answer_bytes += _utf8_size(text)
        if self._kept_bytes <= self.keep_bytes:  # one piece past the cap, so safe_text cuts and marks it
            self._kept.append(text)
            self._kept_bytes += _utf8_size(text)

    def result(self, url: str) -> dict[str, Any]:
        """The chat completion as far as it can be told: the content kept, finish_reason and usage when
        they came within the tail."""
        if self._phase in ("before", "lost"):
            raise LLMRequestError(
                f"{url} answered {self.read} bytes with no message content in its first {SEARCH_BYTES} bytes: "
                f"{self.head[:200]!r}"
            )
        if self._phase == "in" and self._pending:  # the body ended inside the string: take what is left
            self._take(self._pending)
        tokens = {k.decode(): int(v) for k, v in _TOKENS.findall(self._tail)}
        finish = _FINISH.search(self._tail)
        return {
            "choices": [
                {
                    "message": {"content": "".join(self._kept)},
                    "finish_reason": finish.group(1).decode() if finish else None,
                }
            ],
            "usage": tokens,
        }


def _decodable(buf: bytes) -> int:
    """How much of `buf` (the inside of a JSON string, not closed in it) decodes on its own: not a
    trailing escape cut short, not half a surrogate pair, not a cut UTF-8 character."""
    n = len(buf)
    i = buf.rfind(b"\\", max(0, n - 12))
    if i >= 0:
        j = i
        while j > 0 and buf[j - 1] == 0x5C:
            j -= 1
        if (i - j) % 2 == 0:  # buf[i] starts an escape (the backslashes before it pair up)
            esc = buf[i:]
            if len(esc) < 2 or (esc[1:2] == b"u" and len(esc) < 6):
                n = i
    if _HIGH_SURROGATE_END.search(buf, 0, n):  # wait for the low half: a pair is one 4-byte character
        n -= 6
    for back in range(1, min(4, n) + 1):  # a UTF-8 lead byte whose sequence is not complete yet
        c = buf[n - back]
        if c & 0xC0 == 0x80:
            continue
        need = 2 if c & 0xE0 == 0xC0 else 3 if c & 0xF0 == 0xE0 else 4 if c & 0xF8 == 0xF0 else 1
        if need > back:
            n -= back
        break
    return n


def _utf8_size(text: str) -> int:
    """UTF-8 bytes of `text`; a lone surrogate counts as the 3 bytes it takes when escaped."""
    return len(text.encode("utf-8", "surrogatepass"))


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _shut(conn: http.client.HTTPConnection) -> None:
    """Wake whatever thread waits on the connection's socket (shutdown, unlike close, interrupts a recv)."""
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _error_detail(raw: bytes, reason: str) -> str:
    """The server's own message (OpenAI error JSON, FastAPI detail) rather than just the status."""
    text = raw.decode("utf-8", "replace")
    try:
        data = json.loads(text)
        if isinstance(data, dict):
            err = data.get("error", data.get("detail", data))
            if isinstance(err, dict):
                err = err.get("message", err)
            return safe_text(str(err), 500)  # it reaches logs and exception messages
    except ValueError:
        pass
    return safe_text(text, 500) or reason

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
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import socket
import threading
import time
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from . import LLMRequestError, LLMUnavailable
from .cache import ResponseCache
from .structured import Messages, StructuredAdapter, StructuredResult, get_adapter, parse_structured

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 429})  # plus every 5xx
WAIT_LOG_S = 30.0  # a line in the log this often while one answer is awaited


class LLMTimeout(LLMUnavailable):
    """The endpoint did not give a whole answer within `timeout_s` on the last of its attempts."""


@dataclass(frozen=True)
class Request:
    messages: Messages
    temperature: float = 0.0
    max_tokens: int = 512
    json_schema: dict[str, Any] | None = None
    extra: dict[str, Any] | None = None  # further body fields: stop, seed, top_p, ...


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
    ):
        """endpoint: base URL ending in /v1 (e.g. http://gpu01:8000/v1). timeout_s bounds one HTTP
        attempt as a whole (connect, time queued on the server, the entire answer); the retries bound the
        total at (max_retries + 1) * timeout_s plus the backoff sleeps. structured: 'vllm', 'llama_cpp'/'embedded',
        'none' or an adapter. The api key defaults to $OPENAI_API_KEY (vLLM --api-key); none is sent
        otherwise."""
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
        self._gate = threading.BoundedSemaphore(self.max_concurrency)
        self._stats = _Stats()

    def __repr__(self) -> str:
        return f"LLMClient({self.endpoint!r}, model={self.model!r}, structured={self.adapter.name!r})"

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
            hit = self.cache.get(key)
            if hit is not None:
                with self._stats.lock:
                    self._stats.cache_hits += 1
                return self._finish(
                    Completion(
                        text=hit["text"],
                        prompt_tokens=int(hit.get("prompt_tokens", 0)),
                        completion_tokens=int(hit.get("completion_tokens", 0)),
                        latency_s=time.perf_counter() - t0,
                        cached=True,
                        finish_reason=hit.get("finish_reason"),
                        attempts=0,
                    ),
                    json_schema,
                )

        data, attempts = self._post_with_retries("/chat/completions", body)
        latency = time.perf_counter() - t0
        try:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
            usage = data.get("usage") or {}
            comp = Completion(
                text=text,
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
                latency_s=latency,
                cached=False,
                finish_reason=choice.get("finish_reason"),
                attempts=attempts,
            )
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise LLMRequestError(
                f"{self.endpoint}/chat/completions answered something that is not a chat completion "
                f"({type(exc).__name__}: {exc}): {json.dumps(data)[:300]}"
            ) from None
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
                    "text": comp.text,
                    "prompt_tokens": comp.prompt_tokens,
                    "completion_tokens": comp.completion_tokens,
                    "finish_reason": comp.finish_reason,
                    "latency_s": latency,
                    "model": self.model,
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
        data, _ = self._request_with_retries("GET", "/models", None)
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
    def _finish(self, comp: Completion, schema: dict[str, Any] | None) -> Completion:
        if schema is not None:
            comp.structured = parse_structured(comp.text, schema)
            if not comp.structured.valid:
                with self._stats.lock:
                    self._stats.invalid_structured += 1
        return comp

    def _post_with_retries(self, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], int]:
        return self._request_with_retries("POST", path, body)

    def _request_with_retries(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[dict[str, Any], int]:
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
                    return self._request_once(method, url, body), attempt + 1
            except _Retryable as exc:
                last, timed_out = str(exc), exc.timeout
        with self._stats.lock:
            self._stats.failures += 1
        raise (LLMTimeout if timed_out else LLMUnavailable)(
            f"LLM endpoint {self.endpoint} unavailable: {self.max_retries + 1} attempts over "
            f"{time.monotonic() - t0:.1f} s failed; last error: {last}. Is the server running "
            "(reled-hpc serve-llm, or the vLLM job) and is the endpoint file current?"
        )

    def _request_once(self, method: str, url: str, body: dict[str, Any] | None) -> dict[str, Any]:
        """One HTTP attempt under a deadline of timeout_s over all of it. http.client directly (never a
        proxy: cluster and loopback endpoints must not go through an http_proxy from the environment), so
        the watchdog can reach the socket; urllib hides it until the headers are in."""
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
            chunks = []
            while chunk := resp.read1(65536):  # returns per arrival, so a trickle meets the deadline check
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise TimeoutError
            raw, status, reason = b"".join(chunks), resp.status, resp.reason
            if expired.is_set():  # the watchdog's shutdown reads as an end of file
                raise TimeoutError
            if resp.length:  # the server closed before the Content-Length it announced (read() raises this too)
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
        try:
            out = json.loads(raw)
        except ValueError:
            raise LLMRequestError(f"{url} answered non-JSON: {raw[:200]!r}") from None
        if not isinstance(out, dict):
            raise LLMRequestError(f"{url} answered JSON that is not an object: {raw[:200]!r}")
        return out


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
            return str(err)[:500]
    except ValueError:
        pass
    return text[:500] or reason

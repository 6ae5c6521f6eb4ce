"""LLM access for SED: an OpenAI-compatible client, structured output, a response cache, the embedded
model registry and the servers (llama.cpp on CPU, vLLM on GPU nodes). See docs/llm.md.

Errors live here (not in a submodule) so every submodule can import them without cycles; the public
classes are imported lazily so `python -m reled_hpc.llm.models` stays cheap.
"""

from __future__ import annotations

from typing import Any

from ..errors import ReledError


class LLMError(ReledError):
    """Base of every error of the LLM layer."""


class LLMUnavailable(LLMError):
    """The endpoint did not answer (connection refused, timeouts, 5xx) after all retries."""


class LLMRequestError(LLMError):
    """The server rejected the request (4xx) or answered something that is not a chat completion."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class ModelError(LLMError):
    """An embedded model is missing, incomplete or fails its SHA-256 check."""


class ServerError(LLMError):
    """An LLM server could not be started, did not become ready, or is not installed."""


_LAZY = {
    "LLMClient": "client",
    "Completion": "client",
    "Request": "client",
    "ResponseCache": "cache",
    "get_adapter": "structured",
    "validate_json": "structured",
    "resolve_model": "models",
    "MODELS": "models",
    "DEFAULT_MODEL": "models",
    "EmbeddedServer": "server",
    "Endpoint": "server",
    "wait_for_endpoint": "server",
}

__all__ = ["LLMError", "LLMRequestError", "LLMUnavailable", "ModelError", "ServerError", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

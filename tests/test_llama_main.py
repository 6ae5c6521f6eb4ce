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

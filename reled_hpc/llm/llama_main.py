"""`python -m reled_hpc.llm.llama_main ARGS`: llama_cpp.server (the embedded backend) with a RAM prompt
cache whose size limit counts what it holds.

llama-cpp-python 0.3's `LlamaRAMCache` counts only the llama.cpp state of each stored prompt (KV cache,
~30 kB per token for Qwen2.5-0.5B), not the numpy copy of the logits stored beside it (`LlamaState.scores`:
n_batch x vocab float32, 311 MB for Qwen2.5's 151,936 tokens). A 2 GiB cache so held ~30 states and
grew the server to 16.8 GB RSS in a 100-agent SED run. Counting every array keeps it at its limit.
Those logits are never read when the model keeps no logits (`--logits_all false`, as we run it), so the
states saved here leave them out (`patch_state_logits`): each cached state is then its KV cache alone, and
a request no longer pays ~0.8 s to copy them (measured: the same answers, 0.8 -> 0.02 s per save).
"""

from __future__ import annotations

import ctypes
from typing import Any


def held_bytes(cache: Any) -> int:
    """Bytes a LlamaRAMCache holds: each state's llama.cpp data plus its logits and token arrays."""
    return sum(int(s.llama_state_size) + int(s.scores.nbytes) + int(s.input_ids.nbytes)
               for s in cache.cache_state.values())  # fmt: skip


def patch_ram_cache() -> None:
    """Make LlamaRAMCache's eviction (`while cache_size > capacity_bytes`) use `held_bytes`."""
    from llama_cpp.llama_cache import LlamaRAMCache

    LlamaRAMCache.cache_size = property(held_bytes)  # type: ignore[assignment, method-assign]


def patch_state_logits() -> None:
    """Make `Llama.save_state` / `load_state` skip the logits when the model keeps none (logits_all off,
    as the server runs): llama-cpp-python then never writes or reads `Llama.scores` (sampling is in
    llama.cpp's sampler), yet save_state copies all n_batch x vocab floats of it into each cached state
    and load_state copies them back and scans them (311 MB for Qwen2.5, ~0.5 s per SED request on 2 cores).
    States saved here hold a (0, vocab) logits array; a state with logits (logits_all on) goes through the
    library's own methods. Written against llama-cpp-python 0.3's save_state/load_state (the pinned build)."""
    import llama_cpp
    import numpy as np
    from llama_cpp.llama import Llama, LlamaState

    if getattr(Llama.save_state, "_reled_no_logits", False):
        return
    save, load = Llama.save_state, Llama.load_state

    def save_state(self: Any) -> LlamaState:
        if self._logits_all:
            return save(self)
        ctx = self._ctx.ctx
        size = int(llama_cpp.llama_state_get_size(ctx))
        buf = (ctypes.c_uint8 * size)()
        n = int(llama_cpp.llama_state_get_data(ctx, buf, size))
        if n > size:
            raise RuntimeError("Failed to copy llama state data")
        return LlamaState(
            input_ids=self.input_ids.copy(),
            scores=np.empty((0, self._n_vocab), np.single),
            n_tokens=self.n_tokens,
            llama_state=ctypes.string_at(buf, n),
            llama_state_size=n,
            seed=self._seed,
        )

    def load_state(self: Any, state: LlamaState) -> None:
        if self._logits_all or len(state.scores):
            return load(self, state)
        self.input_ids = state.input_ids.copy()
        self.n_tokens = state.n_tokens
        self._requires_eval = True
        self._seed = state.seed
        buf = (ctypes.c_uint8 * state.llama_state_size).from_buffer_copy(state.llama_state)
        if llama_cpp.llama_state_set_data(self._ctx.ctx, buf, state.llama_state_size) != state.llama_state_size:
            raise RuntimeError("Failed to set llama state data")

    save_state._reled_no_logits = True  # type: ignore[attr-defined]
    Llama.save_state, Llama.load_state = save_state, load_state  # type: ignore[method-assign]


def main() -> None:
    patch_ram_cache()
    patch_state_logits()
    from llama_cpp.server.__main__ import main as server_main

    server_main()


if __name__ == "__main__":
    main()

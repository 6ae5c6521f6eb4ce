"""`python -m reled_hpc.llm.llama_main ARGS`: llama_cpp.server (the embedded backend) with a RAM prompt
cache whose size limit counts what it holds.

llama-cpp-python 0.3's `LlamaRAMCache` counts only the llama.cpp state of each stored prompt (KV cache,
~30 kB per token for Qwen2.5-0.5B), not the numpy copy of the logits stored beside it (`LlamaState.scores`:
n_batch x vocab float32, 311 MB for Qwen2.5's 151,936 tokens). A 2 GiB cache so held ~30 states and
grew the server to 16.8 GB RSS in a 100-agent SED run. Counting every array keeps it at its limit.
"""

from __future__ import annotations

from typing import Any


def held_bytes(cache: Any) -> int:
    """Bytes a LlamaRAMCache holds: each state's llama.cpp data plus its logits and token arrays."""
    return sum(int(s.llama_state_size) + int(s.scores.nbytes) + int(s.input_ids.nbytes)
               for s in cache.cache_state.values())  # fmt: skip


def patch_ram_cache() -> None:
    """Make LlamaRAMCache's eviction (`while cache_size > capacity_bytes`) use `held_bytes`."""
    from llama_cpp.llama_cache import LlamaRAMCache

    LlamaRAMCache.cache_size = property(held_bytes)  # type: ignore[assignment, method-assign]


def main() -> None:
    patch_ram_cache()
    from llama_cpp.server.__main__ import main as server_main

    server_main()


if __name__ == "__main__":
    main()

"""On-disk cache of LLM answers for deterministic (temperature 0) requests.

The key is the SHA-256 of the canonical JSON of everything that shapes the answer: model, messages,
sampling parameters, schema and structured-output backend. Only temperature-0 requests are cached:
a sampled answer is meant to differ between calls. Entries are written atomically (temp file +
rename), so concurrent ranks sharing a cache never read half an entry; an unreadable entry is a miss
with a warning, and is overwritten by the next answer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from ..text import safe_text

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the entry layout changes: old entries then simply miss
# An entry holds one capped answer (LLMClient.max_answer_bytes); a larger file is from before the cap
# or not ours: a miss, not a read of megabytes.
MAX_ENTRY_BYTES = 4 * 1024 * 1024


def default_cache_dir() -> Path:
    root = os.environ.get("RELED_HPC_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "reled_hpc") / "llm_responses"


class ResponseCache:
    """`get(key)` / `put(key, entry)` of JSON dicts under `root/ab/abcdef...json`."""

    def __init__(self, root: str | os.PathLike[str] | None = None, *, enabled: bool = True):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.enabled = enabled
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(
        *,
        model: str,
        messages: list[dict[str, Any]],
        params: dict[str, Any],
        schema: dict[str, Any] | None,
        backend: str,
    ) -> str:
        blob = json.dumps(
            {"v": FORMAT, "model": model, "messages": messages, "params": params, "schema": schema, "backend": backend},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    @staticmethod
    def cacheable(temperature: float) -> bool:
        return temperature == 0.0

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        if not self.enabled:
            return None
        path = self._path(key)
        try:
            size = path.stat().st_size
            if size > MAX_ENTRY_BYTES:
                raise ValueError(f"{size} bytes, over {MAX_ENTRY_BYTES}")
            entry = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(entry, dict) or entry.get("key") != key or not isinstance(entry.get("text"), str):
                raise ValueError("not a cache entry of this key")
        except FileNotFoundError:
            self.misses += 1
            return None
        except (OSError, ValueError) as exc:
            log.warning("LLM cache: ignoring corrupt entry %s (%s)", path, exc)
            self.misses += 1
            return None
        self.hits += 1
        return entry

    def put(self, key: str, entry: dict[str, Any]) -> None:
        if not self.enabled:
            return
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    # safe_text: a lone surrogate would raise UnicodeEncodeError here (the client caps the size)
                    json.dump({**entry, "text": safe_text(entry.get("text")), "key": key}, f, ensure_ascii=False)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:  # a full or read-only cache must not fail the request that was answered
            log.warning("LLM cache: could not write %s (%s)", path, exc)

    def clear(self) -> None:
        import shutil

        shutil.rmtree(self.root, ignore_errors=True)

"""Measured results (perplexity, KL, params per plan), kept in the cache's diskcache index.

Values are plain JSON (the index uses JSONDisk), so reading them never unpickles.
Each result is one key `result:<insertion time in ns>:<hash>`; `all()` returns them oldest
first (the record's own `created` stamp has one-second resolution, too coarse to order by).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .cache import CacheIndexError, index, key_of

PREFIX = "result:"


class ResultStore:
    """Append-only store of `EvalResult.to_dict()` records."""

    def __init__(self, cache_dir: str | Path | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir else None

    def add(self, result) -> str:
        record = result.to_dict() if hasattr(result, "to_dict") else dict(result)
        json.dumps(record)  # fail here, not inside the cache, if something is not JSON
        key = f"{PREFIX}{time.time_ns():020d}:{key_of(record)}"
        with index(self.cache_dir) as store:
            store[key] = record
        return key

    def all(self) -> list[dict]:
        """Every readable record, oldest first; a corrupt row is skipped (``health.cache_problems`` lists it).

        Raises CacheIndexError when the index database itself is unreadable.
        """
        import sqlite3

        try:
            with index(self.cache_dir) as store:
                keys = sorted(k for k in store.iterkeys() if isinstance(k, str) and k.startswith(PREFIX))
                records = [store.get(k) for k in keys]
        except sqlite3.DatabaseError as exc:
            raise CacheIndexError(f"the cache index cannot be read ({exc})") from exc
        return [r for r in records if isinstance(r, dict)]

    def remove(self, key: str) -> None:
        with index(self.cache_dir) as store:
            store.pop(key, None)

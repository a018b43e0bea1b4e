"""Values derived from a read-only object (a Profile), memoised on that object.

The Allocate page re-solves on every slider move; what does not depend on the budget
(a profile's cumulative spectral energies, the LEMS option table for one error model)
is computed once per profile and reused. The memo lives in the object's ``__dict__``
(not a dataclass field: equality, ``replace`` and saving ignore it) and dies with it.
Profiles are treated as read-only once built; a key names every input that varies,
and callers that change a profile in place must use a new object instead.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Hashable, TypeVar

T = TypeVar("T")
_ATTR = "_derived_memo"
_LOCK = threading.Lock()
LIMIT = 24  # entries per object; the oldest goes first


def derived(obj, key: Hashable, compute: Callable[[], T]) -> T:
    """``compute()`` once per (``obj``, ``key``); later calls return the same value (do not mutate it)."""
    with _LOCK:
        memo = obj.__dict__.setdefault(_ATTR, OrderedDict())
        if key in memo:
            memo.move_to_end(key)
            return memo[key]
    value = compute()
    with _LOCK:
        memo[key] = value
        while len(memo) > LIMIT:
            memo.popitem(last=False)
    return value

"""Plain truncated SVD: P = I, Q = I (docs/reference/methods.md §3.1); the spectrum is W's own."""
from __future__ import annotations

from .base import StaticMethod


class Svd(StaticMethod):
    """No statistics, no whitening: the StaticMethod defaults."""

"""FWSVD, Fisher-weighted SVD: Q = diag(sqrt(row-summed Fisher)) per layer (docs/reference/methods.md §3.3).

``stats.fisher`` already holds the square root s_j (statistics.collect_fisher_rows);
it is floored at 1e-12 so Q stays invertible on dead input channels.
"""
from __future__ import annotations

import torch

from .base import DecompositionOptions, LayerStats, StaticMethod, Whitener, diagonal


class Fwsvd(StaticMethod):
    needs = frozenset({"fisher"})

    def right(self, stats: LayerStats, options: DecompositionOptions, device: torch.device) -> Whitener:
        return diagonal(stats.fisher.to(options.dtype).to(device).clamp(min=1e-12), "right")

"""ASVD, activation-aware SVD: Q = diag(s^alpha + 1e-6), s a per-input-channel |x| statistic (docs/reference/methods.md §3.2).

The defaults follow the LEMS re-implementation (abs-max summed over batches, alpha 1);
``asvd_statistic="abs_mean", asvd_alpha=0.5`` is the original recipe.
"""
from __future__ import annotations

import torch

from .base import DecompositionOptions, LayerStats, StaticMethod, Whitener, diagonal


class Asvd(StaticMethod):
    needs = frozenset({"inputs"})
    shares_input = True

    def right(self, stats: LayerStats, options: DecompositionOptions, device: torch.device) -> Whitener:
        inputs = stats.inputs
        s = inputs.abs_max_sum if options.asvd_statistic == "abs_max" else inputs.abs_mean
        return diagonal(s.to(options.dtype).to(device).pow(options.asvd_alpha) + 1e-6, "right")

"""KFAC-SVD: P = L_G (or L_G^T, "exact"), Q = L_A, Cholesky factors of the shrunk K-FAC Grams (docs/reference/methods.md §2).

A (input Gram) is shrunk by 0.1 and G (output-gradient Gram) by 0.3 toward
mean(diag) I (docs/reference/methods.md §2.3 item 1). The reference orientation multiplies by the lower factor
L_G on the left, whose metric is L_G^T L_G rather than G (docs/reference/methods.md §2.3 item 5); "exact" uses
L_G^T, giving the true K-FAC loss tr(E^T G E A) as the tail energy.
"""
from __future__ import annotations

import torch

from .base import (SHRINK_A, SHRINK_G, DecompositionOptions, LayerStats, StaticMethod, Whitener, cholesky_left,
                   cholesky_lower, cholesky_right, shrink_)

__all__ = ["Kfac", "SHRINK_A", "SHRINK_G"]


class Kfac(StaticMethod):
    needs = frozenset({"inputs", "grads"})
    shares_input = True  # Q = L_A reads the input Gram only; P is per layer

    def right(self, stats: LayerStats, options: DecompositionOptions, device: torch.device) -> Whitener:
        def build():
            return shrink_(stats.inputs.gram.to(device=device, dtype=options.dtype, copy=True), options.kfac_shrink_a)
        return cholesky_right(cholesky_lower(build(), rebuild=build))

    def left(self, stats: LayerStats, options: DecompositionOptions, device: torch.device) -> Whitener:
        def build():
            return shrink_(stats.grad_gram.to(device=device, dtype=options.dtype, copy=True), options.kfac_shrink_g)
        return cholesky_left(cholesky_lower(build(), rebuild=build), options.kfac_orientation == "exact")

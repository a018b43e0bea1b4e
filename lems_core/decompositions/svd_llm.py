"""SVD-LLM truncation-aware whitening: Q = chol(A), A the input Gram X X^T in float64 (docs/reference/methods.md §3.5).

With A = L L^T, ||(W - W') X||_F = ||(W - W') L||_F, so truncating the SVD of W L
drops exactly the tail singular values: the whitened spectrum is the activation loss.
"""
from __future__ import annotations

import torch

from .base import DecompositionOptions, LayerStats, StaticMethod, Whitener, cholesky_lower, cholesky_right


class SvdLlm(StaticMethod):
    needs = frozenset({"inputs"})
    shares_input = True

    def right(self, stats: LayerStats, options: DecompositionOptions, device: torch.device) -> Whitener:
        def build():  # a private copy, factorised in place (one n x n float64 matrix, not two)
            return stats.inputs.gram.to(device=device, dtype=options.dtype, copy=True)
        return cholesky_right(cholesky_lower(build(), rebuild=build))

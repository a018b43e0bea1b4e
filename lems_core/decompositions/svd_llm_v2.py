"""SVD-LLM v2 loss-optimised truncation: Q = U_s sqrt(Lambda + eps) from eigh(A), no Cholesky (docs/reference/methods.md §3.6).

A = U_s Lambda U_s^T; Q^-1 = (Lambda + eps)^-1/2 U_s^T. Same spectrum as SVD-LLM on a
well-conditioned Gram, and still defined when A is singular (Theorem 3.1).
"""
from __future__ import annotations

import torch

from .base import DecompositionOptions, LayerStats, StaticMethod, Whitener

V2_EPS = 1e-6  # eigenvalue floor (LEMS `_whitening_svd`, docs/reference/methods.md §3.6)


def eig_right(gram: torch.Tensor) -> Whitener:
    """Q = U_s sqrt(Lambda + eps), Q^-1 = (Lambda + eps)^-1/2 U_s^T."""
    lam, vecs = torch.linalg.eigh(gram)
    root = (lam.clamp(min=0) + V2_EPS).sqrt()
    return Whitener(lambda x: (x @ vecs) * root, lambda y: (y / root) @ vecs.T)


class SvdLlmV2(StaticMethod):
    needs = frozenset({"inputs"})
    shares_input = True

    def right(self, stats: LayerStats, options: DecompositionOptions, device: torch.device) -> Whitener:
        return eig_right(stats.inputs.gram.to(options.dtype).to(device))

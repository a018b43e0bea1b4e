"""Step 4: decompose every compressible Linear with one of several (whitened) SVDs.

Every method has the same shape: W (m x n) is mapped to a whitened matrix
M = P W Q with invertible P (m x m) and Q (n x n), M = U S V^T is taken in full,
and the rank-r factors are

    left  = P^-1 U_r S_r^1/2      (m x r)
    right = S_r^1/2 V_r^T Q^-1    (r x n)        so  W_r = left @ right.

The singular values S of M are the spectrum the error model reads. Methods
(methods.md §2, §3):

    svd        P = I, Q = I
    asvd       Q = diag(s^alpha + 1e-6), s = per-channel |x| statistic
    fwsvd      Q = diag(sqrt(row-summed Fisher))
    svd_llm    Q = chol(A)               (Cholesky of the input Gram, float64)
    svd_llm_v2 Q = U_s sqrt(Lambda + eps) from eigh(A)  (no Cholesky)
    kfac       P = L_G (or L_G^T, "exact"), Q = L_A, with shrinkage 0.1 / 0.3

Factors are kept up to the break-even rank eq = floor(mn/(m+n)) (a rank at or
above it keeps the layer dense), so any rank is a slice.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from .model import LayerInfo
from .statistics import InputStats

METHODS = ("svd", "asvd", "fwsvd", "svd_llm", "svd_llm_v2", "kfac")
SHRINK_A, SHRINK_G = 0.1, 0.3  # KFAC-SVD shrinkage (methods.md §2.3)
V2_EPS = 1e-6  # SVD-LLM v2 eigenvalue floor (methods.md §3.6)


@dataclass
class Factorization:
    """A layer's whitened spectrum and its low-rank factors up to `left.shape[1]` components."""

    sigma: np.ndarray  # all min(m, n) singular values of the whitened matrix, descending
    left: torch.Tensor  # m x k
    right: torch.Tensor  # k x n

    @property
    def max_rank(self) -> int:
        return self.left.shape[1]

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 1 <= rank <= self.max_rank:
            raise ValueError(f"rank {rank} outside [1, {self.max_rank}]")
        return self.left[:, :rank], self.right[:rank]

    def weight(self, rank: int) -> torch.Tensor:
        left, right = self.factors(rank)
        return left @ right


@dataclass(frozen=True)
class DecompositionOptions:
    """Method knobs; defaults follow the reference implementation ([CODE])."""

    asvd_alpha: float = 1.0  # reference re-implementation: abs-max, alpha 1 (original ASVD: abs-mean, 0.5)
    asvd_statistic: str = "abs_max"  # or "abs_mean"
    kfac_orientation: str = "reference"  # "reference": L_G W L_A; "exact": L_G^T W L_A (true K-FAC metric)
    kfac_shrink_a: float = SHRINK_A
    kfac_shrink_g: float = SHRINK_G
    dtype: torch.dtype = torch.float64


def cholesky_lower(c: torch.Tensor, tries: int = 3) -> torch.Tensor:
    """Lower Cholesky factor; on failure shift the diagonal by -lambda_min + 1e-6 (SVD-LLM's fix)."""
    for _ in range(tries + 1):
        factor, info = torch.linalg.cholesky_ex(c)
        if int(info) == 0:
            return factor
        shift = -torch.linalg.eigvalsh(c)[0].clamp(max=0) + 1e-6 * c.diagonal().abs().mean().clamp(min=1e-12)
        c = c + shift * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    raise np.linalg.LinAlgError("Cholesky failed after diagonal shifts (matrix far from positive definite)")


def shrink(c: torch.Tensor, amount: float) -> torch.Tensor:
    """(1 - a) C + a mean(diag C) I (methods.md §2.3)."""
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    return (1 - amount) * c + amount * c.diagonal().mean() * eye


class _Whitener:
    """An invertible side transform T applied as T @ W (left) or W @ T (right)."""

    def __init__(self, apply: Callable, undo: Callable):
        self.apply = apply  # X -> X @ Q (right) or P @ X (left)
        self.undo = undo  # Y -> Y @ Q^-1 (right) or P^-1 @ Y (left)


def _identity() -> _Whitener:
    return _Whitener(lambda x: x, lambda y: y)


def _diagonal(scale: torch.Tensor, side: str) -> _Whitener:
    if side == "right":
        return _Whitener(lambda x: x * scale, lambda y: y / scale)
    return _Whitener(lambda x: scale[:, None] * x, lambda y: y / scale[:, None])


def _cholesky_right(lower: torch.Tensor) -> _Whitener:
    """Q = L (lower): W L; undo Y L^-1 via a triangular solve."""
    return _Whitener(
        lambda x: x @ lower,
        lambda y: torch.linalg.solve_triangular(lower, y, upper=False, left=False),
    )


def _cholesky_left(lower: torch.Tensor, transpose: bool) -> _Whitener:
    """P = L (reference orientation) or L^T (exact K-FAC metric)."""
    p = lower.T if transpose else lower
    return _Whitener(lambda x: p @ x, lambda y: torch.linalg.solve_triangular(p, y, upper=transpose))


def _eig_right(gram: torch.Tensor) -> _Whitener:
    """SVD-LLM v2: Q = U_s sqrt(Lambda + eps), Q^-1 = (Lambda + eps)^-1/2 U_s^T."""
    lam, vecs = torch.linalg.eigh(gram)
    root = (lam.clamp(min=0) + V2_EPS).sqrt()
    return _Whitener(lambda x: (x @ vecs) * root, lambda y: (y / root) @ vecs.T)


@contextlib.contextmanager
def single_threaded_lapack(device: torch.device) -> Iterator[None]:
    """Run CPU linear algebra on one thread.

    Measured here (2 cores, other processes running): MKL's threaded SVD of a
    1536 x 576 float64 matrix took 15.5 s on 2 threads and 0.39 s on 1; threaded
    LAPACK spins when the cores are shared. One thread is never much slower.
    """
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def top_singular(m: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All singular values of m and its top-`keep` pair (left m x k, right k x n) with left @ right = U_k S_k V_k^T.

    On CPU the eigendecomposition of the smaller Gram (m m^T or m^T m) is ~3x faster
    than a thin SVD; the factors are written so their product is the exact projection
    of m onto the top-k eigenvectors (U U^T m or m V V^T), so tiny singular values
    never divide anything that matters. On CUDA a thin SVD is used.
    """
    if m.device.type != "cpu":
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        root = s[:keep].sqrt()
        return s, u[:, :keep] * root, root[:, None] * vh[:keep]
    wide = m.shape[0] <= m.shape[1]
    lam, vecs = torch.linalg.eigh(m @ m.T if wide else m.T @ m)
    s = lam.flip(0).clamp(min=0).sqrt()
    top = vecs.flip(1)[:, :keep]
    root = s[:keep].sqrt()
    safe = root.clamp(min=torch.finfo(m.dtype).tiny ** 0.25)
    if wide:  # left = U sqrt(S), right = U^T m / sqrt(S)
        return s, top * root, (top.T @ m) / safe[:, None]
    return s, (m @ top) / safe, root[:, None] * top.T


def factorize(weight: torch.Tensor, left: _Whitener, right: _Whitener, keep: int) -> Factorization:
    """Spectrum of the whitened matrix and the mapped-back factors up to `keep` components."""
    m = right.apply(left.apply(weight))
    s, lf, rf = top_singular(m, keep)
    return Factorization(s.double().cpu().numpy(), left.undo(lf).float().contiguous(), right.undo(rf).float().contiguous())


class Decomposer:
    """Decomposes layers with one method, reusing whitening shared by layers with one input.

    q/k/v (and gate/up) share one input Gram, so their Cholesky/eigh factor is
    computed once; this and a float64 SVD per layer are the whole cost.
    """

    def __init__(self, method: str, options: DecompositionOptions | None = None):
        if method not in METHODS:
            raise ValueError(f"Unknown decomposition {method!r}: choose from {METHODS}")
        self.method = method
        self.options = options or DecompositionOptions()
        self._right_cache: dict[int, _Whitener] = {}

    def __call__(
        self,
        layer: LayerInfo,
        weight: torch.Tensor,
        inputs: InputStats | None = None,
        grad_gram: torch.Tensor | None = None,
        fisher: torch.Tensor | None = None,
        keep: int | None = None,
    ) -> Factorization:
        """Factorise one layer; `keep` components (default: the break-even rank)."""
        with single_threaded_lapack(weight.device):
            return self._factorize(layer, weight, inputs, grad_gram, fisher, keep)

    def _factorize(self, layer, weight, inputs, grad_gram, fisher, keep) -> Factorization:
        dt = self.options.dtype
        w = weight.detach().to(dt)
        left, right = _identity(), _identity()
        if self.method in ("asvd", "svd_llm", "svd_llm_v2", "kfac"):
            if inputs is None:
                raise ValueError(f"{self.method} needs input statistics for {layer.name}")
            right = self._input_whitener(inputs, w.device)
        if self.method == "fwsvd":
            if fisher is None:
                raise ValueError(f"fwsvd needs Fisher statistics for {layer.name}")
            right = _diagonal(fisher.to(dt).to(w.device).clamp(min=1e-12), "right")
        if self.method == "kfac":
            if grad_gram is None:
                raise ValueError(f"kfac needs the output-gradient Gram for {layer.name}")
            g = shrink(grad_gram.to(dt).to(w.device), self.options.kfac_shrink_g)
            left = _cholesky_left(cholesky_lower(g), self.options.kfac_orientation == "exact")
        keep = max(1, min(keep or layer.eq_rank, layer.out_features, layer.in_features))
        return factorize(w, left, right, keep)

    def _input_whitener(self, inputs: InputStats, device) -> _Whitener:
        key = id(inputs.gram)
        if key not in self._right_cache:
            self._right_cache = {key: self._make_input_whitener(inputs, device)}  # one group alive at a time
        return self._right_cache[key]

    def _make_input_whitener(self, inputs: InputStats, device) -> _Whitener:
        dt, o = self.options.dtype, self.options
        if self.method == "asvd":
            stat = inputs.abs_max_sum if o.asvd_statistic == "abs_max" else inputs.abs_mean
            return _diagonal(stat.to(dt).to(device).pow(o.asvd_alpha) + 1e-6, "right")
        gram = inputs.gram.to(dt).to(device)
        if self.method == "svd_llm_v2":
            return _eig_right(gram)
        if self.method == "kfac":
            gram = shrink(gram, o.kfac_shrink_a)
        return _cholesky_right(cholesky_lower(gram))

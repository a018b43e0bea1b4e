"""Shared maths of the decompositions: the factor type, options, whiteners and the whitened SVD.

Every static method has the same shape (docs/reference/methods.md §2.3, docs/reference/methods.md §3): W (m x n) is mapped to a
whitened matrix M = P W Q with invertible P (m x m) and Q (n x n), M = U S V^T is taken
in full, and the rank-r factors are

    left  = P^-1 U_r S_r^1/2      (m x r)
    right = S_r^1/2 V_r^T Q^-1    (r x n)        so  W_r = left @ right.

The singular values S of M are the spectrum the error model reads. Factors are kept up
to the break-even rank eq = floor(mn/(m+n)) (a rank at or above it keeps the layer
dense), so any rank is a slice. A static method only says how it builds P and Q
(``StaticMethod``); rank-dependent methods produce Factorizations their own way.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import numpy as np
import torch
from torch import nn

from ..model import LayerInfo
from ..numerics import NonFiniteFactorsError, check_finite_factors, rank_tolerance  # noqa: F401 (re-exported)
from ..run import Progress  # noqa: F401  (re-exported: decompositions take a progress callback)
from ..statistics import InputStats
Ranks = dict[str, "int | None"]

SHRINK_A, SHRINK_G = 0.1, 0.3  # KFAC-SVD shrinkage (docs/reference/methods.md §2.3)


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
    """Knobs of the static methods; defaults follow the reference implementation ([CODE])."""

    asvd_alpha: float = 1.0  # reference re-implementation: abs-max, alpha 1 (original ASVD: abs-mean, 0.5)
    asvd_statistic: str = "abs_max"  # or "abs_mean"
    kfac_orientation: str = "reference"  # "reference": L_G W L_A; "exact": L_G^T W L_A (true K-FAC metric)
    kfac_shrink_a: float = SHRINK_A
    kfac_shrink_g: float = SHRINK_G
    dtype: torch.dtype = torch.float64


@dataclass(frozen=True)
class LayerStats:
    """The statistics of one layer a static method may read (None where not collected)."""

    inputs: InputStats | None = None  # its input's Gram and |x| statistics (shared by q/k/v, gate/up)
    grad_gram: torch.Tensor | None = None  # output-gradient Gram G (KFAC)
    fisher: torch.Tensor | None = None  # row-summed empirical Fisher per input column (FWSVD)


# ============================================================ whiteners
@dataclass(frozen=True)
class Whitener:
    """An invertible side transform T applied as T @ W (left) or W @ T (right)."""

    apply: Callable[[torch.Tensor], torch.Tensor]  # X -> X @ Q (right) or P @ X (left)
    undo: Callable[[torch.Tensor], torch.Tensor]  # Y -> Y @ Q^-1 (right) or P^-1 @ Y (left)


def identity() -> Whitener:
    return Whitener(lambda x: x, lambda y: y)


def diagonal(scale: torch.Tensor, side: str) -> Whitener:
    """P or Q = diag(scale): scales the rows (left) or the columns (right) of W."""
    if side == "right":
        return Whitener(lambda x: x * scale, lambda y: y / scale)
    return Whitener(lambda x: scale[:, None] * x, lambda y: y / scale[:, None])


def cholesky_right(lower: torch.Tensor) -> Whitener:
    """Q = L (lower): W L; undo Y L^-1 via a triangular solve."""
    return Whitener(
        lambda x: x @ lower,
        lambda y: torch.linalg.solve_triangular(lower, y, upper=False, left=False),
    )


def cholesky_left(lower: torch.Tensor, transpose: bool) -> Whitener:
    """P = L (reference orientation) or L^T (exact K-FAC metric), docs/reference/methods.md §2.3 item 5."""
    p = lower.T if transpose else lower
    return Whitener(lambda x: p @ x, lambda y: torch.linalg.solve_triangular(p, y, upper=transpose))


def cholesky_lower(c: torch.Tensor, tries: int = 3, rebuild: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """Lower Cholesky factor; on failure shift the diagonal by -lambda_min + 1e-6 (SVD-LLM's fix, docs/reference/methods.md §3.5).

    With ``rebuild`` (a function that makes ``c`` again) the first attempt factorises
    ``c`` in its own storage, saving an n x n copy (1.6 GB at n = 14336 in float64); if it fails, ``rebuild()`` gives the matrix back for the shifts.
    """
    start = 0
    if rebuild is not None:
        info = torch.empty((), dtype=torch.int32, device=c.device)
        torch.linalg.cholesky_ex(c, out=(c, info))
        if int(info) == 0:
            return c
        del c
        c = _shifted(rebuild(), owned=True)
        start = 1
    for _ in range(start, tries + 1):
        factor, info = torch.linalg.cholesky_ex(c)
        if int(info) == 0:
            return factor
        c = _shifted(c, owned=False)
    raise np.linalg.LinAlgError("Cholesky failed after diagonal shifts (matrix far from positive definite)")


def _shifted(c: torch.Tensor, owned: bool) -> torch.Tensor:
    """c + (-lambda_min + 1e-6 mean|diag|) I; in place when ``owned`` (a private copy), else a new matrix."""
    shift = -torch.linalg.eigvalsh(c)[0].clamp(max=0) + 1e-6 * c.diagonal().abs().mean().clamp(min=1e-12)
    c = c if owned else c.clone()
    c.diagonal().add_(shift)
    return c


def shrink(c: torch.Tensor, amount: float) -> torch.Tensor:
    """(1 - a) C + a mean(diag C) I (docs/reference/methods.md §2.3); one new matrix, no identity temporaries."""
    return shrink_(c.clone(), amount, c.diagonal().mean())


def shrink_(c: torch.Tensor, amount: float, mean: torch.Tensor | None = None) -> torch.Tensor:
    """``shrink`` in place (same floats: (1 - a) c_ij, plus a mean(diag) on the diagonal)."""
    mean = c.diagonal().mean() if mean is None else mean
    c.mul_(1 - amount)
    c.diagonal().add_(amount * mean)
    return c


class StaticMethod:
    """How one static decomposition builds P (``left``) and Q (``right``) of M = P W Q.

    ``needs`` names the statistics it reads ("inputs", "grads", "fisher"); the Decomposer
    checks they are given. With ``shares_input`` Q depends on the layer's input
    statistics alone, so layers reading one input (q/k/v, gate/up) share it and the
    Decomposer builds it once per input. The defaults are the identity (plain SVD).
    """

    needs: frozenset[str] = frozenset()
    shares_input: bool = False

    def right(self, stats: LayerStats, options: DecompositionOptions, device: torch.device) -> Whitener:
        return identity()

    def left(self, stats: LayerStats, options: DecompositionOptions, device: torch.device) -> Whitener:
        return identity()


class RankDependent(Protocol):
    """A decomposition whose factors depend on the whole plan's ranks (closed loop, block training).

    Returns the factors of the planned layers only (dense ones, None or rank >= eq, are
    left out), each sized to its planned rank. ``base_factors`` are the static factors
    of the method's base when its spec asks for them (ERC), else None.
    """

    def __call__(self, model: nn.Module, ranks: Ranks, calib_ids: torch.Tensor, options,
                 base_factors: dict[str, Factorization] | None, progress: Progress | None) -> dict[str, Factorization]: ...


# ============================================================ the whitened SVD
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
    of m onto the top-k eigenvectors (U U^T m or m V V^T). On CUDA a thin SVD is used.
    Singular directions that are numerically zero (``numerically_nonzero``) get zero
    columns and rows and a zero singular value: a weight of lower rank than ``keep``
    has exact, finite factors.
    """
    if m.device.type != "cpu":
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        s = numerically_nonzero(s, rank_tolerance(s[0], m.shape, m.dtype))
        root = s[:keep].sqrt()
        return s, u[:, :keep] * root, root[:, None] * vh[:keep]
    wide = m.shape[0] <= m.shape[1]
    lam, vecs = torch.linalg.eigh(m @ m.T if wide else m.T @ m)
    lam = lam.flip(0)  # descending: the Gram's eigenvalues are the squared singular values
    s = numerically_nonzero(lam, rank_tolerance(lam[0], m.shape, m.dtype)).sqrt()
    top = vecs.flip(1)[:, :keep]
    root = s[:keep].sqrt()
    inverse = torch.where(root > 0, 1 / root, torch.zeros_like(root))
    if wide:  # left = U sqrt(S), right = U^T m / sqrt(S)
        return s, top * root, (top.T @ m) * inverse[:, None]
    return s, (m @ top) * inverse, root[:, None] * top.T


def numerically_nonzero(values: torch.Tensor, tolerance: float) -> torch.Tensor:
    """``values`` with those at or below ``tolerance`` (round-off, negatives included) set to exactly 0.

    For a Gram's eigenvalues the tolerance is the rank rule applied to the Gram: its
    round-off (forming it and eigh) is eps x max(m, n) x its largest eigenvalue, so a
    singular value below s_max sqrt(eps max(m, n)) is not resolved and counts as zero.
    """
    return torch.where(values > tolerance, values, torch.zeros_like(values))


def factorize(weight: torch.Tensor, left: Whitener, right: Whitener, keep: int) -> Factorization:
    """Spectrum of the whitened matrix and the mapped-back factors up to `keep` components."""
    m = right.apply(left.apply(weight))
    s, lf, rf = top_singular(m, keep)
    return Factorization(s.double().cpu().numpy(), left.undo(lf).float().contiguous(), right.undo(rf).float().contiguous())


def keep_of(layer: LayerInfo, keep: int | None) -> int:
    """Components to keep: ``keep`` (default the break-even rank), within [1, min(m, n)]."""
    return max(1, min(keep or layer.eq_rank, layer.out_features, layer.in_features))

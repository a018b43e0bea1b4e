"""SAES-SVD: closed-loop, FP-anchored whitened SVD with an adaptive alignment weight.

docs/reference/other-seed-methods.md §1. For every Linear W (m x n) with planned rank r:

- CEALC (docs/reference/other-seed-methods.md §1.3): minimise ||(AB - W) X||^2 + alpha ||AB X - W X^f||^2, where X are the
  inputs the *compressed* network gives the layer and X^f the FP network's inputs on
  the same tokens. With H = X X^T, Delta = (X^f - X) X^T and beta = alpha/(1+alpha),
  the whitened target is G(beta) = W (H + beta Delta) K^-T with H = K K^T (Cholesky,
  the [DERIVED] consistency rule), truncated SVD G = U S V^T, and

      A = U_r S_r^1/2,   B = S_r^1/2 V_r^T K^-1.

  beta = 0 is exactly SVD-LLM on the compressed-path statistics.
- ACES (docs/reference/other-seed-methods.md §1.4): beta per layer minimises the FS-FOA tail ratio
  rho(beta)^2 = (a + 2b beta + c beta^2) / (A + 2B beta + C beta^2) over [0.25, 0.75],
  by evaluating the real roots of the stationary quadratic and the endpoints.
- Closed loop (docs/reference/other-seed-methods.md §1.3, [RECON] order): blocks are processed in order; inside a block the
  groups {q,k,v}, o, {gate,up}, down are compressed GPTQ "true-sequential", each
  group's statistics taken from two hidden-state streams (FP and compressed) that
  are aligned token by token.

Statistics are plain sums over tokens (accumulated with addmm_); the solution does
not depend on a common scale of (H, Delta), and H is regularised exactly as
SVD-LLM does (diagonal shift only if the Cholesky fails), so beta = 0 reproduces
SVD-LLM bit for bit given the same H. The two-stream helpers are in streams.py
(shared with LC-SVD).
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from ..blocks import BlockInput, advance, capture_block_inputs
from ..model import LayerInfo, decoder_blocks
from .base import Factorization, Progress, Ranks, cholesky_lower
from .streams import layers_by_block, module_input, planned_rank, relative_name, replace_with_factors

# GPTQ true-sequential order of the layer kinds inside a block (docs/reference/other-seed-methods.md §1.3 [RECON]).
SEQUENTIAL_GROUPS = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))


@dataclass(frozen=True)
class SaesOptions:
    """SAES-SVD knobs; defaults follow docs/reference/other-seed-methods.md §1.4.

    ``fixed_beta`` turns ACES off (CEALC only; the paper's ablation value is
    unstated, 0.5 is the [RECON] default there; 0 gives closed-loop SVD-LLM).
    ``closed_loop=False`` takes both X and X^f from the FP stream (Delta = 0), which is
    open-loop SVD-LLM: a control for tests and studies.
    """

    beta_min: float = 0.25  # Table 4's best interval
    beta_max: float = 0.75
    beta_cap: float = 0.95  # [RECON] guardrail of Alg. 3
    shrink: float = 1.0  # [RECON] Alg. 3's optional rho
    fixed_beta: float | None = None
    closed_loop: bool = True
    batch_size: int = 1  # calibration sequences per forward

    def to_dict(self) -> dict:
        return asdict(self)


# ============================================================ whitened factors (docs/reference/other-seed-methods.md §1.3)
def whitened_factors(g: torch.Tensor, lower: torch.Tensor, rank: int) -> Factorization:
    """Truncated SVD of a whitened target g and the factors mapped back by K^-1.

    left = U_r S_r^1/2, right = S_r^1/2 V_r^T K^-1 (the same mapping as SVD-LLM in
    svd_llm.py, so a whitened target equal to W K gives SVD-LLM's factors).
    """
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    root = s[:rank].sqrt()
    left = u[:, :rank] * root
    right = torch.linalg.solve_triangular(lower, root[:, None] * vh[:rank], upper=False, left=False)
    return Factorization(s.double().cpu().numpy(), left.float().contiguous(), right.float().contiguous())


# ============================================================ CEALC statistics (docs/reference/other-seed-methods.md §1.3)
@dataclass
class GroupStats:
    """Statistics of one shared input: H = X X^T and Delta = (X^f - X) X^T (token sums)."""

    gram: torch.Tensor
    delta: torch.Tensor
    tokens: int = 0

    def add(self, x: torch.Tensor, x_fp: torch.Tensor) -> None:
        """Accumulate one batch; x and x_fp are (tokens, n) with aligned rows.

        Delta is accumulated directly from X^f - X (never as X^f X^T - H), so a tiny
        drift is not lost to cancellation in fp32.
        """
        x, x_fp = x.to(self.gram.dtype), x_fp.to(self.gram.dtype)
        self.gram.addmm_(x.T, x)
        self.delta.addmm_((x_fp - x).T, x)
        self.tokens += x.shape[0]


def group_stats(fp_block: nn.Module, comp_block: nn.Module, module_name: str,
                fp_items: list[BlockInput], comp_items: list[BlockInput]) -> GroupStats:
    """H and Delta of the input of ``module_name``, streaming both paths batch by batch."""
    stats = None
    for fp_item, comp_item in zip(fp_items, comp_items):
        x_fp = module_input(fp_block, module_name, fp_item)
        x = module_input(comp_block, module_name, comp_item)
        if x.shape != x_fp.shape:
            raise RuntimeError(f"FP and compressed streams disagree on {module_name}: {x_fp.shape} vs {x.shape}")
        if stats is None:
            n = x.shape[1]
            stats = GroupStats(torch.zeros(n, n, device=x.device), torch.zeros(n, n, device=x.device))
        stats.add(x, x_fp)
    return stats


@dataclass
class Whitening:
    """K = chol(H) (SVD-LLM's shift on failure) and Delta K^-T, shared by a group's layers."""

    lower: torch.Tensor
    delta_kt: torch.Tensor

    @staticmethod
    def of(stats: GroupStats, dtype=torch.float64) -> "Whitening":
        lower = cholesky_lower(stats.gram.to(dtype))
        delta_kt = torch.linalg.solve_triangular(lower, stats.delta.to(dtype).T, upper=False).T
        return Whitening(lower, delta_kt)


def cealc_factorization(weight: torch.Tensor, white: Whitening, beta: float, rank: int) -> Factorization:
    """CEALC closed form (Thm 4.1): factors of G(beta) = W K + beta W Delta K^-T at ``rank``.

    W H K^-T = W K when H = K K^T, so the beta = 0 target is SVD-LLM's whitened weight.
    """
    w = weight.detach().to(white.lower.dtype)
    return whitened_factors(w @ white.lower + beta * (w @ white.delta_kt), white.lower, rank)


# ============================================================ ACES (docs/reference/other-seed-methods.md §1.4)
@dataclass(frozen=True)
class FsFoa:
    """Coefficients of rho(beta)^2 = (a + 2b beta + c beta^2) / (A + 2B beta + C beta^2)."""

    a: float
    b: float
    c: float
    A: float
    B: float
    C: float

    def ratio(self, beta):
        """The FS-FOA tail ratio rho(beta)^2 (vectorised over beta)."""
        beta = np.asarray(beta, dtype=np.float64)
        den = self.A + 2 * self.B * beta + self.C * beta ** 2
        return (self.a + 2 * self.b * beta + self.c * beta ** 2) / np.maximum(den, 1e-300)

    def stationary_quadratic(self) -> tuple[float, float, float]:
        """(q2, q1, q0) of Eq. 19: (cB - bC) beta^2 + (cA - aC) beta + (bA - aB) = 0.

        It is half the numerator of d rho^2 / d beta (checked in the tests).
        """
        return (self.c * self.B - self.b * self.C, self.c * self.A - self.a * self.C, self.b * self.A - self.a * self.B)


def fs_foa(s: torch.Tensor, d: torch.Tensor, rank: int) -> FsFoa:
    """Freeze the top-``rank`` singular subspaces of S and project S, D onto their complement.

    S_perp is the SVD tail of S; D_perp = D - U U^T D - D V V^T + U U^T D V V^T ([DERIVED]).
    """
    u, sv, vh = torch.linalg.svd(s, full_matrices=False)
    ur, vr = u[:, :rank], vh[:rank].T
    s_perp = (u[:, rank:] * sv[rank:]) @ vh[rank:]
    ud = ur.T @ d
    d_perp = d - ur @ ud - (d @ vr) @ vr.T + ur @ (ud @ vr) @ vr.T
    dot = lambda x, y: float((x * y).sum())
    return FsFoa(dot(s_perp, s_perp), dot(s_perp, d_perp), dot(d_perp, d_perp), dot(s, s), dot(s, d), dot(d, d))


def quadratic_roots(q2: float, q1: float, q0: float) -> list[float]:
    """Real roots of q2 x^2 + q1 x + q0 (a degenerate quadratic falls back to linear)."""
    scale = max(abs(q2), abs(q1), abs(q0))
    if scale == 0.0:
        return []
    if abs(q2) <= 1e-12 * scale:
        return [-q0 / q1] if abs(q1) > 1e-12 * scale else []
    disc = q1 * q1 - 4 * q2 * q0
    if disc < 0:
        return []
    root = math.sqrt(disc)
    q = -0.5 * (q1 + math.copysign(root, q1))  # the numerically stable pair
    roots = [q / q2]
    if q != 0.0:
        roots.append(q0 / q)
    return roots


def aces_beta(coeffs: FsFoa, options: SaesOptions = SaesOptions()) -> float:
    """ACES selection rule: argmin of rho^2 over stationary points in range and both endpoints.

    Then the guardrails of Alg. 3: beta <- shrink * min(beta, beta_cap). Ties keep the
    first candidate (the lower endpoint), so Delta = 0 gives beta_min.
    """
    lo, hi = options.beta_min, options.beta_max
    candidates = [lo, hi] + [r for r in quadratic_roots(*coeffs.stationary_quadratic()) if lo < r < hi]
    values = coeffs.ratio(np.array(candidates))
    beta = float(candidates[int(np.argmin(values))])
    return options.shrink * min(beta, options.beta_cap)


def saes_layer(weight: torch.Tensor, white: Whitening, rank: int, options: SaesOptions) -> tuple[Factorization, float]:
    """One layer: beta from ACES (or fixed), then the CEALC factors at ``rank``."""
    if options.fixed_beta is not None:
        beta = float(options.fixed_beta)
    else:
        w = weight.detach().to(white.lower.dtype)
        beta = aces_beta(fs_foa(w @ white.lower, w @ white.delta_kt, rank), options)
    return cealc_factorization(weight, white, beta, rank), beta


# ============================================================ closed loop over the model
def compress_block_closed_loop(
    fp_block: nn.Module, comp_block: nn.Module, block_layers: list[LayerInfo], ranks: Ranks,
    fp_items: list[BlockInput], comp_items: list[BlockInput], options: SaesOptions,
) -> tuple[dict[str, Factorization], dict[str, float]]:
    """Compress ``comp_block`` in place group by group; return its factors and betas.

    ``fp_block`` is the untouched original. Each group's statistics are read after the
    previous groups of the same block were compressed (true-sequential).
    """
    factors, betas = {}, {}
    source, items = (comp_block, comp_items) if options.closed_loop else (fp_block, fp_items)
    for kinds in SEQUENTIAL_GROUPS:
        group = [l for l in block_layers if l.kind in kinds and planned_rank(l, ranks) is not None]
        if not group:
            continue
        white = Whitening.of(group_stats(fp_block, source, relative_name(group[0]), fp_items, items))
        for layer in group:
            weight = fp_block.get_submodule(relative_name(layer)).weight
            factors[layer.name], betas[layer.name] = saes_layer(weight, white, planned_rank(layer, ranks), options)
            replace_with_factors(comp_block, layer, factors[layer.name])
    return factors, betas


def saes_factorizations(
    model: nn.Module, ranks: Ranks, calib_ids: torch.Tensor, options: SaesOptions = SaesOptions(),
    progress: Progress | None = None,
) -> tuple[dict[str, Factorization], dict[str, float]]:
    """SAES-SVD factors of every planned (non-dense) layer at its planned rank, and the betas.

    The model itself is never modified: each block is compressed in a block-local copy
    that only feeds the compressed stream. Dense layers are not in the result.
    """
    blocks, by_block = decoder_blocks(model), layers_by_block(model)
    fp_items = capture_block_inputs(model, calib_ids, options.batch_size)
    comp_items = list(fp_items)  # both streams start from the same (uncompressed) embeddings
    factors, betas = {}, {}
    for b, block in enumerate(blocks):
        comp_block = copy.deepcopy(block)
        f, beta = compress_block_closed_loop(block, comp_block, by_block.get(b, []), ranks,
                                             fp_items, comp_items, options)
        factors.update(f)
        betas.update(beta)
        comp_items = advance(comp_block, comp_items)
        fp_items = advance(block, fp_items)
        del comp_block
        if progress:
            progress((b + 1) / len(blocks), f"SAES-SVD: block {b + 1}/{len(blocks)}")
    return factors, betas


def factorizations(model: nn.Module, ranks: Ranks, calib_ids: torch.Tensor, options: SaesOptions,
                   base_factors: dict[str, Factorization] | None = None,
                   progress: Progress | None = None) -> dict[str, Factorization]:
    """The registry's rank-dependent entry: SAES-SVD factors of the planned layers (no base factors used)."""
    return saes_factorizations(model, ranks, calib_ids, options, progress)[0]

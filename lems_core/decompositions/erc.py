"""ERC-SVD's REC: residual-compensated SVD on top of the static SVD-LLM factors (docs/reference/other-seed-methods.md §2.2).

Per Linear W (m x n) at total rank r, with eq = floor(mn/(m+n)) (the paper's "scale" alpha):

    r_r = int(0.05 * eq)  (residual rank, beta = 0.05 fixed in the paper)
    r_i = r - r_r          (whitened first stage)
    W_ri = SVD-LLM rank-r_i approximation (whitened with the FP-model Cholesky)
    R    = W - W_ri, R_rr = plain (unwhitened) rank-r_r SVD of R
    factors = [U_rr sqrt(S_rr) | left_ri],  [sqrt(S_rr) V_rr^T ; right_ri]

so storage is r(m+n), exactly SVD-LLM's at rank r. Because SVD-LLM's truncations
are nested, W - SVD-LLM_r(W) = R - (a rank-r_r matrix), and Eckart-Young gives
||W - W_hat||_F <= ||W - SVD-LLM_r(W)||_F (Theorem 3, weight space only).
The residual stage must be unwhitened, otherwise REC equals SVD-LLM ([DERIVED]).
ERC's partial-layer compression (PLC, docs/reference/other-seed-methods.md §2.3) is an allocator, not a decomposition.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..compression import is_dense_rank
from ..model import LayerInfo, compressible_layers
from .base import Factorization, Progress, Ranks

RESIDUAL_FRACTION = 0.05  # ERC's beta (docs/reference/other-seed-methods.md §2.2); unrelated to SAES's beta


@dataclass(frozen=True)
class ErcOptions:
    """REC's one knob: the residual rank as a fraction of eq (the paper fixes 0.05)."""

    residual_fraction: float = RESIDUAL_FRACTION

    def to_dict(self) -> dict:
        return asdict(self)


def rec_ranks(layer: LayerInfo, rank: int, residual_fraction: float = RESIDUAL_FRACTION) -> tuple[int, int]:
    """(r_i, r_r): r_r = int(fraction * eq), capped at r - 1 so the whitened stage keeps
    at least one component ([RECON] rounding; at r = 1 REC is plain SVD-LLM)."""
    residual = min(int(residual_fraction * layer.eq_rank), rank - 1)
    return rank - residual, max(residual, 0)


def rec_factorization(weight: torch.Tensor, base: Factorization, layer: LayerInfo, rank: int,
                      residual_fraction: float = RESIDUAL_FRACTION) -> Factorization:
    """REC factors of one layer at total ``rank`` from its SVD-LLM factorisation ``base``.

    The whitened stage is the first r_i components of ``base`` (nested truncation);
    the residual is decomposed without whitening in float64. ``sigma`` stays the
    whitened spectrum of the base (what the error model reads).
    """
    inner, residual = rec_ranks(layer, rank, residual_fraction)
    left_i, right_i = base.factors(inner)
    if residual == 0:
        return Factorization(base.sigma, left_i.contiguous(), right_i.contiguous())
    w = weight.detach().double()
    remainder = w - left_i.double() @ right_i.double()
    u, s, vh = torch.linalg.svd(remainder, full_matrices=False)
    root = s[:residual].sqrt()
    left = torch.cat([u[:, :residual] * root, left_i.double()], dim=1)
    right = torch.cat([root[:, None] * vh[:residual], right_i.double()], dim=0)
    return Factorization(base.sigma, left.float().contiguous(), right.float().contiguous())


def rec_factorizations(model: nn.Module, base: dict[str, Factorization], ranks: Ranks,
                       residual_fraction: float = RESIDUAL_FRACTION) -> dict[str, Factorization]:
    """REC factors of every non-dense layer of ``ranks`` (dense layers are left out)."""
    out = {}
    for layer in compressible_layers(model):
        rank = ranks.get(layer.name)
        if is_dense_rank(layer, rank):
            continue
        weight = model.get_submodule(layer.name).weight
        out[layer.name] = rec_factorization(weight, base[layer.name], layer, int(rank), residual_fraction)
    return out


def factorizations(model: nn.Module, ranks: Ranks, calib_ids: torch.Tensor, options: ErcOptions,
                   base_factors: dict[str, Factorization] | None = None,
                   progress: Progress | None = None) -> dict[str, Factorization]:
    """The registry's rank-dependent entry: REC on the FP model's static SVD-LLM factors (``base_factors``).

    No calibration pass of its own: the statistics are the base's.
    """
    if base_factors is None:
        raise ValueError("erc needs the static svd_llm factors of the model (base_factors)")
    return rec_factorizations(model, base_factors, ranks, options.residual_fraction)

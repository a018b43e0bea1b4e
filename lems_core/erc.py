"""ERC-SVD: residual-compensated SVD (REC) and partial-layer compression (PLC).

other-seed-methods.md §2. Ratios here are *kept* fractions (this project's
convention); the paper's compression ratio R is 1 - kept.

REC (§2.2), per Linear W (m x n) at total rank r, with eq = floor(mn/(m+n)) (the
paper's "scale" alpha):

    r_r = int(0.05 * eq)  (residual rank, beta = 0.05 fixed in the paper)
    r_i = r - r_r          (whitened first stage)
    W_ri = SVD-LLM rank-r_i approximation (whitened with the FP-model Cholesky)
    R    = W - W_ri, R_rr = plain (unwhitened) rank-r_r SVD of R
    factors = [U_rr sqrt(S_rr) | left_ri],  [sqrt(S_rr) V_rr^T ; right_ri]

so storage is r(m+n), exactly SVD-LLM's at rank r. Because SVD-LLM's truncations
are nested, W - SVD-LLM_r(W) = R - (a rank-r_r matrix), and Eckart-Young gives
||W - W_hat||_F <= ||W - SVD-LLM_r(W)||_F (Theorem 3, weight space only).
The residual stage must be unwhitened, otherwise REC equals SVD-LLM ([DERIVED]).

PLC (§2.3): keep the first N - k blocks dense and compress the last k at one
per-block kept ratio chosen so the budget holds; k is picked by a score (the
paper: final-layer output error on calibration data; ``make_final_error_scorer``).
"""
from __future__ import annotations

import time
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from .allocators import Allocation, BudgetBelowMinimumError, _check_ratio, _finish, _finite_score, _rank_at_ratio, _within_budget, realised_ratio
from .blocks import BlockInput, capture_block_inputs, run_block
from .compression import compress_model, is_dense_rank, restore_dense
from .decomposition import Factorization
from .model import LayerInfo, compressible_layers, decoder_blocks
from .profile import Profile

Ranks = dict[str, "int | None"]
RESIDUAL_FRACTION = 0.05  # ERC's beta (§2.2); unrelated to SAES's beta


# ============================================================ REC (§2.2)
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


# ============================================================ final-layer output error
def make_final_error_scorer(model: nn.Module, input_ids: torch.Tensor,
                            factors_for: Callable[[Ranks], dict[str, Factorization]],
                            batch_size: int = 1) -> Callable[[Ranks], float]:
    """score_fn(ranks) = ||h_N^c - h_N||_F / ||h_N||_F of the last decoder block's output.

    PLC's k-selection metric ([RECON] definition, §2.3). Block-0 inputs and the dense
    outputs are computed once; each call compresses the model in place with
    ``factors_for(ranks)``, runs the blocks, and restores the dense Linears.
    """
    items = capture_block_inputs(model, input_ids, batch_size)
    reference = _final_hidden(model, items)
    ref_norm = sum(float(r.double().pow(2).sum()) for r in reference)

    def score(ranks: Ranks) -> float:
        planned = {n: r for n, r in ranks.items() if r is not None}
        originals = {name: model.get_submodule(name) for name in planned}
        factors = factors_for(ranks)
        try:
            compress_model(model, planned, lambda l: factors[l.name])
            outputs = _final_hidden(model, items)
        finally:
            restore_dense(model, originals)
        err = sum(float((o.double() - r.double()).pow(2).sum()) for o, r in zip(outputs, reference))
        return (err / max(ref_norm, 1e-300)) ** 0.5
    return score


@torch.no_grad()
def _final_hidden(model: nn.Module, items: list[BlockInput]) -> list[torch.Tensor]:
    blocks = decoder_blocks(model)
    outputs = []
    for item in items:
        hidden = item.hidden
        for block in blocks:
            hidden = run_block(block, BlockInput(hidden, item.kwargs))
        outputs.append(hidden)
    return outputs


# ============================================================ PLC (§2.3)
def block_params(profile: Profile) -> np.ndarray:
    """Dense parameters of each block's compressible Linears."""
    out = np.zeros(profile.num_blocks)
    for l in profile.layers:
        out[l.block] += l.params
    return out


def plc_keep_ratio(profile: Profile, ratio: float, k: int) -> float:
    """Kept fraction of each of the last k blocks so that the whole budget holds.

    1 - (1 - ratio) P / P_last_k; with identical blocks this is 1 - N R_o / k, the
    paper's R_l = N R_o / k in the removed convention (Eq. 14).
    """
    params = block_params(profile)
    return 1.0 - (1.0 - ratio) * params.sum() / params[-k:].sum()


def plc_ranks(profile: Profile, k: int, keep: float) -> Ranks:
    """Blocks N-k..N-1 at rank int(keep * eq) per matrix; the others dense."""
    first = profile.num_blocks - k
    return {l.name: (_rank_at_ratio(l, keep) if l.block >= first else None) for l in profile.layers}


def plc_candidates(num_blocks: int, step: int | None = None) -> list[int]:
    """Alg. 3's k' in {s, 2s, ..., N - s}, plus k = N (compress every block: REC alone).

    s is unstated in the paper; the [RECON] default s = max(1, round(N / 16)) gives
    s = 2 for 32 blocks (Fig. 3's curves). Including N is our addition, so that low
    budgets where no k < N is feasible still have a choice.
    """
    step = step or max(1, round(num_blocks / 16))
    return sorted(set(range(step, num_blocks, step)) | {num_blocks})


def allocate_erc_plc(profile: Profile, ratio: float, score_fn: Callable[[Ranks], float],
                     step: int | None = None, candidates: Iterable[int] | None = None,
                     min_keep: float = RESIDUAL_FRACTION) -> Allocation:
    """ERC-SVD partial-layer compression: the feasible k with the lowest ``score_fn``.

    k is feasible when the per-block kept fraction exceeds ``min_keep`` (the paper's
    R_l < 1; with REC's residual rank 0.05 eq the whitened stage would be empty below
    0.05, so that is the default) and the rounded ranks meet the budget. The first
    best k wins. Trials are recorded in ``info["trials"]``.
    """
    ratio = _check_ratio(ratio)
    ks = list(candidates) if candidates is not None else plc_candidates(profile.num_blocks, step)
    trials, best = [], None
    start = time.perf_counter()
    for k in ks:
        if not 1 <= k <= profile.num_blocks:
            raise ValueError(f"erc_plc: k={k} outside [1, {profile.num_blocks}]")
        keep = plc_keep_ratio(profile, ratio, k)
        ranks = plc_ranks(profile, k, keep) if keep > min_keep else None
        feasible = ranks is not None and _within_budget(profile, ranks, ratio)
        score = _finite_score(score_fn(ranks)) if feasible else None
        trials.append({"k": k, "block_keep": keep, "feasible": feasible, "score": score,
                       "realised_ratio": realised_ratio(profile, ranks) if ranks else None})
        if feasible and (best is None or score < best[0]):
            best = (score, k, keep, ranks)
    if best is None:
        lowest = 1.0 - (1.0 - min_keep) * max(block_params(profile)[-k:].sum() for k in ks) / profile.total_params
        raise BudgetBelowMinimumError("erc_plc", ratio, lowest, profile.total_params,
                                      f"no k in {ks} keeps more than {min_keep:g} of each compressed block")
    score, k, keep, ranks = best
    info = {"k": k, "block_keep": keep, "first_compressed_block": profile.num_blocks - k, "trials": trials}
    return _finish(profile, Allocation("erc_plc", ratio, ranks, objective=score,
                                       solve_seconds=time.perf_counter() - start, info=info))

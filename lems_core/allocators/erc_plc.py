"""ERC-SVD's partial-layer compression, PLC (docs/reference/other-seed-methods.md §2.3).

Keep the first N - k blocks dense and compress the last k at one per-block kept
ratio chosen so the budget holds; k is picked by a score measured on the model (the
paper: final-layer output error on calibration data,
``evaluation.make_final_error_scorer``). Ratios are kept fractions (the paper's
compression ratio R is 1 - kept).
"""
from __future__ import annotations

import time
from typing import Callable, Iterable

from ..decompositions.erc import RESIDUAL_FRACTION  # REC's residual rank: a compressed block must keep more
from ..budget import Ranks, block_params, check_ratio, rank_at_ratio, realised_ratio, within_budget
from ..profile import Profile
from .base import Allocation, BudgetBelowMinimumError, finish, finite_score


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
    return {l.name: (rank_at_ratio(l, keep) if l.block >= first else None) for l in profile.layers}


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
    ratio = check_ratio(ratio)
    ks = list(candidates) if candidates is not None else plc_candidates(profile.num_blocks, step)
    trials, best = [], None
    start = time.perf_counter()
    for k in ks:
        if not 1 <= k <= profile.num_blocks:
            raise ValueError(f"erc_plc: k={k} outside [1, {profile.num_blocks}]")
        keep = plc_keep_ratio(profile, ratio, k)
        ranks = plc_ranks(profile, k, keep) if keep > min_keep else None
        feasible = ranks is not None and within_budget(profile, ranks, ratio)
        score = finite_score(score_fn(ranks)) if feasible else None
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
    return finish(profile, Allocation("erc_plc", ratio, ranks, objective=score,
                                       solve_seconds=time.perf_counter() - start, info=info))


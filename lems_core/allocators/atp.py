"""ATP: per-block keep ratios in arithmetic progression, spread picked on the model (docs/reference/methods.md §4.5)."""
from __future__ import annotations

import time

import numpy as np

from ..budget import check_ratio, rank_at_ratio, realised_ratio, within_budget
from ..profile import Profile
from .base import Allocation, BudgetBelowMinimumError, ScoreFn, finish, finite_score

ATP_STEPS = 10  # 11 grid values 0, 0.2h, ..., 2h (docs/reference/methods.md §4.5)


def atp_block_ratios(num_blocks: int, ratio: float, beta_total: float) -> np.ndarray:
    """k_b = ratio + beta_total (0.5 - b/(B-1)): linear, denser early, mean = ratio."""
    if num_blocks < 2:
        return np.full(num_blocks, ratio)
    b = np.arange(num_blocks)
    return ratio + beta_total * (0.5 - b / (num_blocks - 1))


def atp_grid(ratio: float, steps: int = ATP_STEPS) -> list[float]:
    """beta_total in {0, 0.2h, ..., 2h}, h = min(ratio, 1 - ratio) (11 values)."""
    headroom = min(ratio, 1.0 - ratio)
    return [headroom * 2 / steps * i for i in range(steps + 1)]


def allocate_atp(profile: Profile, ratio: float, score_fn: ScoreFn, steps: int = ATP_STEPS) -> Allocation:
    """ATP: per-block keep ratios in arithmetic progression; the spread is picked by
    evaluating ``score_fn`` (lower is better, e.g. search-set PPL) on each of the grid's
    allocations (docs/reference/methods.md §4.5). The first best wins, as in the reference.

    Blocks of unequal size can make a spread miss the budget; such grid points are
    skipped (recorded in info["trials"]).
    """
    ratio = check_ratio(ratio)
    trials, best = [], None
    start = time.perf_counter()
    for beta in atp_grid(ratio, steps):
        keep = atp_block_ratios(profile.num_blocks, ratio, beta)
        ranks = {l.name: rank_at_ratio(l, float(keep[l.block])) for l in profile.layers}
        feasible = within_budget(profile, ranks, ratio)
        score = finite_score(score_fn(ranks)) if feasible else None
        trials.append({"beta_total": beta, "score": score, "feasible": feasible,
                       "realised_ratio": realised_ratio(profile, ranks)})
        if feasible and (best is None or score < best[0]):
            best = (score, beta, ranks)
    seconds = time.perf_counter() - start
    if best is None:
        lowest = min(t["realised_ratio"] for t in trials)
        raise BudgetBelowMinimumError("atp", ratio, lowest, profile.total_params, "no grid point meets the budget")
    score, beta, ranks = best
    info = {"beta_total": beta, "trials": trials}
    return finish(profile, Allocation("atp", ratio, ranks, objective=score, solve_seconds=seconds, info=info))


"""LC-SVD's sensitivity-prior rank search (docs/reference/other-seed-methods.md §3.3, [RECON]).

Block sensitivities from a light uniform compression of one block at a time
(scored by the caller's score_fn), a prior that removes less from sensitive blocks,
Dirichlet samples around the prior projected to the exact budget, uniform and prior
always included, argmin of score_fn. Ratios are kept fractions (the paper's
compression ratio is 1 - kept); docs/seed-methods.md lists what is sourced and what
is chosen.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..budget import Ranks, block_params, check_ratio, rank_at_ratio, realised_ratio, within_budget
from ..profile import Profile
from .base import Allocation, BudgetBelowMinimumError, finish, finite_score


def block_keep_ranks(profile: Profile, keep: np.ndarray) -> Ranks:
    """Per-block kept fraction -> ranks int(keep_b * eq) for every matrix of block b."""
    return {l.name: rank_at_ratio(l, float(keep[l.block])) for l in profile.layers}


def block_sensitivities(profile: Profile, score_fn: Callable[[Ranks], float], light_keep: float = 0.9) -> np.ndarray:
    """log score with only block b compressed uniformly at ``light_keep`` (the rest dense).

    Only differences between blocks matter downstream, so the dense score is not needed.
    """
    scores = []
    for b in range(profile.num_blocks):
        keep = np.ones(profile.num_blocks)
        keep[b] = light_keep
        scores.append(finite_score(score_fn(block_keep_ranks(profile, keep))))
    return np.log(np.maximum(np.asarray(scores, dtype=np.float64), 1e-300))


def project_to_budget(removed: np.ndarray, weights: np.ndarray, target: float, lo: float, hi: float) -> np.ndarray:
    """clip(removed + t, lo, hi) with the shift t that makes sum(weights * .) = target (bisection)."""
    total = lambda t: float((weights * np.clip(removed + t, lo, hi)).sum())
    a, b = lo - removed.max(), hi - removed.min()
    for _ in range(200):
        mid = 0.5 * (a + b)
        a, b = (mid, b) if total(mid) < target else (a, mid)
    return np.clip(removed + 0.5 * (a + b), lo, hi)


def sensitivity_prior(sens: np.ndarray, ratio: float, weights: np.ndarray, tau: float, lo: float, hi: float) -> np.ndarray:
    """Removed fraction per block: (1 - ratio) w_b / mean(w), w_b = exp(-z_b / tau) with z the
    standardised sensitivities (scale-free for PPL or KL scores), projected to the budget."""
    spread = sens.std()
    z = (sens - sens.mean()) / spread if spread > 0 else np.zeros_like(sens)
    w = np.exp(-z / tau)
    removed = (1.0 - ratio) * w / w.mean()
    return project_to_budget(removed, weights, (1.0 - ratio) * weights.sum(), lo, hi)


def dirichlet_candidates(prior: np.ndarray, weights: np.ndarray, ratio: float, n: int, concentration: float,
                         rng: np.random.Generator, lo: float, hi: float) -> list[np.ndarray]:
    """Samples of the removed parameters' split over blocks, Dirichlet(concentration * N * share),
    mapped back to removed fractions and projected to the exact budget."""
    share = prior * weights / (prior * weights).sum() if (prior * weights).sum() > 0 else weights / weights.sum()
    target = (1.0 - ratio) * weights.sum()
    alpha = concentration * len(share) * share + 1e-3
    return [project_to_budget(s * target / weights, weights, target, lo, hi) for s in rng.dirichlet(alpha, size=n)]


@dataclass(frozen=True)
class CandidateSpace:
    """The candidates LC-SVD's search scores: ``n_candidates`` Dirichlet samples of the given
    ``concentration`` around the sensitivity prior of temperature ``tau``, every block keeping
    at least ``min_keep``."""

    n_candidates: int = 16
    concentration: float = 20.0
    tau: float = 1.0
    min_keep: float = 0.05


def allocate_lcsvd_search(profile: Profile, ratio: float, score_fn: Callable[[Ranks], float], seed: int = 0,
                          light_keep: float = 0.9, sensitivity: np.ndarray | None = None,
                          space: CandidateSpace | None = None, **space_options) -> Allocation:
    """LC-SVD error-driven rank search (docs/reference/other-seed-methods.md §3.3 [RECON]): the lowest-scoring candidate wins.

    Candidates: uniform, the sensitivity prior, and ``n_candidates`` seeded Dirichlet
    samples around it; each is a per-block kept fraction in [min_keep, 1] meeting the
    budget exactly before rounding (ranks int(keep * eq) then never exceed it, unless
    the rank-1 floor bites, which makes a candidate infeasible and skipped).
    ``sensitivity`` (one value per block, higher = more sensitive) skips the
    measurement. Duplicate rank sets are scored once. ``space`` (or its fields as keywords,
    ``n_candidates=12``) sets the candidates.
    """
    space = space or CandidateSpace(**space_options)
    n_candidates, concentration, tau, min_keep = space.n_candidates, space.concentration, space.tau, space.min_keep
    ratio = check_ratio(ratio)
    if ratio < min_keep:
        raise BudgetBelowMinimumError("lcsvd_search", ratio, min_keep, profile.total_params, f"blocks keep at least {min_keep:g}")
    start = time.perf_counter()
    weights = block_params(profile)
    lo, hi = 0.0, 1.0 - min_keep
    sens = np.asarray(sensitivity, dtype=np.float64) if sensitivity is not None else block_sensitivities(profile, score_fn, light_keep)
    if sens.shape != (profile.num_blocks,):
        raise ValueError(f"lcsvd_search: sensitivity needs one value per block ({profile.num_blocks})")
    prior = sensitivity_prior(sens, ratio, weights, tau, lo, hi)
    rng = np.random.default_rng(seed)
    named = [("uniform", np.full(profile.num_blocks, 1.0 - ratio)), ("prior", prior)]
    named += [(f"sample{i}", s) for i, s in enumerate(dirichlet_candidates(prior, weights, ratio, n_candidates, concentration, rng, lo, hi))]
    trials, seen, best = [], {}, None
    for label, removed in named:
        ranks = block_keep_ranks(profile, 1.0 - removed)
        key = tuple(ranks[l.name] for l in profile.layers)
        feasible = within_budget(profile, ranks, ratio)
        if feasible and key not in seen:
            seen[key] = finite_score(score_fn(ranks))
        score = seen.get(key) if feasible else None
        trials.append({"candidate": label, "block_keep": [float(x) for x in 1.0 - removed], "feasible": feasible,
                       "score": score, "realised_ratio": realised_ratio(profile, ranks)})
        if feasible and (best is None or score < best[0]):
            best = (score, label, ranks)
    if best is None:  # uniform is infeasible only when the rank-1 floor exceeds the budget
        raise BudgetBelowMinimumError("lcsvd_search", ratio, min(t["realised_ratio"] for t in trials),
                                      profile.total_params, "rank-1 floor on every candidate")
    score, label, ranks = best
    info = {"chosen": label, "sensitivity": [float(s) for s in sens], "prior_keep": [float(x) for x in 1.0 - prior],
            "trials": trials, "seed": seed, "n_candidates": n_candidates, "concentration": concentration,
            "light_keep": light_keep, "tau": tau}
    return finish(profile, Allocation("lcsvd_search", ratio, ranks, objective=score,
                                       solve_seconds=time.perf_counter() - start, info=info))


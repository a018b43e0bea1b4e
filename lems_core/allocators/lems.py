"""LEMS: the layer-wise error model + the exact multiple-choice knapsack (methods.md §1.2-1.4),
and ``fit_bias``, the seeded search over the depth bias (alpha, gamma) (§1.3).
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import NamedTuple

import numpy as np

from ..budget import BUDGET_TOL, budget_of, candidate_cost, candidate_ranks, check_ratio
from ..error_model import ErrorModelParams, block_biases, kl_scales, layer_errors
from ..profile import Profile
from ..solver import solve_mckp, solve_mckp_pulp
from .base import Allocation, BudgetBelowMinimumError, ScoreFn, finish, finite_score


def lems_error_table(
    profile: Profile, params: ErrorModelParams, ratio: float, multiple: int | None = 8, cost_model: str = "params"
) -> tuple[list[np.ndarray], list[np.ndarray], list[list[int | None]]]:
    """Options of the LEMS knapsack, per layer: (costs, errors, ranks), dense first.

    Dense costs m*n with error 0; factorised candidates (``candidate_ranks``) cost
    r(m+n) and err beta_b * KL_l * S_l(r) (methods.md §1.2, via ``layer_errors``).
    """
    ratio = check_ratio(ratio)
    biases, scales = block_biases(profile, params), kl_scales(profile, params)
    costs, errors, options = [], [], []
    for i, layer in enumerate(profile.layers):
        ranks = candidate_ranks(layer, ratio, multiple)
        scale = None if scales is None else float(scales[i])
        errs = layer_errors(profile.spectra[layer.name], ranks, layer.eq_rank, float(biases[i]), scale, params)
        costs.append(np.concatenate([[float(layer.params)], candidate_cost(layer, ranks, cost_model)]))
        errors.append(np.concatenate([[0.0], errs]))
        options.append([None] + [int(r) for r in ranks])
    return costs, errors, options


def allocate_lems(
    profile: Profile,
    ratio: float,
    params: ErrorModelParams = ErrorModelParams(),
    multiple: int | None = 8,
    solver: str = "exact",
    cost_model: str = "params",
    **solver_options,
) -> Allocation:
    """LEMS: minimise the summed surrogate error under the parameter budget (methods.md §1.4).

    ``solver="exact"`` uses the project's exact MCKP solver; "highs"/"cbc" go through
    PuLP (``solver_options`` such as time_limit, gap_rel are passed on).
    """
    ratio = check_ratio(ratio)
    costs, errors, options = lems_error_table(profile, params, ratio, multiple, cost_model)
    budget = budget_of(profile, ratio)
    minimum = sum(float(c.min()) for c in costs)
    if minimum > budget * (1 + BUDGET_TOL):
        raise BudgetBelowMinimumError(
            "lems", ratio, minimum / profile.total_params, profile.total_params,
            f"every layer at its smallest candidate rank, multiple={multiple}, cost_model={cost_model!r}")
    start = time.perf_counter()
    if solver == "exact":
        choice = solve_mckp(costs, errors, budget)
    elif solver in ("highs", "cbc"):
        choice = solve_mckp_pulp(costs, errors, budget, solver=solver, **solver_options)
    else:
        raise ValueError(f"solver must be 'exact', 'highs' or 'cbc', got {solver!r}")
    seconds = time.perf_counter() - start
    ranks = {l.name: options[i][j] for i, (l, j) in enumerate(zip(profile.layers, choice))}
    per_layer = {l.name: float(errors[i][j]) for i, (l, j) in enumerate(zip(profile.layers, choice))}
    info = {"error_model": params.to_dict(), "solver": solver, "multiple": multiple, "cost_model": cost_model,
            "num_options": int(sum(len(c) for c in costs))}
    alloc = Allocation("lems", ratio, ranks, per_layer, float(sum(per_layer.values())), seconds, info)
    return finish(profile, alloc)


class BiasFit(NamedTuple):
    """Result of ``fit_bias``: best params, every trial, and the best trial's allocation."""

    params: ErrorModelParams
    trials: list[dict]
    allocation: Allocation


def fit_bias(
    profile: Profile,
    ratio: float,
    score_fn: ScoreFn,
    params: ErrorModelParams = ErrorModelParams(),
    n_trials: int = 10,
    seed: int = 42,
    alpha_range: tuple[float, float] = (0.0, 3.0),
    gamma_range: tuple[float, float] = (0.0, 7.0),
    **lems_options,
) -> BiasFit:
    """Fit the depth bias (alpha, gamma) by seeded random search (methods.md §1.3).

    The reference runs Optuna's TPESampler(seed=42) for 10 trials; with Optuna's 10
    startup trials these are independent uniform draws from numpy's
    ``RandomState(seed)``, alpha then gamma per trial. The same draws are made
    here, so the (alpha, gamma) sequence matches the reference's for n_trials <= 10
    (checked against optuna 4.6). Each trial solves LEMS with the harmonic bias and
    scores it with ``score_fn`` (lower is better, e.g. KL on the search set); the
    first trial with the lowest score wins.
    """
    rng = np.random.RandomState(seed)
    trials, best = [], None
    for t in range(n_trials):
        alpha = float(rng.uniform(*alpha_range))
        gamma = float(rng.uniform(*gamma_range))
        trial_params = replace(params, alpha=alpha, gamma=gamma, bias_form="harmonic")
        alloc = allocate_lems(profile, ratio, trial_params, **lems_options)
        score = finite_score(score_fn(alloc.ranks))
        trials.append({"trial": t, "alpha": alpha, "gamma": gamma, "score": score,
                       "objective": alloc.objective, "realised_ratio": alloc.info["realised_ratio"]})
        if best is None or score < best[0]:
            best = (score, trial_params, alloc)
    if best is None:
        raise ValueError("fit_bias needs n_trials >= 1")
    _, best_params, best_alloc = best
    best_alloc.info["bias_fit"] = trials
    return BiasFit(best_params, trials, best_alloc)


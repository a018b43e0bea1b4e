"""LEMS: the layer-wise error model + the exact multiple-choice knapsack (docs/reference/methods.md §1.2-1.4),
and ``fit_bias``, the seeded search over the depth bias (alpha, gamma) (docs/reference/methods.md §1.3).
"""
from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import NamedTuple

import numpy as np

from ..budget import BUDGET_TOL, candidate_cost, candidate_lower_bound, candidate_ranks, check_ratio, dense_cost
from ..constraints import ConstraintError, LayerConstraints, ResolvedConstraints
from ..derived import derived
from ..error_model import ErrorModelParams, block_biases, kl_scales, layer_errors
from ..profile import Profile
from ..solver import prepare_mckp, solve_mckp, solve_mckp_pulp
from .base import Allocation, ScoreFn, constraint_info, finite_score, resolve_constraints
from .latency_budget import below_minimum, check_cost_constraints, cost_key, finish_under_cost, knapsack_budget


def lems_error_table(
    profile: Profile, params: ErrorModelParams, ratio: float, multiple: int | None = 8, cost_model="params",
    constraints: ResolvedConstraints | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray], list[list[int | None]]]:
    """Options of the LEMS knapsack, per layer: (costs, errors, ranks), dense first.

    Dense costs m*n with error 0; factorised candidates (``candidate_ranks``) cost
    r(m+n) and err beta_b * KL_l * S_l(r) (docs/reference/methods.md §1.2, via ``layer_errors``).
    A cost object as ``cost_model`` (``latency.LatencyCost``) prices both instead.
    ``constraints`` only remove options (a dense-only layer keeps just dense; kept
    fraction bounds and the rank multiple filter the candidates; ``max_kept`` < 1
    drops dense), so the knapsack over the rest is still solved exactly.
    """
    ratio = check_ratio(ratio)
    if constraints is not None and constraints.requested_multiple is not None:
        multiple = constraints.requested_multiple
    biases, scales = block_biases(profile, params), kl_scales(profile, params)
    costs, errors, options = [], [], []
    for i, layer in enumerate(profile.layers):
        ranks = candidate_ranks(layer, ratio, multiple)
        dense = [dense_cost(layer, cost_model)], [0.0], [None]
        if constraints is not None:
            ranks = ranks[constraints.rank_mask(i, ranks)]
            if not constraints.dense_allowed(i):
                dense = [], [], []
            if not ranks.size and not dense[0]:
                raise ConstraintError(
                    f"layer {layer.name}: no LEMS candidate rank (r/eq in [{candidate_lower_bound(ratio):g}, 0.95), "
                    f"multiple {multiple}) lies within its kept-fraction bounds "
                    f"[{constraints.lo[i]:g}, {constraints.hi[i]:g}], and dense is not allowed")
        scale = None if scales is None else float(scales[i])
        errs = layer_errors(profile.spectra[layer.name], ranks, layer.eq_rank, float(biases[i]), scale, params)
        costs.append(np.concatenate([dense[0], candidate_cost(layer, ranks, cost_model)]))
        errors.append(np.concatenate([dense[1], errs]))
        options.append(dense[2] + [int(r) for r in ranks])
    return costs, errors, options


def allocate_lems(
    profile: Profile,
    ratio: float,
    params: ErrorModelParams = ErrorModelParams(),
    multiple: int | None = 8,
    solver: str = "exact",
    cost_model="params",
    constraints: LayerConstraints | None = None,
    **solver_options,
) -> Allocation:
    """LEMS: minimise the summed surrogate error under the parameter budget (docs/reference/methods.md §1.4).

    ``solver="exact"`` uses the project's exact MCKP solver; "highs"/"cbc" go through
    PuLP (``solver_options`` such as time_limit, gap_rel are passed on). ``constraints``
    (``LayerConstraints``) filter the options; with excluded layers ``ratio`` applies to
    the others and the allocation's ratio is the resulting kept fraction over all layers.
    With a ``latency.LatencyCost`` as ``cost_model`` the options cost their measured times
    and ``ratio`` is the kept fraction of the dense latency (``latency_budget``).
    """
    ratio = check_ratio(ratio)
    check_cost_constraints(cost_model, constraints)
    resolved, full_ratio = resolve_constraints(profile, ratio, constraints)
    # The table depends on the budget only through the candidate grid's lower bound: one per profile and setting.
    key = ("lems_table", params, multiple, candidate_lower_bound(ratio), cost_key(cost_model), id(profile.kl_ref),
           None if resolved is None else constraints.key())
    costs, errors, options = derived(profile, key, lambda: lems_error_table(profile, params, ratio, multiple,
                                                                             cost_model, resolved))
    budget = knapsack_budget(profile, ratio, full_ratio, cost_model)
    minimum = sum(float(c.min()) for c in costs)
    grid = multiple if resolved is None or resolved.requested_multiple is None else resolved.requested_multiple
    if minimum > budget * (1 + BUDGET_TOL):
        raise below_minimum(
            "lems", ratio, minimum, profile, cost_model, resolved,
            f"every layer at its smallest candidate rank, multiple={grid}, cost_model={cost_key(cost_model)!r}"
            + (", under the layer constraints" if resolved is not None else ""))
    start = time.perf_counter()
    if solver == "exact":
        prepared = derived(profile, ("mckp_prepared",) + key, lambda: prepare_mckp(costs, errors))
        choice = solve_mckp(costs, errors, budget, prepared=prepared)
    elif solver in ("highs", "cbc"):
        choice = solve_mckp_pulp(costs, errors, budget, solver=solver, **solver_options)
    else:
        raise ValueError(f"solver must be 'exact', 'highs' or 'cbc', got {solver!r}")
    seconds = time.perf_counter() - start
    ranks = {l.name: options[i][j] for i, (l, j) in enumerate(zip(profile.layers, choice))}
    per_layer = {l.name: float(errors[i][j]) for i, (l, j) in enumerate(zip(profile.layers, choice))}
    info = {"error_model": params.to_dict(), "solver": solver, "multiple": grid, "cost_model": cost_key(cost_model),
            "num_options": int(sum(len(c) for c in costs)), **constraint_info(constraints, ratio, full_ratio)}
    alloc = Allocation("lems", full_ratio, ranks, per_layer, float(sum(per_layer.values())), seconds, info)
    return finish_under_cost(profile, alloc, cost_model, ratio)


def lems_min_budget(profile: Profile, multiple: int | None = 8, cost_model="params", step: float = 0.01) -> float:
    """The smallest budget on a ``step`` grid at which LEMS has a solution (no constraints).

    Every layer at its cheapest option (the smallest candidate rank, or dense when it
    has none or dense is cheaper). The candidate grid's lower bound is 0.1 eq below a
    budget of 0.5 and 0.3 eq from 0.5 on (``candidate_lower_bound``), so both regimes
    are checked. In the cost's own units: a fraction of the dense parameters, or of the
    dense latency with a cost object (``latency.LatencyCost``) as ``cost_model``.
    """
    total = sum(dense_cost(layer, cost_model) for layer in profile.layers)
    for regime, upper in ((0.3, 0.5), (0.5, 1.0)):
        cheapest = 0.0
        for layer in profile.layers:
            dense = dense_cost(layer, cost_model)
            costs = candidate_cost(layer, candidate_ranks(layer, regime, multiple), cost_model)
            cheapest += min(dense, float(costs.min()) if costs.size else dense)
        ratio = math.ceil(cheapest / total / step - 1e-9) * step
        if ratio < upper:
            return round(max(ratio, regime if regime >= 0.5 else step), 6)
    return 1.0


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
    """Fit the depth bias (alpha, gamma) by seeded random search (docs/reference/methods.md §1.3).

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



# --------------------------------------------------------------------------- the reference LEMS: fitted bias
# docs/reference/methods.md §9 "Bias fit is always on": the reference hard-codes one_shot=False, so its
# LEMS always runs the 10-trial seeded (alpha, gamma) search scored by KL; its config's
# alpha=0, gamma=5 are never used. Here the search is run when a profile is built (at
# BIAS_FIT_RATIOS; it needs the model) and stored in ``Profile.bias_fit``, so ``lems``
# allocates live from the profile alone. ``lems_fixed`` keeps a given (default 0, 5) bias.
BIAS_FIT_RATIOS = (0.6, 0.8)
BIAS_FIT_TRIALS = 10
BIAS_FIT_SEED = 42


def profile_bias_fit(
    profile: Profile,
    score_fn: ScoreFn,
    ratios: tuple[float, ...] = BIAS_FIT_RATIOS,
    params: ErrorModelParams | None = None,
    n_trials: int = BIAS_FIT_TRIALS,
    seed: int = BIAS_FIT_SEED,
    progress=None,
) -> dict:
    """``fit_bias`` at each ratio, as the record ``Profile.bias_fit`` stores (trials and winner)."""
    params = params or ErrorModelParams(ref_ratio=profile.ref_ratio, use_scale=profile.kl_ref is not None)
    entries = {}
    for i, ratio in enumerate(ratios):
        fit = fit_bias(profile, ratio, score_fn, params, n_trials=n_trials, seed=seed)
        best = min(fit.trials, key=lambda t: t["score"])
        entries[f"{check_ratio(ratio):g}"] = {"alpha": fit.params.alpha, "gamma": fit.params.gamma,
                                              "score": best["score"], "trial": best["trial"], "trials": fit.trials}
        if progress:
            progress((i + 1) / len(ratios), f"bias fit at {ratio:g}: alpha {fit.params.alpha:.3f} "
                                            f"gamma {fit.params.gamma:.3f}")
    return {"ratios": entries, "n_trials": n_trials, "seed": seed, "score": "kl", "bias_form": "harmonic",
            "alpha_range": [0.0, 3.0], "gamma_range": [0.0, 7.0], "error_model": params.to_dict()}


def fitted_params(profile: Profile, ratio: float,
                  base: ErrorModelParams | None = None) -> tuple[ErrorModelParams, float] | None:
    """(``base`` with the profile's fitted harmonic (alpha, gamma), the fitted ratio used), or None.

    The fit at the nearest fitted ratio is used (the reference fits at the exact target;
    ``fit_bias`` on the model does that)."""
    fit = profile.bias_fit
    if not fit or not fit.get("ratios"):
        return None
    ratio = check_ratio(ratio)
    key = min(fit["ratios"], key=lambda k: (abs(float(k) - ratio), float(k)))
    entry = fit["ratios"][key]
    base = base or ErrorModelParams(ref_ratio=profile.ref_ratio, use_scale=profile.kl_ref is not None)
    return replace(base, alpha=float(entry["alpha"]), gamma=float(entry["gamma"]), bias_form="harmonic"), float(key)


def allocate_lems_reference(profile: Profile, ratio: float, params: ErrorModelParams | None = None,
                            **options) -> Allocation:
    """``lems``: LEMS with the bias fitted in the profile (the reference's behaviour).

    Without ``params`` the bias is the profile's fit at the nearest fitted ratio; a
    profile without a fit falls back to the fixed default bias (``info["bias_source"]``
    says which). Given ``params`` (e.g. the app's sliders, which start at the fit) are
    used as they are.
    """
    source = "given"
    if params is None:
        found = fitted_params(profile, ratio)
        if found is None:
            params, source = ErrorModelParams(ref_ratio=profile.ref_ratio), "default (the profile has no bias fit)"
        else:
            params, at = found
            source = f"profile fit at {at:g}"
    alloc = allocate_lems(profile, ratio, params, **options)
    alloc.info["bias_source"] = source
    return alloc


def allocate_lems_fixed(profile: Profile, ratio: float, params: ErrorModelParams = ErrorModelParams(),
                        **options) -> Allocation:
    """``lems_fixed``: LEMS with a fixed bias (default alpha=0, gamma=5, the reference config's unused values)."""
    alloc = allocate_lems(profile, ratio, params, **options)
    alloc.method = "lems_fixed"
    alloc.info["bias_source"] = "fixed"
    return alloc

"""Allocating under a latency budget instead of a parameter budget.

With a cost object (``latency.LatencyCost``) instead of the name "params", a layer's
options cost their measured times and the budget is ``ratio`` x the dense model's
compressible latency. Methods run under it in one of two ways (``AllocatorSpec.latency``):

- "native": the exact knapsack of LEMS with the costs swapped (``budget.candidate_cost``
  and ``budget.dense_cost``), the budget from ``knapsack_budget``, the result finished
  by ``finish_under_cost``; it stays exact for the measured costs.
- "search": a parameter-budget rule (uniform, SVD-LLM V2, MRCS) run at the largest
  parameter ratio whose plan's predicted latency meets the budget (``search_param_ratio``).

The other methods score candidate plans on the model or learn masks under a parameter
budget and refuse (``UnsupportedCostError``). Either way the allocation's ``ratio`` is
its parameter ratio, so every parameter-budget check still holds, and
``info["cost"]`` (the plan's ``meta.cost``) carries the latency target and prediction.
"""
from __future__ import annotations

from typing import Callable

from ..budget import BUDGET_TOL, budget_of, realised_ratio
from ..constraints import ConstraintError, LayerConstraints, ResolvedConstraints
from ..profile import Profile
from .base import Allocation, BudgetBelowMinimumError, finish, min_ratio

COST_NAMES = ("params", "latency")
COARSE_STEP = 0.05  # search_param_ratio: first scan of parameter ratios, from 1 down
REFINE_STEPS = 12  # then bisection steps between the last feasible and the first infeasible ratio


class UnsupportedCostError(ValueError):
    """The method cannot allocate under the requested cost model."""


def is_param_cost(cost_model) -> bool:
    """Whether ``cost_model`` counts parameters (a name such as "params" or "reference")."""
    return isinstance(cost_model, str)


def cost_key(cost_model) -> str:
    """A hashable identity of the cost model, for caches of option tables."""
    return cost_model if is_param_cost(cost_model) else cost_model.key


def check_cost_constraints(cost_model, constraints: LayerConstraints | ResolvedConstraints | None) -> None:
    """Excluded layers leave a parameter budget; under latency they would still take time: refused."""
    if is_param_cost(cost_model) or constraints is None:
        return
    excluded = constraints.exclude if isinstance(constraints, LayerConstraints) else any(constraints.excluded)
    if excluded:
        raise ConstraintError("excluded layers are not supported under a latency budget (they still run and take "
                              "time): lock them dense instead, which keeps their time inside the budget")


def knapsack_budget(profile: Profile, ratio: float, full_ratio: float, cost_model) -> float:
    """The knapsack's budget: ``full_ratio`` x dense parameters, or ``ratio`` x dense latency."""
    if is_param_cost(cost_model):
        return budget_of(profile, full_ratio)
    return ratio * cost_model.dense_total(profile.layers)


def below_minimum(method: str, ratio: float, minimum: float, profile: Profile, cost_model,
                  resolved: ResolvedConstraints | None, why: str) -> BudgetBelowMinimumError:
    """The method's "budget below the smallest reachable one" error, in the cost's own units."""
    if is_param_cost(cost_model):
        return BudgetBelowMinimumError(method, ratio, min_ratio(profile, minimum, resolved), profile.total_params, why)
    total = cost_model.dense_total(profile.layers)
    return BudgetBelowMinimumError(method, ratio, minimum / total, total, f"{why}; latency budget, fractions of the "
                                   f"dense {cost_model.workload.describe()} latency")


def finish_under_cost(profile: Profile, alloc: Allocation, cost_model, target: float) -> Allocation:
    """``finish``, plus under latency: check the predicted latency, record it, ratio := parameter ratio."""
    if is_param_cost(cost_model):
        return finish(profile, alloc)
    predicted = cost_model.fraction(profile.layers, alloc.ranks)
    if predicted > target * (1 + BUDGET_TOL):  # a bug, never a user error
        raise RuntimeError(f"{alloc.method} exceeded its latency budget: predicted {predicted:.6f} > {target}")
    alloc.ratio = realised_ratio(profile, alloc.ranks)
    alloc.info["cost"] = cost_model.record(target, predicted)
    return finish(profile, alloc)


def search_param_ratio(profile: Profile, run: Callable[[float], Allocation], cost_model, target: float,
                       method: str) -> Allocation:
    """The allocation ``run(p)`` at the largest parameter ratio p found whose predicted latency is within ``target``.

    Parameter ratios are scanned from 1 down in COARSE_STEP, then bisected between the
    last feasible and the first infeasible one (latency rises with the ratio for these
    rules except near 1, where ranks just below break-even can be slower than dense).
    """
    def feasible(p: float) -> Allocation | None:
        try:
            alloc = run(p)
        except BudgetBelowMinimumError:
            return None
        return alloc if cost_model.fraction(profile.layers, alloc.ranks) <= target * (1 + BUDGET_TOL) else None

    above, found = None, None
    for step in range(round(1 / COARSE_STEP), 0, -1):
        p = round(step * COARSE_STEP, 6)
        found = feasible(p)
        if found is not None:
            low = p
            break
        above = p
    if found is None:
        raise below_minimum(method, target, cost_model.plan_time(profile.layers, run_minimum(run)), profile,
                            cost_model, None, f"{method} at every parameter ratio down to {COARSE_STEP:g}")
    for _ in range(REFINE_STEPS if above is not None else 0):
        mid = (low + above) / 2
        better = feasible(mid)
        low, above, found = (mid, above, better) if better is not None else (low, mid, found)
    predicted = cost_model.fraction(profile.layers, found.ranks)
    found.info["cost"] = cost_model.record(target, predicted)
    found.info["param_ratio_searched"] = low
    return found


def run_minimum(run: Callable[[float], Allocation]) -> dict:
    """The ranks at the smallest coarse ratio the method reaches (for the error message)."""
    for step in range(1, round(1 / COARSE_STEP) + 1):
        try:
            return run(step * COARSE_STEP).ranks
        except BudgetBelowMinimumError:
            continue
    raise UnsupportedCostError("the method reaches no parameter ratio at all")

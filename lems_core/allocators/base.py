"""What every allocator shares: the ``Allocation`` it returns and the checks on it.

The arithmetic of the budget (costs, break-even rule, candidate ranks) is in
``lems_core/budget.py``, shared with ``plan.py``; this module adds the allocator
side: the typed result, the "below this method's minimum" error, and ``finish``,
which every allocator calls last so that no plan ever leaves over budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from ..budget import BUDGET_TOL, Ranks, budget_of, check_ratio, params_of, realised_ratio, within_budget
from ..constraints import LayerConstraints, ResolvedConstraints
from ..error_model import ErrorModelParams
from ..plan import RankPlan, plan_from_allocation
from ..profile import Profile
from ..solver import InfeasibleBudgetError

ScoreFn = Callable[[Ranks], float]


@dataclass
class Allocation:
    """The result of one allocator run."""

    method: str
    ratio: float  # the kept-fraction budget it was asked for
    ranks: Ranks  # layer name -> rank, None = dense
    predicted_error: dict[str, float] | None = None  # per layer, under the error model used
    objective: float | None = None  # the allocator's own objective value, when it has one
    solve_seconds: float = 0.0
    info: dict = field(default_factory=dict)

    def to_plan(self, profile: Profile, params: ErrorModelParams | None = None, meta: dict | None = None) -> RankPlan:
        """The rank plan of this allocation for ``profile``'s model (see ``plan_from_allocation``)."""
        return plan_from_allocation(profile, self, params, meta)


class BudgetBelowMinimumError(InfeasibleBudgetError):
    """An ``InfeasibleBudgetError`` that says which allocator and which minimum.

    Each method has its own smallest reachable ratio (candidate grids, lower bounds,
    rank >= 1); asking for less is an error rather than a silently missed budget.
    """

    def __init__(self, method: str, ratio: float, min_ratio: float, total_params: int, why: str):
        super().__init__(min_ratio * total_params, ratio * total_params)
        self.method, self.ratio, self.min_ratio = method, ratio, min_ratio
        self.args = (f"{method}: budget ratio {ratio:g} is below the method's minimum {min_ratio:.4f} ({why})",)


def require_budget(profile: Profile, ranks: Ranks, ratio: float, method: str, why: str) -> None:
    """Raise BudgetBelowMinimumError when ``ranks`` (the method's cheapest choice) exceed the budget."""
    if not within_budget(profile, ranks, ratio):
        raise BudgetBelowMinimumError(method, ratio, realised_ratio(profile, ranks), profile.total_params, why)


def finish(profile: Profile, alloc: Allocation) -> Allocation:
    """Attach the budget bookkeeping every allocator reports, and assert it holds."""
    alloc.info["params_kept"] = params_of(profile, alloc.ranks)
    alloc.info["params_total"] = profile.total_params
    alloc.info["realised_ratio"] = alloc.info["params_kept"] / profile.total_params
    alloc.info["dense_layers"] = sum(r is None for r in alloc.ranks.values())
    # check_result's test on the params just counted (not a second pass over the layers).
    if alloc.info["params_kept"] > budget_of(profile, alloc.ratio) * (1 + BUDGET_TOL):
        check_result(profile, alloc)  # raises
    return alloc


def check_result(profile: Profile, alloc: Allocation) -> None:
    """Every allocator, built in or registered, must return ranks within its budget."""
    if not within_budget(profile, alloc.ranks, alloc.ratio):  # a bug in the allocator, never a user error
        raise RuntimeError(f"allocator {alloc.method!r} exceeded its budget: realised ratio "
                           f"{realised_ratio(profile, alloc.ranks):.6f} > {alloc.ratio}")


def resolve_constraints(profile: Profile, ratio: float,
                        constraints: LayerConstraints | None) -> tuple[ResolvedConstraints | None, float]:
    """(resolved constraints or None when there are none, the budget ratio over all layers).

    Excluded layers are outside the budget: ``ratio`` applies to the others, so over all
    layers the kept fraction is ``ResolvedConstraints.effective_ratio(ratio)``.
    """
    ratio = check_ratio(ratio)
    if constraints is None or constraints.is_empty:
        return None, ratio
    resolved = constraints.resolve(profile.layers)
    return resolved, resolved.effective_ratio(ratio)


def min_ratio(profile: Profile, min_params: float, resolved: ResolvedConstraints | None) -> float:
    """A method's smallest reachable parameter count as a ratio on the user's scale
    (over the non-excluded layers when some are excluded)."""
    full = min_params / profile.total_params
    return full if resolved is None else resolved.requested_ratio(full)


def constraint_info(constraints: LayerConstraints | None, ratio: float, full_ratio: float) -> dict:
    """What an allocation records about its constraints (empty without any)."""
    if constraints is None or constraints.is_empty:
        return {}
    return {"constraints": constraints.to_dict(), "requested_ratio": ratio, "budget_ratio_all_layers": full_ratio}


def apply_constraints(profile: Profile, alloc: Allocation, constraints: LayerConstraints | None,
                      ratio: float) -> Allocation:
    """Project a heuristic allocator's ranks onto ``constraints`` (see ``ResolvedConstraints.enforce``).

    For allocators without native support: the method has run at the all-layer budget
    ratio (``resolve_constraints``; ``ratio`` is the user's), then locked/excluded layers go dense, ranks move into their kept-fraction
    bounds and onto the rank multiple, and the highest kept fractions are trimmed
    until the budget holds again. The per-layer predicted errors are dropped (they
    belonged to the unconstrained ranks).
    """
    resolved, full_ratio = resolve_constraints(profile, ratio, constraints)
    if resolved is None:
        return alloc
    minimum = resolved.minimum_params()
    if minimum > full_ratio * profile.total_params * (1 + 1e-9):
        raise BudgetBelowMinimumError(alloc.method, ratio, min_ratio(profile, minimum, resolved),
                                      profile.total_params, "the cheapest ranks the layer constraints allow")
    ranks, steps = resolved.enforce(alloc.ranks, full_ratio * profile.total_params)
    info = {**alloc.info, **constraint_info(constraints, ratio, full_ratio), "constraint_repair_steps": steps}
    return finish(profile, Allocation(alloc.method, full_ratio, ranks, None, alloc.objective, alloc.solve_seconds, info))


def finite_score(value) -> float:
    """A caller's score as a float; NaN/inf (e.g. a diverged PPL) ranks last instead of
    poisoning the comparison."""
    value = float(value)
    return value if math.isfinite(value) else math.inf


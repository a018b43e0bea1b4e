"""MCKP input: validation, scoring of a choice, tolerances and the solver's errors.

A problem is one list of option costs and one of option errors per group (a weight
matrix); ``validated`` checks and flattens them, ``objective`` and ``total_cost`` score
one option per group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


EPS = np.finfo(np.float64).eps
# Relative slack of the objective below which a candidate does not count as better.
_OBJ_RTOL = 1e-12


class InfeasibleBudgetError(ValueError):
    """The budget is smaller than the cost of the cheapest option in every group."""

    def __init__(self, min_cost: float, budget: float):
        self.min_cost = float(min_cost)
        self.budget = float(budget)
        super().__init__(
            f"budget {self.budget:.10g} is infeasible: choosing the cheapest option in every "
            f"group already costs {self.min_cost:.10g} ({self.min_cost - self.budget:.4g} over)"
        )


class MCKPSearchLimitError(RuntimeError):
    """The exact search hit its size limit; carries the best solution found and a bound."""

    def __init__(self, choice: list[int], value: float, lower_bound: float, max_candidates: int):
        self.choice, self.value, self.lower_bound = choice, float(value), float(lower_bound)
        super().__init__(
            f"exact MCKP search stopped: one step needed more than {max_candidates} partial "
            f"solutions; best found {self.value:.10g}, lower bound {self.lower_bound:.10g} "
            f"(gap {self.value - self.lower_bound:.3g}); use solve_mckp_pulp with a time limit or "
            f"raise max_candidates")


@dataclass
class Problem:
    """Validated input: float64 groups, also flattened (all groups back to back)."""

    costs: list[np.ndarray]
    errors: list[np.ndarray]
    budget: float
    flat_cost: np.ndarray
    flat_err: np.ndarray
    lengths: np.ndarray

    @property
    def starts(self) -> np.ndarray:
        return np.cumsum(self.lengths) - self.lengths


def validated(costs, errors, budget) -> Problem:
    """Check shapes, sizes and finiteness with specific messages."""
    if len(costs) != len(errors):
        raise ValueError(f"costs has {len(costs)} groups but errors has {len(errors)}")
    if len(costs) == 0:
        raise ValueError("need at least one group")
    try:
        budget = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"budget must be a number, got {budget!r}") from None
    if not np.isfinite(budget):
        raise ValueError(f"budget must be finite, got {budget}")
    cost_arrays = [np.asarray(c, dtype=np.float64) for c in costs]
    error_arrays = [np.asarray(e, dtype=np.float64) for e in errors]
    for g, (c, e) in enumerate(zip(cost_arrays, error_arrays)):
        if c.ndim != 1 or e.ndim != 1:
            raise ValueError(f"group {g}: costs and errors must be 1-D arrays")
        if c.size == 0:
            raise ValueError(f"group {g} has no options")
        if c.shape != e.shape:
            raise ValueError(f"group {g}: {c.size} costs but {e.size} errors")
    flat = {}
    for name, arrays in (("costs", cost_arrays), ("errors", error_arrays)):
        flat[name] = np.concatenate(arrays)
        if not np.isfinite(flat[name]).all():
            g = next(g for g, a in enumerate(arrays) if not np.isfinite(a).all())
            raise ValueError(f"group {g}: {name} contain non-finite values")
    lengths = np.array([c.size for c in cost_arrays], dtype=np.int64)
    return Problem(cost_arrays, error_arrays, budget, flat["costs"], flat["errors"], lengths)


def _check_choice(groups: Sequence, choice: Sequence[int]) -> None:
    if len(choice) != len(groups):
        raise ValueError(f"choice has {len(choice)} entries for {len(groups)} groups")


def objective(errors: Sequence[np.ndarray], choice: Sequence[int]) -> float:
    """Summed error of one option per group."""
    _check_choice(errors, choice)
    return float(sum(float(np.asarray(e)[j]) for e, j in zip(errors, choice)))


def total_cost(costs: Sequence[np.ndarray], choice: Sequence[int]) -> float:
    """Summed cost of one option per group."""
    _check_choice(costs, choice)
    return float(sum(float(np.asarray(c)[j]) for c, j in zip(costs, choice)))


def minimum_cost(costs: Sequence[np.ndarray]) -> float:
    """Cost of the cheapest option in every group: the smallest feasible budget."""
    return float(sum(float(np.min(c)) for c in costs))


def tolerances(problem: Problem) -> tuple[float, float]:
    """Absolute slack on the budget (float summation noise) and on the objective.

    budget: 4 * eps * n_groups * max(|budget|, sum of each group's largest |cost|);
    objective: 1e-12 * sum of each group's largest |error|.
    """
    largest_cost = np.maximum.reduceat(np.abs(problem.flat_cost), problem.starts).sum()
    largest_err = np.maximum.reduceat(np.abs(problem.flat_err), problem.starts).sum()
    cost_scale = max(abs(problem.budget), float(largest_cost))
    return 4.0 * EPS * problem.lengths.size * cost_scale, _OBJ_RTOL * float(largest_err)
